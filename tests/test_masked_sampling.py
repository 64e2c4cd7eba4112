"""Sampling under a frame mask: Open-Sora 1.1's per-step rules for condition and edited frames."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import ops
from numerics import assert_f32_close

from opensora.mask_strategy import apply_mask_strategy
from opensora.schedulers.iddpm import IDDPM
from opensora.schedulers.masked_sampling import sample_with_frame_mask, step_masks


def _reference(frames: int, offset: float = 0.0) -> np.ndarray:
    """(4, T, 2, 3) whose every value names its frame: frame f holds offset + f."""
    return np.broadcast_to((offset + np.arange(frames, dtype=np.float32))[None, :, None, None],
                           (4, frames, 2, 3)).copy()


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
    # 4 sampling steps of a few elementwise ops each, on latents that grow to a few hundred
    assert_f32_close(masked.asnumpy(), plain.asnumpy(), 64)


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


