"""Sampling a model under training: preview clips and the held-out evaluation.

The same guided IDDPM sampler as `opensora.pipeline`, on caption features already computed
(numpy in, numpy out), so callbacks and the training chapter can sample the weights in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from mindspore import Tensor, nn, ops

from opensora.evaluation import score_clips
from opensora.models.compiled import compiled_forward
from opensora.schedulers.iddpm import IDDPM
from opensora.train.step import takes_micro_conditions


def micro_condition_arrays(batch: int, num_frames: int, image_size: tuple[int, int],
                           fps: float) -> dict[str, np.ndarray]:
    height, width = image_size
    return dict(num_frames=np.full(batch, num_frames, np.float32),
                height=np.full(batch, height, np.float32),
                width=np.full(batch, width, np.float32),
                ar=np.full(batch, height / width, np.float32),
                fps=np.full(batch, fps, np.float32))


def sample_latents(model: nn.Cell, y: np.ndarray, mask: np.ndarray, latent_shape: Sequence[int],
                   image_size: tuple[int, int], fps: float, num_sampling_steps: int = 50,
                   cfg_scale: float = 4.0, seed: int = 0, progress: bool = False,
                   graph: bool = False, noise_schedule: str = "linear") -> np.ndarray:
    """Guided IDDPM sampling from caption features y (B, L, C) / mask (B, L): latents
    (B, C, T, h, w). The null caption is the model's learned one, as in Open-Sora. `graph`
    runs the denoiser compiled (`opensora.models.compiled`); `noise_schedule` must be the one
    the model was trained under (`Preset.noise_schedule`)."""
    was_training = model.training
    model.set_train(False)
    y = np.asarray(y, np.float32)
    if y.ndim == 3:
        y = y[:, None]
    batch = y.shape[0]
    scheduler = IDDPM(num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                      noise_schedule=noise_schedule)
    null = ops.tile(model.y_embedder.y_embedding[None, None], (batch, 1, 1, 1))
    rng = np.random.default_rng(seed)
    z = Tensor(rng.standard_normal((batch, *latent_shape)).astype(np.float32))
    args: dict[str, Any] = {"y": Tensor(y), "mask": Tensor(np.asarray(mask, np.int32))}
    if takes_micro_conditions(model):
        micro = micro_condition_arrays(2 * batch, latent_shape[1], image_size, fps)
        args.update({k: Tensor(v) for k, v in micro.items()})
    denoiser = compiled_forward(model) if graph else model
    out = scheduler.sample_from_embeddings(denoiser, z, args, null, generator=rng,
                                           progress=progress)
    model.set_train(was_training)
    return out.asnumpy()


def decode_latents(vae: Any, latents: np.ndarray) -> np.ndarray:
    """Latents -> clips (B, 3, T, H, W) in [-1, 1] through the video VAE."""
    return np.clip(vae.decode(Tensor(np.asarray(latents, np.float32))).asnumpy(), -1.0, 1.0)


def caption_embeddings(text_encoder: Any, captions: Sequence[str]) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """T5 features (B, L, C) and mask (B, L) of captions, as numpy."""
    out = text_encoder.encode(list(captions))
    return out["y"].asnumpy()[:, 0], out["mask"].asnumpy()


def evaluate_captions(model: nn.Cell, vae: Any, text_encoder: Any, captions: Sequence[str],
                      num_frames: int, image_size: tuple[int, int], fps: float = 8,
                      num_sampling_steps: int = 50, cfg_scale: float = 4.0, seed: int = 0,
                      batch_size: int = 4, graph: bool = False,
                      noise_schedule: str = "linear") -> tuple[Any, np.ndarray]:
    """Sample one clip per caption and score it (`opensora.evaluation`); `graph` samples with
    the compiled denoiser, under the model's `noise_schedule`."""
    latent_channels = getattr(vae, "out_channels", 4)
    factor = getattr(vae, "patch_size", (1, 8, 8))
    latent_shape = (latent_channels, num_frames, image_size[0] // factor[1],
                    image_size[1] // factor[2])
    clips = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        y, mask = caption_embeddings(text_encoder, chunk)
        latents = sample_latents(model, y, mask, latent_shape, image_size, fps,
                                 num_sampling_steps, cfg_scale, seed + start, graph=graph,
                                 noise_schedule=noise_schedule)
        clips.extend(decode_latents(vae, latents))
    clips = np.stack(clips)
    return score_clips(clips, captions), clips
