"""Checkpoint reading, strict loading and atomic saving, on files written by the real libraries."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from safetensors.numpy import load_file, save_file

from opensora.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_state_dict,
    save_npz_atomic,
    save_state_dict,
)

TORCH_DIR = Path(__file__).parent / "fixtures" / "data" / "torch_format"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def expected_torch() -> dict[str, np.ndarray]:
    with np.load(TORCH_DIR / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", ["plain.pth", "wrapped.pth", "ddp.bin", "sharded"])
def test_torch_zip_read_without_torch(name: str) -> None:
    expected = expected_torch()
    state = read_state_dict(TORCH_DIR / name)
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert state[key].shape == value.shape, key
        np.testing.assert_array_equal(state[key].astype(np.float64), value.astype(np.float64))
    assert state["y_embedder.y_embedding"].dtype == np.float32  # bf16
    assert state["blocks.0.attn.qkv.bias"].dtype == np.float16


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _torch_like_zip(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")


def test_malicious_pickle_is_refused_naming_the_global(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    _torch_like_zip(path, pickle.dumps({"w": _Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"(posix|os)\.system"):
        read_state_dict(path)


def test_truncated_files_give_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a": np.arange(1000, dtype=np.float32)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(cut)
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes((TORCH_DIR / "plain.pth").read_bytes()[:-500])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_state_dict(cut_pth)


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    other = tmp_path / "weights.h5"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(other)
    with pytest.raises(CheckpointError, match="no weights file"):
        read_state_dict(tmp_path)


def test_safetensors_roundtrip_with_official_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
             "b": rng.integers(0, 9, size=(5,)).astype(np.int64),
             "c": rng.standard_normal(2).astype(np.float16)}
    ours = tmp_path / "ours.safetensors"
    save_state_dict(state, ours)
    theirs = load_file(str(ours))
    for key, value in state.items():
        np.testing.assert_array_equal(theirs[key], value)
    official = tmp_path / "official.safetensors"
    save_file(state, str(official))
    for key, value in read_state_dict(official).items():
        np.testing.assert_array_equal(value, state[key])


def test_reference_checkpoint_reads() -> None:
    state = read_state_dict(REFERENCE / "stdit2_tiny")
    assert "blocks.0.attn.qkv.weight" in state
    assert state["blocks.0.attn.qkv.weight"].shape == (288, 96)


class _Tiny(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Dense(3, 2)
        self.blocks = nn.CellList([nn.Dense(2, 2, has_bias=False) for _ in range(2)])

    def construct(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


def _tiny_state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"proj.weight": rng.standard_normal((2, 3)).astype(np.float32),
            "proj.bias": rng.standard_normal(2).astype(np.float32),
            "blocks.0.weight": rng.standard_normal((2, 2)).astype(np.float32),
            "blocks.1.weight": rng.standard_normal((2, 2)).astype(np.float32)}


def test_load_checkpoint_strict_success_and_values(tmp_path: Path) -> None:
    cell = _Tiny()
    state = _tiny_state()
    path = save_state_dict(state, tmp_path / "tiny.safetensors")
    report = load_checkpoint(cell, path)
    assert report.ok and len(report.loaded) == 4
    np.testing.assert_array_equal(cell.proj.weight.asnumpy(), state["proj.weight"])
    x = ms.Tensor(np.ones((1, 3), np.float32))
    assert cell(x).shape == (1, 2)


def test_load_checkpoint_reports_every_problem_at_once() -> None:
    cell = _Tiny()
    before = cell.proj.weight.asnumpy().copy()
    state = _tiny_state()
    del state["blocks.1.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["proj.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(cell, state)
    message = str(info.value)
    assert "blocks.1.weight" in message and "extra.weight" in message
    assert "proj.bias checkpoint (5,) vs model (2,)" in message
    np.testing.assert_array_equal(cell.proj.weight.asnumpy(), before)  # untouched on failure
    report = load_checkpoint(cell, state, strict=False)
    assert report.missing == ["blocks.1.weight"] and report.unexpected == ["extra.weight"]


def test_key_map_renames_and_drops() -> None:
    cell = _Tiny()
    state = {f"model.{k}": v for k, v in _tiny_state().items()}
    state["model.ignored"] = np.zeros(1, np.float32)
    report = load_checkpoint(
        cell, state, key_map=lambda k: None if k.endswith("ignored") else k[len("model."):])
    assert report.ok


def test_mindspore_ckpt_roundtrip(tmp_path: Path) -> None:
    path = save_state_dict(_tiny_state(), tmp_path / "tiny.ckpt")
    state = read_state_dict(path)
    for key, value in _tiny_state().items():
        np.testing.assert_array_equal(state[key], value)


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    save_state_dict(_tiny_state(), target)
    original = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"partial data")
        raise RuntimeError("simulated crash mid-save")
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp left behind


def test_save_npz_atomic(tmp_path: Path) -> None:
    save_npz_atomic(tmp_path / "x.npz", a=np.arange(3))
    with np.load(tmp_path / "x.npz") as data:
        np.testing.assert_array_equal(data["a"], np.arange(3))
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(3))
    assert (tmp_path / "x.npz").stat().st_size == len(buffer.getvalue())
