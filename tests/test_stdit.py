"""STDiT (Open-Sora 1.0): parity with the PyTorch reference, the .pth format of the published
checkpoints, sizes other than the saved position tables, graph mode and the XL count."""

from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from numerics import assert_f32_close

from opensora.checkpoint import load_checkpoint, read_state_dict
from opensora.models.stdit import STDiT

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "stdit_tiny"
PTH = Path(__file__).parent / "fixtures" / "data" / "stdit_v1_tiny.pth"
# Parity with PyTorch: a depth-2, width-96 transformer (attention, MLP, adaLN, sin-cos of t up to
# 999) run by two libraries differs by ~1e3 float32 roundings of each compared output's magnitude
PARITY_STEPS = 1024
GRAPH_STEPS = 256  # graph mode against PyNative: the same model, fused and reordered ops
HOOKED = ("x_embedder", "t_embedder", "t_block", "y_embedder", "blocks.0", "blocks.1",
          "final_layer")


@pytest.fixture(scope="module")
def case() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "stdit_case_plain.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def model() -> STDiT:
    net = STDiT.from_pretrained(MODEL_DIR, attn_backend="math")
    net.set_train(False)
    return net


def _inputs(case: dict[str, np.ndarray]) -> list[ms.Tensor]:
    return [ms.Tensor(case[k]) for k in ("x", "timestep", "y", "mask")]


def test_reference_parity_with_intermediates(case) -> None:
    net = STDiT.from_pretrained(MODEL_DIR, attn_backend="math")
    net.set_train(False)
    captured: dict[str, np.ndarray] = {}
    for name in HOOKED:
        cell = net
        for part in name.split("."):
            cell = cell[int(part)] if part.isdigit() else getattr(cell, part)

        def hook(cell, inputs, output, name=name):
            captured[name] = output.asnumpy()
        cell.register_forward_hook(hook)
    out = net(*_inputs(case)).asnumpy()
    assert_f32_close(out, case["out"], PARITY_STEPS)
    for name in HOOKED:
        assert_f32_close(captured[name], case[f"inter.{name}.0"], PARITY_STEPS, err_msg=name)


def test_position_tables_are_the_saved_buffers(model) -> None:
    saved = read_state_dict(MODEL_DIR)
    # sin-cos tables computed in float64, stored as float32: one rounding of values <= 1
    assert_f32_close(STDiT(**json.loads((MODEL_DIR / "config.json").read_text()))
                     .pos_embed.asnumpy(), saved["pos_embed"], 4)
    assert not model.pos_embed.requires_grad and not model.pos_embed_temporal.requires_grad
    np.testing.assert_allclose(model.pos_embed_temporal.asnumpy(), saved["pos_embed_temporal"])


def test_sizes_other_than_input_size_compute_their_tables(model, case) -> None:
    """A model whose saved tables are for (2, 8, 8) computes the (4, 16, 16) ones on the fly,
    and gets the same result as the model that has them saved."""
    config = json.loads((MODEL_DIR / "config.json").read_text())
    other = STDiT(**dict(config, input_size=[2, 8, 8]), attn_backend="math")
    state = read_state_dict(MODEL_DIR)
    state = {k: v for k, v in state.items() if not k.startswith("pos_embed")}
    load_checkpoint(other, state, strict=False)
    other.set_train(False)
    assert_f32_close(other(*_inputs(case)).asnumpy(), case["out"], PARITY_STEPS)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 4, 3, 10, 14)).astype(np.float32))
    out = model(x, *_inputs(case)[1:]).asnumpy()
    assert out.shape == (2, 8, 3, 10, 14) and np.isfinite(out).all()


def test_graph_mode_matches_pynative(model, case) -> None:
    x_mask = ms.Tensor(np.array([[True, False, True, True], [True, True, True, True]]))
    graph = ms.jit(model.construct)
    for mask in (None, x_mask):
        eager = model(*_inputs(case), mask).asnumpy()
        assert_f32_close(graph(*_inputs(case), mask).asnumpy(), eager, GRAPH_STEPS)
    changed = model(*_inputs(case), x_mask).asnumpy()
    assert np.abs(changed[0] - case["out"][0]).max() > 1e-3
    assert_f32_close(changed[1], case["out"][1], PARITY_STEPS)


def test_loads_published_pth_format() -> None:
    """OpenSora-v1-*.pth: a torch zip pickle with buffers, no config; shapes are inferred."""
    net = STDiT.from_pretrained(PTH, num_heads=2, attn_backend="chunked")
    saved = read_state_dict(PTH)
    assert net.input_size == (2, 8, 8) and net.hidden_size == 48 and len(net.blocks) == 1
    for name, param in net.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), saved[name])
    net.set_train(False)
    rng = np.random.default_rng(0)
    out = net(ms.Tensor(rng.standard_normal((1, 4, 2, 8, 8)).astype(np.float32)),
              ms.Tensor(np.array([10])), ms.Tensor(rng.standard_normal((1, 1, 8, 16))
                                                   .astype(np.float32)),
              ms.Tensor(np.array([[1, 1, 1, 0, 0, 0, 0, 0]]))).asnumpy()
    assert out.shape == (1, 8, 2, 8, 8) and np.isfinite(out).all()


