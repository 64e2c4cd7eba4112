"""Open-Sora 1.1's sampling loop with condition frames: IDDPM steps under a float frame mask.

What a frame-mask value m does during sampling with S steps (Open-Sora's masked `p_sample`):
let k = int(m * S). At steps t > k the frame is a clean condition (the model sees it with
timestep 0, `x_mask` False, and the step leaves it unchanged); at t == k it is re-noised to
level k; below k it is generated like any other frame. So m = 0 keeps the reference, m = 1
generates the frame (starting from the reference in z rather than from noise), and 0 < m < 1
is SDEdit-style editing with strength m. `opensora.mask_strategy` builds the masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import ops

from opensora.schedulers.iddpm import forward_with_cfg


@dataclass(frozen=True)
class StepMasks:
    """What the frame mask means at one sampling step, each (B, T) bool.

    renoise: replace the frame with its reference noised to this step (q_sample);
    x_mask: the model treats the frame as generated (else as a clean condition, timestep 0);
    keep: the step's output keeps the frame as it came in.
    """

    renoise: np.ndarray
    x_mask: np.ndarray
    keep: np.ndarray


def step_masks(frame_mask: np.ndarray, t: int, num_timesteps: int) -> StepMasks:
    """Open-Sora's per-step reading of a float frame mask (k = int(mask * S), compared to t)."""
    frame_mask = np.asarray(frame_mask, dtype=np.float32)
    mask_t = (frame_mask * np.float32(num_timesteps)).astype(np.int32)
    return StepMasks(renoise=mask_t == t, x_mask=mask_t > t, keep=mask_t < t)


def _frames_5d(mask: np.ndarray, batch: int) -> Any:
    """(B, T) bool -> (batch, 1, T, 1, 1) Tensor, tiled when CFG doubled the batch."""
    if mask.shape[0] != batch:
        mask = np.tile(mask, (batch // mask.shape[0], 1))
    return ms.Tensor(mask[:, None, :, None, None])


def masked_p_sample(diffusion: Any, model: Callable[..., Any], x: Any, t: int,
                    frame_mask: np.ndarray, noise: Any, renoise_noise: Any | None = None,
                    model_kwargs: dict[str, Any] | None = None,
                    clip_denoised: bool = False) -> dict[str, Any]:
    """One ancestral step x_t -> x_{t-1} of `diffusion` (an `IDDPM`) under a float frame mask.

    `x` is (N, C, T, h, w) Tensor (N may be twice the mask's batch under CFG), `t` the respaced
    step; `renoise_noise` (like x) is needed only when some frame is re-noised at this step.
    """
    masks = step_masks(frame_mask, t, diffusion.num_timesteps)
    n = x.shape[0]
    t_tensor = ms.Tensor(np.full((n,), t, dtype=np.int32))
    x0 = x
    if masks.renoise.any():
        if renoise_noise is None:
            raise ValueError(f"step {t} re-noises edited frames: pass renoise_noise")
        x = ops.where(_frames_5d(masks.renoise, n), diffusion.q_sample(x0, t_tensor,
                                                                        renoise_noise), x0)
    kwargs = dict(model_kwargs or {})
    x_mask = masks.x_mask if masks.x_mask.shape[0] == n else np.tile(masks.x_mask, (2, 1))
    kwargs["x_mask"] = ms.Tensor(x_mask)
    out = diffusion.p_mean_variance(model, x, t_tensor, clip_denoised, None, kwargs)
    sample = out["mean"]
    if t != 0:
        sample = sample + ops.exp(0.5 * out["log_variance"]) * noise
    sample = ops.where(_frames_5d(masks.keep, n), x0, sample)
    return {"sample": sample, "pred_xstart": out["pred_xstart"], "t": t}


def sample_with_frame_mask(diffusion: Any, model: Callable[..., Any], z: Any,
                           frame_mask: np.ndarray, model_args: Mapping[str, Any], y_null: Any,
                           additional_args: Mapping[str, Any] | None = None,
                           generator: np.random.Generator | int | None = None,
                           callback: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Guided ddpm sampling from x_T = z (B, C, T, h, w) with Open-Sora's frame-mask rules.

    Same inputs as `IDDPM.sample_from_embeddings` plus the float `frame_mask` (B, T); with an
    all-ones mask and the same seed it returns the same latents. Returns a (B, ...) Tensor.
    """
    rng = generator if isinstance(generator, np.random.Generator) \
        else np.random.default_rng(generator)
    z = ms.Tensor(np.asarray(z.asnumpy() if hasattr(z, "asnumpy") else z, np.float32))
    n = z.shape[0]
    frame_mask = np.asarray(frame_mask, dtype=np.float32)
    if frame_mask.shape != (n, z.shape[2]):
        raise ValueError(f"frame_mask must be (B, T) = {(n, z.shape[2])}, got {frame_mask.shape}")
    kwargs = dict(model_args)
    kwargs["y"] = ops.concat([model_args["y"], y_null], axis=0)
    if kwargs.get("mask") is not None:
        kwargs["mask"] = ops.concat([kwargs["mask"], kwargs["mask"]], axis=0)
    kwargs.update(additional_args or {})
    cfg_scale, cfg_channel = diffusion.cfg_scale, diffusion.cfg_channel

    def guided(x: Any, timestep: Any, **kw: Any) -> Any:
        return forward_with_cfg(model, x, timestep, kw.pop("y"), cfg_scale, cfg_channel, **kw)

    img = ops.concat([z, z], axis=0).astype(ms.float32)
    shape = tuple(img.shape)
    for t in range(diffusion.num_timesteps - 1, -1, -1):
        noise = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
        renoise = None
        if step_masks(frame_mask, t, diffusion.num_timesteps).renoise.any():
            renoise = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
        out = masked_p_sample(diffusion, guided, img, t, frame_mask, noise, renoise, kwargs)
        if callback is not None:
            callback(out)
        img = out["sample"]
    return img[:n]
