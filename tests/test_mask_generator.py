"""Open-Sora 1.1's training MaskGenerator: mask types, ratios, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from opensora.data.mask_generator import (
    DEFAULT_MASK_RATIOS,
    LEGACY_MASK_NAMES,
    MASK_TYPES,
    MaskGenerator,
)

# ---------------------------------------------------------------------------------------------
# MaskGenerator


def test_default_ratios_are_open_sora_1_1s() -> None:
    generator = MaskGenerator()
    assert generator.mask_ratios == DEFAULT_MASK_RATIOS
    assert sum(DEFAULT_MASK_RATIOS.values()) == pytest.approx(1.0)
    legacy = {f"mask_{k}" if k != "identity" else "mask_no": v
              for k, v in DEFAULT_MASK_RATIOS.items()}
    assert set(legacy) <= set(LEGACY_MASK_NAMES)
    assert MaskGenerator(legacy).mask_ratios == DEFAULT_MASK_RATIOS


def test_type_frequencies_match_ratios() -> None:
    ratios = {"identity": 0.5, "quarter_head": 0.1, "image_tail": 0.15, "intepolate": 0.05,
              "random": 0.2}
    generator = MaskGenerator(ratios, seed=11)
    draws = 20000
    names = [generator.draw_type() for _ in range(draws)]
    observed = np.array([names.count(n) for n in ratios], np.float64)
    expected = np.array(list(ratios.values())) * draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, f"chi-square {chi2:.1f} with 4 degrees of freedom (p < 0.0005)"
    assert set(names) == set(ratios)


def test_mask_fraction_follows_default_ratios() -> None:
    masks = MaskGenerator(seed=5).get_masks(4000, 16)
    assert masks.shape == (4000, 16) and masks.dtype == bool
    unmasked = masks.all(axis=1).mean()
    assert abs(unmasked - 0.75) < 0.03


@pytest.mark.parametrize("num_frames", [4, 9, 16])
def test_each_type_conditions_the_right_frames(num_frames: int) -> None:
    gen = MaskGenerator(seed=0)
    quarter = max(1, num_frames // 4)
    for _ in range(50):
        for name in MASK_TYPES:
            mask = gen.make_mask(name, num_frames)
            assert mask.shape == (num_frames,) and mask.any()
            cond = np.flatnonzero(~mask)
            if name == "identity":
                assert cond.size == 0
            elif name == "image_head":
                assert cond.tolist() == [0]
            elif name == "image_tail":
                assert cond.tolist() == [num_frames - 1]
            elif name == "image_head_tail":
                assert cond.tolist() == [0, num_frames - 1]
            elif name == "image_random":
                assert cond.size == 1
            elif name == "quarter_head":
                assert 1 <= cond.size <= quarter and cond.tolist() == list(range(cond.size))
            elif name == "quarter_tail":
                assert 1 <= cond.size <= quarter and cond[0] == num_frames - cond.size
            elif name == "quarter_head_tail":
                half = cond.size // 2
                assert cond[:half].tolist() == list(range(half))
                assert cond[half:].tolist() == list(range(num_frames - half, num_frames))
            elif name == "quarter_random":
                assert 1 <= cond.size <= quarter and np.all(np.diff(cond) == 1)
            elif name == "intepolate":
                assert cond.tolist() in (list(range(0, num_frames, 2)),
                                         list(range(1, num_frames, 2)))
            elif name == "random":
                assert cond.size < num_frames


def test_single_frame_is_never_masked_and_seeds_reproduce() -> None:
    assert MaskGenerator({"image_head": 1.0}).get_masks(3, 1).all()
    a = MaskGenerator({"random": 0.5, "quarter_random": 0.5}, seed=4).get_masks(8, 12)
    b = MaskGenerator({"random": 0.5, "quarter_random": 0.5}, seed=4).get_masks(8, 12)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "ratios, fragment",
    [
        ({"identity": 0.5, "image_head": 0.4}, "must sum to 1, got 0.9"),
        ({"image_head": 0.4}, "add 'identity': 0.6"),
        ({"identity": 0.7, "image_head": 0.6}, "must sum to 1"),
        ({"identity": 0.9, "interpolate": 0.1}, "unknown mask type 'interpolate'"),
        ({"identity": 1.2, "image_head": -0.2}, "must be in [0, 1]"),
        ({"identity": 0.5, "mask_no": 0.5}, "given twice"),
    ],
)
def test_bad_ratios_are_rejected(ratios: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        MaskGenerator(ratios)
    assert fragment in str(info.value)


def test_unknown_type_in_make_mask_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown mask type 'quarter'"):
        MaskGenerator().make_mask("quarter", 8)


