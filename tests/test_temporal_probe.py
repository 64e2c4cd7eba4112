"""The time's-arrow probe: its four orderings, its bookkeeping, and what it reads off the
committed tiny STDiT2 on real training clips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from opensora.presets import build_model, get_preset
from opensora.schedulers.iddpm import IDDPM
from opensora.temporal_probe import VARIANTS, ProbeResult, clip_variants, temporal_probe


def test_variants_reorder_frames_only() -> None:
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 3, 3)).astype(np.float32)
    out = clip_variants(x, np.random.default_rng(1))
    assert set(out) == set(VARIANTS)
    np.testing.assert_array_equal(out["forward"], x)
    np.testing.assert_array_equal(out["reversed"], x[:, :, ::-1])
    np.testing.assert_array_equal(out["frozen"], np.repeat(x[:, :, :1], 6, axis=2))
    shuffled = out["shuffled"]
    assert not np.array_equal(shuffled, x), "a shuffle that leaves every frame in place"
    order = [int(np.argmin(np.abs(x[0, 0] - frame).sum(axis=(1, 2)))) for frame in shuffled[0, 0]]
    assert sorted(order) == list(range(6))
    np.testing.assert_array_equal(shuffled, x[:, :, order])


def test_variants_need_a_video_batch() -> None:
    with pytest.raises(ValueError, match="T >= 2"):
        clip_variants(np.zeros((2, 4, 1, 3, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        clip_variants(np.zeros((4, 6, 3, 3), np.float32), np.random.default_rng(0))


def test_result_gaps() -> None:
    result = ProbeResult((100, 500), {"forward": np.array([0.1, 0.02]),
                                      "reversed": np.array([0.12, 0.02]),
                                      "shuffled": np.array([0.3, 0.04]),
                                      "frozen": np.array([0.09, 0.01])}, clips=4)
    np.testing.assert_allclose(result.arrow_gap(), [0.2, 0.0])
    np.testing.assert_allclose(result.relative("shuffled"), [2.0, 1.0])
    assert "+20.00%" in result.table() and "4 clips" in result.table()


def test_probe_on_the_committed_tiny_model(real_batch) -> None:
    model = build_model(get_preset("tiny"))
    result = temporal_probe(model, IDDPM(), [real_batch], timesteps=(100, 400), seed=0)
    print(result.table())
    assert result.clips == 4 and result.timesteps == (100, 400)
    for name in VARIANTS:
        assert result.losses[name].shape == (2,) and np.all(np.isfinite(result.losses[name]))
    # trained on clips, it relies on the frames agreeing: scrambling them costs a lot
    assert result.relative("shuffled")[0] > 0.5, result.table()
    again = temporal_probe(model, IDDPM(), [real_batch], timesteps=(100, 400), seed=0)
    for name in VARIANTS:
        np.testing.assert_allclose(again.losses[name], result.losses[name], rtol=1e-5)


def test_probe_rejects_bad_timesteps(real_batch) -> None:
    model = build_model(get_preset("tiny"))
    with pytest.raises(ValueError, match="outside"):
        temporal_probe(model, IDDPM(), [real_batch], timesteps=(1000,))
    with pytest.raises(ValueError, match="no batches"):
        temporal_probe(model, IDDPM(), [], timesteps=(100,))


@pytest.mark.notebook
def test_training_chapter_probes_its_model(executed_book) -> None:
    result = executed_book.result("06_training")
    probe = json.loads((result.output_dir / "temporal_probe.json").read_text())
    assert probe["timesteps"] == [100, 300, 500, 700] and probe["clips"] > 0
    assert set(probe["losses"]) == set(VARIANTS)
    assert all(len(v) == 4 and all(np.isfinite(v)) for v in probe["losses"].values())
