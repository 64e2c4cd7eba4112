"""The mask_strategy grammar, references, applying a strategy to latents, long-video loops."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from opensora.data.video import write_video
from opensora.mask_strategy import (
    Conditioning,
    MaskOp,
    MaskStrategy,
    MaskStrategyError,
    apply_mask_strategy,
    collect_references_batch,
    loop_generate,
    parse_mask_strategy,
)

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



def test_strategy_dataclass_is_built_from_ops() -> None:
    strategy = MaskStrategy((MaskOp(0, 0, 0, 0, 2),)).with_op(MaskOp(1, 1))
    assert str(strategy) == "0,0,0,0,2,0;1,1,0,0,1,0"
