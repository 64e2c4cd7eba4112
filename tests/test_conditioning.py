"""Mask strategies: the grammar, applying it to latents, masked sampling, loops, MaskGenerator."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops
from PIL import Image

from opensora.conditioning import (
    DEFAULT_MASK_RATIOS,
    LEGACY_MASK_NAMES,
    MASK_TYPES,
    Conditioning,
    MaskGenerator,
    MaskOp,
    MaskStrategy,
    MaskStrategyError,
    apply_mask_strategy,
    collect_references_batch,
    loop_generate,
    parse_mask_strategy,
    sample_with_frame_mask,
    step_masks,
)
from opensora.data.video import write_video
from opensora.schedulers.iddpm import IDDPM

# ---------------------------------------------------------------------------------------------
# grammar


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", MaskOp(0, 0, 0, 0, 1, 0.0)),
        ("1,2", MaskOp(1, 2, 0, 0, 1, 0.0)),
        ("0,0,-1", MaskOp(0, 0, -1, 0, 1, 0.0)),
        ("0,1,3,-2", MaskOp(0, 1, 3, -2, 1, 0.0)),
        ("0,0,0,0,8", MaskOp(0, 0, 0, 0, 8, 0.0)),
        (" 2 , 1 , 4 , 5 , 3 , 0.4 ", MaskOp(2, 1, 4, 5, 3, 0.4)),
    ],
)
def test_missing_fields_take_open_sora_defaults(text: str, expected: MaskOp) -> None:
    strategy = parse_mask_strategy(text)
    assert strategy.ops == (expected,)


def test_several_entries_keep_their_order_and_round_trip() -> None:
    text = "0,0,0,0,1;0,1,-1,-1,1;1,0,0,4,2,0.5"
    strategy = parse_mask_strategy(text)
    assert [op.target_start for op in strategy] == [0, -1, 4]
    assert strategy.max_ref_id == 1
    assert parse_mask_strategy(str(strategy)) == strategy
    assert [op.ref_id for op in strategy.for_loop(0)] == [0, 1]
    assert strategy.for_loop(1) == (MaskOp(1, 0, 0, 4, 2, 0.5),)


@pytest.mark.parametrize("text", [None, "", "   "])
def test_blank_strategy_is_plain_generation(text: str | None) -> None:
    assert len(parse_mask_strategy(text)) == 0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("0,0,0,0,1,0,7", "has 7 fields"),
        ("0;;1", "entry 1 is empty"),
        ("0;", "entry 1 is empty"),
        ("0,a", "field 'ref_id' must be an integer, got 'a'"),
        ("0,0,0,0,1.5", "field 'length' must be an integer"),
        ("0,0,0,0,1,half", "field 'edit_ratio' must be a number"),
        ("0,0,0,0,0", "length must be >= 1"),
        ("-1", "loop_id must be >= 0"),
        ("0,-1", "ref_id must be >= 0"),
        ("0,0,0,0,1,1.5", "edit_ratio must be in [0, 1]"),
        ("0,0,0,0,1,nan", "edit_ratio must be in [0, 1]"),
    ],
)
def test_malformed_strings_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(MaskStrategyError, match=None) as info:
        parse_mask_strategy(text)
    assert fragment in str(info.value)


def test_non_string_strategy_is_rejected() -> None:
    with pytest.raises(MaskStrategyError, match="must be a string"):
        parse_mask_strategy(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# applying a strategy


def _latents(batch: int = 1, frames: int = 8) -> np.ndarray:
    return np.full((batch, 4, frames, 2, 3), -7.0, np.float32)


def _reference(frames: int, offset: float = 0.0) -> np.ndarray:
    """(4, T, 2, 3) whose every value names its frame: frame f holds offset + f."""
    return np.broadcast_to((offset + np.arange(frames, dtype=np.float32))[None, :, None, None],
                           (4, frames, 2, 3)).copy()


def _frame_values(z: np.ndarray, b: int = 0) -> list[float]:
    return [float(v) for v in z[b, 0, :, 0, 0]]


def test_apply_copies_frames_and_sets_edit_ratio() -> None:
    z = _latents()
    refs = [[_reference(5, 100.0), _reference(3, 200.0)]]
    out = apply_mask_strategy(z, refs, ["0,0,1,2,3;0,1,-1,-1,1,0.25"])
    assert _frame_values(out.z) == [-7, -7, 101, 102, 103, -7, -7, 202]
    np.testing.assert_array_equal(out.frame_mask[0], [1, 1, 0, 0, 0, 1, 1, 0.25])
    np.testing.assert_array_equal(out.x_mask[0], [1, 1, 0, 0, 0, 1, 1, 0])
    assert (z == -7).all(), "the input latent must not be modified"
    # every channel and pixel of a copied frame is the reference's
    np.testing.assert_array_equal(out.z[0, :, 2:5], refs[0][0][:, 1:4])


def test_apply_uses_only_the_current_loop_and_each_samples_own_strategy() -> None:
    z = _latents(batch=2, frames=4)
    refs = [[_reference(4, 10.0)], []]
    out = apply_mask_strategy(z, refs, ["0;1,0,3,3", None], loop_i=1)
    assert _frame_values(out.z, 0) == [-7, -7, -7, 13]
    assert _frame_values(out.z, 1) == [-7] * 4
    np.testing.assert_array_equal(out.x_mask, [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_later_entries_overwrite_earlier_ones() -> None:
    out = apply_mask_strategy(_latents(frames=4), [[_reference(4), _reference(4, 50.0)]],
                              ["0,0,0,0,2,0.5;0,1,0,1,1"])
    assert _frame_values(out.z) == [0, 50, -7, -7]
    np.testing.assert_array_equal(out.frame_mask[0], [0.5, 0.0, 1, 1])


@pytest.mark.parametrize(
    "strategy, fragment",
    [
        ("0,1", "uses reference 1 but 1 reference(s) were given"),
        ("0,0,3,0,2", "reads reference frames [3, 3+2) but reference 0 has 4"),
        ("0,0,-5", "reads reference frames [-5, -5+1)"),
        ("0,0,0,7,2", "writes frames [7, 7+2) but the latent has 8"),
        ("0,0,0,-9", "writes frames [-9, -9+1)"),
    ],
)
def test_apply_rejects_missing_references_and_out_of_range_frames(strategy: str,
                                                                  fragment: str) -> None:
    with pytest.raises(MaskStrategyError) as info:
        apply_mask_strategy(_latents(), [[_reference(4)]], [strategy])
    assert fragment in str(info.value)


def test_apply_checks_batch_and_reference_shapes() -> None:
    with pytest.raises(MaskStrategyError, match="one mask strategy and one reference list"):
        apply_mask_strategy(_latents(batch=2), [[_reference(4)]], ["0"])
    wrong_size = np.zeros((4, 2, 5, 5), np.float32)
    with pytest.raises(MaskStrategyError, match=r"expected \(4, T, 2, 3\)"):
        apply_mask_strategy(_latents(), [[wrong_size]], ["0"])


def test_apply_accepts_mindspore_latents() -> None:
    out = apply_mask_strategy(ms.Tensor(_latents(frames=3)), [[_reference(1, 5.0)]], ["0"])
    assert isinstance(out, Conditioning) and _frame_values(out.z) == [5, -7, -7]


# ---------------------------------------------------------------------------------------------
# edit_ratio: what a frame-mask value does at each step


def test_step_masks_follow_open_sora() -> None:
    frame_mask = np.array([[1.0, 0.0, 0.5, 0.25]], np.float32)  # S = 8: k = 8, 0, 4, 2
    table = {t: step_masks(frame_mask, t, 8) for t in range(8)}
    for t, masks in table.items():
        assert masks.x_mask[0, 0] and not masks.keep[0, 0] and not masks.renoise[0, 0]
        # edit ratio 0: clean condition at every step but the last, re-noised at t = 0
        assert masks.keep[0, 1] == (t > 0) and masks.renoise[0, 1] == (t == 0)
        assert not masks.x_mask[0, 1]
        # edit ratio 0.5: kept above k = 4, re-noised at 4, generated below
        assert masks.keep[0, 2] == (t > 4) and masks.renoise[0, 2] == (t == 4)
        assert masks.x_mask[0, 2] == (t < 4)
        assert masks.x_mask[0, 3] == (t < 2) and masks.renoise[0, 3] == (t == 2)


class _RecordingModel:
    """A stand-in STDiT2: epsilon = 0.1 x, variance channels 0; remembers inputs."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.x_masks: list[np.ndarray | None] = []

    def __call__(self, x, timestep, y, mask=None, x_mask=None, **kwargs):
        self.inputs.append(x.asnumpy())
        self.x_masks.append(None if x_mask is None else x_mask.asnumpy())
        return ops.concat([0.1 * x, ops.zeros_like(x)], axis=1)


def _text_args(batch: int) -> tuple[dict, ms.Tensor]:
    rng = np.random.default_rng(3)
    y = ms.Tensor(rng.standard_normal((batch, 1, 5, 8)).astype(np.float32))
    y_null = ms.Tensor(rng.standard_normal((batch, 1, 5, 8)).astype(np.float32))
    return {"y": y, "mask": ms.Tensor(np.ones((batch, 5), np.int32))}, y_null


def test_all_ones_frame_mask_samples_like_the_plain_scheduler() -> None:
    diffusion = IDDPM(num_sampling_steps=4)
    z = np.random.default_rng(0).standard_normal((1, 4, 3, 2, 2)).astype(np.float32)
    model_args, y_null = _text_args(1)
    plain = diffusion.sample_from_embeddings(_RecordingModel(), ms.Tensor(z), model_args, y_null,
                                             generator=7, progress=False)
    masked = sample_with_frame_mask(diffusion, _RecordingModel(), z, np.ones((1, 3)),
                                    model_args, y_null, generator=7)
    np.testing.assert_allclose(masked.asnumpy(), plain.asnumpy(), rtol=0, atol=1e-6)


def test_sampling_keeps_conditions_and_renoises_edited_frames_once() -> None:
    steps = 8
    diffusion = IDDPM(num_sampling_steps=steps)
    refs = [[_reference(2, 0.5) * 0.1]]
    z0 = np.random.default_rng(1).standard_normal((1, 4, 4, 2, 3)).astype(np.float32)
    cond = apply_mask_strategy(z0, refs, ["0,0,0,0,1;0,0,1,3,1,0.5"])
    model = _RecordingModel()
    model_args, y_null = _text_args(1)
    out = sample_with_frame_mask(diffusion, model, cond.z, cond.frame_mask, model_args, y_null,
                                 generator=2)
    assert out.shape == (1, 4, 4, 2, 3) and len(model.inputs) == steps
    ref0, ref1 = refs[0][0][:, 0], refs[0][0][:, 1]
    for i, (x, x_mask) in enumerate(zip(model.inputs, model.x_masks)):
        t = steps - 1 - i
        assert x_mask.shape == (2, 4)  # doubled for classifier-free guidance
        np.testing.assert_array_equal(x_mask[0], [False, True, True, t < 4])
        if t > 0:  # frame 0 (edit ratio 0) reaches the model clean at every step but the last
            np.testing.assert_array_equal(x[0, :, 0], ref0)
        else:
            assert not np.array_equal(x[0, :, 0], ref0)
        if t > 4:  # frame 3 (edit ratio 0.5) is clean down to k = 4, then re-noised
            np.testing.assert_array_equal(x[0, :, 3], ref1)
        else:  # re-noised at t = 4, then generated from there
            assert 0 < np.abs(x[0, :, 3] - ref1).max()
    # the condition frame comes out close to its reference (one t = 0 denoising step)
    assert np.abs(out.asnumpy()[0, :, 0] - ref0).max() < 0.05


# ---------------------------------------------------------------------------------------------
# loops


def _sampler(calls: list):
    """Generated frames become loop_i + 1; conditioned frames are returned as given."""

    def sample(conditioning: Conditioning, loop_i: int) -> np.ndarray:
        calls.append((loop_i, conditioning))
        x_mask = conditioning.x_mask[:, None, :, None, None]
        return np.where(x_mask, np.float32(loop_i + 1), conditioning.z)

    return sample


def test_loop_length_and_no_duplicate_frames() -> None:
    calls: list = []
    shape = (2, 4, 8, 2, 3)
    result = loop_generate(_sampler(calls), shape, loops=3, condition_frame_length=3,
                           generator=0)
    assert result.video.shape == (2, 4, 8 + 2 * (8 - 3), 2, 3)
    assert [loop_i for loop_i, _ in calls] == [0, 1, 2]
    # loop 1 starts from loop 0's last 3 frames; its new frames follow them without repeats
    np.testing.assert_array_equal(calls[1][1].z[:, :, :3], result.segments[0][:, :, -3:])
    np.testing.assert_array_equal(calls[1][1].x_mask, np.tile([False] * 3 + [True] * 5, (2, 1)))
    expected_frames = [1] * 8 + [2] * 5 + [3] * 5
    assert _frame_values(result.video) == expected_frames
    assert str(result.strategies[0]) == "1,0,-3,0,3,0;2,1,-3,0,3,0"


def test_loop_keeps_the_user_strategy_for_loop_zero_and_edit_ratio() -> None:
    calls: list = []
    refs = [[_reference(1, 40.0)]]
    result = loop_generate(_sampler(calls), (1, 4, 6, 2, 3), refs, ["0"], loops=2,
                           condition_frame_length=2, condition_frame_edit=0.25, generator=1)
    assert _frame_values(result.segments[0]) == [40, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(calls[1][1].frame_mask[0], [0.25, 0.25, 1, 1, 1, 1])
    assert len(refs[0]) == 1, "the caller's reference list must not grow"


def test_loop_reencode_hook_and_argument_checks() -> None:
    seen: list = []

    def reencode(latents: np.ndarray) -> np.ndarray:
        seen.append(latents.shape)
        return latents + 100.0

    calls: list = []
    result = loop_generate(_sampler(calls), (1, 4, 4, 2, 3), loops=2, condition_frame_length=1,
                           reencode=reencode)
    assert seen == [(1, 4, 4, 2, 3)] and calls[1][1].z[0, 0, 0, 0, 0] == 101.0
    assert len(result.references[0]) == 1 and result.references[0][0][0, 0, 0, 0] == 101.0
    with pytest.raises(ValueError, match="condition_frame_length must be in"):
        loop_generate(_sampler([]), (1, 4, 4, 2, 3), loops=2, condition_frame_length=4)
    with pytest.raises(ValueError, match="loops must be >= 1"):
        loop_generate(_sampler([]), (1, 4, 4, 2, 3), loops=0)
    with pytest.raises(ValueError, match="sample_fn returned shape"):
        loop_generate(lambda c, i: c.z[:, :, :2], (1, 4, 4, 2, 3))


# ---------------------------------------------------------------------------------------------
# references from files


class _PoolingVAE:
    """A per-frame stand-in VAE: 4 latent channels, 8x average pooling."""

    def encode(self, x: ms.Tensor) -> ms.Tensor:
        v = x.asnumpy()
        b, c, t, h, w = v.shape
        pooled = v.reshape(b, c, t, h // 8, 8, w // 8, 8).mean(axis=(4, 6))
        return ms.Tensor(np.concatenate([pooled, pooled[:, :1]], axis=1))


def test_collect_references_reads_images_and_videos(tmp_path) -> None:
    image = tmp_path / "still.png"
    Image.fromarray(np.full((40, 48, 3), 255, np.uint8)).save(image)
    video = tmp_path / "clip.mp4"
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    write_video(video, frames, fps=8)
    batch = collect_references_batch([f"{image};{video}", None], _PoolingVAE(), (16, 16))
    assert [r.shape for r in batch[0]] == [(4, 1, 2, 2), (4, 5, 2, 2)] and batch[1] == []
    np.testing.assert_allclose(batch[0][0], 1.0)
    out = apply_mask_strategy(_latents(frames=3)[:, :, :, :2, :2], batch[:1], ["0;0,1,-1,-1"])
    np.testing.assert_allclose(out.z[0, :, 0], 1.0)
    with pytest.raises(ValueError, match="not found"):
        collect_references_batch([str(tmp_path / "missing.mp4")], _PoolingVAE(), (16, 16))


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


def test_strategy_dataclass_is_built_from_ops() -> None:
    strategy = MaskStrategy((MaskOp(0, 0, 0, 0, 2),)).with_op(MaskOp(1, 1))
    assert str(strategy) == "0,0,0,0,2,0;1,1,0,0,1,0"
