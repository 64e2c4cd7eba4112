"""Text to video in three stages that can run on their own: captions -> T5 embeddings,
embeddings -> latents, latents -> video.

The stages mirror how Open-Sora is run on real hardware (text encoding, diffusion sampling and
VAE decoding each need a different model in memory), and every stage saves what it produced,
so a job can resume from any of them or re-decode latents without sampling again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from opensora.checkpoint import CheckpointError, save_npz_atomic
from opensora.data.video import to_uint8_frames, write_video
from opensora.models.compiled import compiled_forward
from opensora.models.text_encoder import T5Encoder
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import Preset, build_model, get_preset
from opensora.schedulers.iddpm import IDDPM

IMAGE_FPS = 120  # the fps micro-condition Open-Sora 1.1 gives single images


@dataclass
class TextEmbeddings:
    """Stage 1 output: T5 states and the caption mask for a batch of prompts."""

    prompts: list[str]
    y: np.ndarray  # (B, 1, L, C) float32
    mask: np.ndarray  # (B, L) int32, 1 = real token

    def save(self, path: str | os.PathLike) -> Path:
        save_npz_atomic(path, y=self.y, mask=self.mask, prompts=np.array(self.prompts))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextEmbeddings:
        with np.load(_existing(path, "text embeddings (stage 1 output)")) as data:
            return cls([str(p) for p in data["prompts"]], data["y"], data["mask"])


@dataclass
class Latents:
    """Stage 2 output: sampled latents with the prompts and seeds that made them."""

    prompts: list[str]
    seeds: list[int]
    latents: np.ndarray  # (B, C, T, h, w) float32, VAE-scaled
    fps: int = 8

    def save(self, path: str | os.PathLike) -> Path:
        save_npz_atomic(path, latents=self.latents, prompts=np.array(self.prompts),
                        seeds=np.array(self.seeds), fps=np.array(self.fps))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Latents:
        with np.load(_existing(path, "latents (stage 2 output)")) as data:
            return cls([str(p) for p in data["prompts"]], [int(s) for s in data["seeds"]],
                       data["latents"], int(data["fps"]))


@dataclass
class GeneratedVideo:
    """Stage 3 output for one prompt: frames (T, H, W, 3) uint8 and where they were saved."""

    prompt: str
    seed: int
    frames: np.ndarray
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}; run the earlier stage first")
    return path


def video_file_name(index: int, prompt: str, seed: int, suffix: str = ".mp4") -> str:
    """`000_a-red-circle-moving-left_seed0.mp4`: sortable, readable, safe on every filesystem."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
    return f"{index:03d}_{slug}_seed{seed}{suffix}"


_SHAPE_KEYS = ("in_channels", "patch_size", "hidden_size", "depth", "num_heads",
               "caption_channels", "model_max_length")


def check_model_fits_preset(model: Any, preset: Preset, weights: Path | None) -> None:
    """A checkpoint whose own config disagrees with the preset would sample at the wrong size or
    with the wrong text encoder; say which shapes differ instead."""
    config = getattr(model, "config", {})
    diffs = [f"{key}: checkpoint {config[key]} vs preset {preset.model[key]}"
             for key in _SHAPE_KEYS
             if key in config and key in preset.model
             and np.ravel(config[key]).tolist() != np.ravel(preset.model[key]).tolist()]
    if diffs:
        raise CheckpointError(f"weights {weights} do not fit preset {preset.name!r}: "
                              + "; ".join(diffs) + ". Pick the preset the weights were made for.")


class TextToVideoPipeline:
    """The three Open-Sora models plus the IDDPM sampler, with a call for each stage.

    `mode="graph"` runs the denoiser (the part called at every sampling step) compiled with
    `mindspore.jit`; the text encoder and VAE run once per clip and stay in PyNative.
    """

    def __init__(self, preset: Preset, vae: Any, text_encoder: Any, model: Any, scheduler: Any,
                 num_frames: int | None = None, image_size: tuple[int, int] | None = None,
                 fps: int | None = None, sampler: str = "ddpm", mode: str = "pynative"):
        if mode not in ("pynative", "graph"):
            raise ValueError(f"mode must be 'pynative' or 'graph', got {mode!r}")
        self.preset = preset
        self.vae = vae
        self.text_encoder = text_encoder
        self.model = model
        self.mode = mode
        self.denoiser = compiled_forward(model) if mode == "graph" else model
        self.scheduler = scheduler
        self.num_frames = int(preset.num_frames if num_frames is None else num_frames)
        self.image_size = tuple(int(s) for s in (image_size or preset.image_size))
        self.fps = int(fps or preset.fps)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        factor = tuple(getattr(vae, "patch_size", (1, 8, 8)))[1:]
        if len(self.image_size) != 2 or any(
                s < 1 or s % f for s, f in zip(self.image_size, factor)):
            raise ValueError(
                f"image_size must be (height, width), each a positive multiple of the VAE's "
                f"{factor[0]}x downsampling, got {self.image_size}; e.g. "
                f"{tuple(max(f, round(s / f) * f) for s, f in zip(self.image_size, factor))}")
        self.sampler = sampler
        text_encoder.y_embedder = model.y_embedder  # the learned null caption lives in the model

    # ---- construction

    @classmethod
    def from_preset(cls, preset: str | Preset = "tiny", model_path: str | os.PathLike | None = None,
                    vae_path: str | os.PathLike | None = None,
                    t5_path: str | os.PathLike | None = None,
                    tokenizer_path: str | os.PathLike | None = None,
                    num_sampling_steps: int = 50, cfg_scale: float = 7.0,
                    cfg_channel: int | None = 3, sampler: str = "ddpm",
                    num_frames: int | None = None, image_size: tuple[int, int] | None = None,
                    fps: int | None = None, micro_batch_size: int | None = None,
                    allow_untrained: bool = False, mode: str = "pynative",
                    **model_overrides: Any) -> TextToVideoPipeline:
        """Build every model of a preset, with any asset path overridden (published weights).

        A preset whose transformer weights are missing is an error unless `allow_untrained`,
        because sampling random weights produces noise that looks like a bug.
        """
        preset = get_preset(preset) if isinstance(preset, str) else preset
        vae_path = Path(vae_path) if vae_path else preset.vae_path
        t5_path = Path(t5_path) if t5_path else preset.t5_path
        tokenizer_path = Path(tokenizer_path) if tokenizer_path else (preset.tokenizer_path
                                                                      or t5_path)
        for what, path in (("VAE", vae_path), ("T5", t5_path), ("tokenizer", tokenizer_path)):
            if path is None or not Path(path).exists():
                raise FileNotFoundError(
                    f"{what} weights for preset {preset.name!r} not found at {path}; pass "
                    f"{what.lower()}_path (see book/jobs.md for the published weights)")
        weights = Path(model_path) if model_path else preset.model_path
        if weights is None or not weights.exists():
            if not allow_untrained:
                raise FileNotFoundError(
                    f"no trained {preset.model_type} weights for preset {preset.name!r} at "
                    f"{weights}; train them (make tiny-weights) or pass model_path, or "
                    "allow_untrained=True to sample from random weights")
            weights = None
        try:
            model = build_model(preset, weights, **model_overrides) if weights else build_model(
                preset.with_paths(model_path=None), None, **model_overrides)
        except CheckpointError as exc:
            raise CheckpointError(
                f"weights {weights} do not fit preset {preset.name!r}: {exc}") from None
        check_model_fits_preset(model, preset, weights)
        model.set_train(False)
        vae = VideoAutoencoderKL.from_pretrained(vae_path, micro_batch_size=micro_batch_size)
        vae.set_train(False)
        text_encoder = T5Encoder(t5_path, tokenizer_path,
                                 model_max_length=preset.model_max_length)
        scheduler = IDDPM(num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                          cfg_channel=cfg_channel, noise_schedule=preset.noise_schedule)
        return cls(preset, vae, text_encoder, model, scheduler, num_frames, image_size, fps,
                   sampler, mode)

    # ---- shapes and conditions

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, h, w) of one clip's latent."""
        t, h, w = self.vae.get_latent_size((self.num_frames, *self.image_size))
        return (self.vae.out_channels, t, h, w)

    def micro_conditions(self, batch: int) -> dict[str, ms.Tensor]:
        """STDiT2's size / aspect-ratio / length / fps conditions (STDiT takes none)."""
        if self.preset.model_type != "STDiT2":
            return {}
        height, width = self.image_size

        def full(value: float) -> ms.Tensor:
            return ms.Tensor(np.full((batch,), value, np.float32))

        fps = self.fps if self.num_frames > 1 else IMAGE_FPS
        return {"height": full(height), "width": full(width), "num_frames": full(self.num_frames),
                "ar": full(height / width), "fps": full(fps)}

    # ---- stage 1

    def encode_prompts(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = list(prompts)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
        encoded = self.text_encoder.encode(prompts)
        return TextEmbeddings(prompts, encoded["y"].asnumpy().astype(np.float32),
                              encoded["mask"].asnumpy().astype(np.int32))

    # ---- stage 2

    def sample_latents(self, embeddings: TextEmbeddings, seeds: Sequence[int] | None = None,
                       progress: bool = False, x_cond: np.ndarray | None = None,
                       x_mask: np.ndarray | None = None,
                       callback: Callable[[int, dict[str, Any]], None] | None = None) -> Latents:
        """Sample one latent per prompt, each from its own seed, so a prompt's result does not
        depend on what else is in the batch.

        `x_cond` (B, C, T, h, w) and `x_mask` (B, T) condition frames (mask False keeps the
        frame from x_cond), as chapter 5's mask strategies produce them.
        """
        count = len(embeddings.prompts)
        seeds = list(range(count)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} prompts")
        shape = self.latent_shape()
        outputs = []
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            z = rng.standard_normal((1, *shape)).astype(np.float32)
            mask = None
            extra = self.micro_conditions(2)
            if x_mask is not None:
                frame_mask = np.asarray(x_mask[i : i + 1], bool)
                z = np.where(frame_mask[:, None, :, None, None], z, x_cond[i : i + 1])
                mask = ms.Tensor(frame_mask)
                extra["x_mask"] = ms.Tensor(np.concatenate([frame_mask, frame_mask]))
            model_args = {"y": ms.Tensor(embeddings.y[i : i + 1]),
                          "mask": ms.Tensor(embeddings.mask[i : i + 1])}
            step_callback = None if callback is None else (lambda out, i=i: callback(i, out))
            sample = self.scheduler.sample_from_embeddings(
                self.denoiser, ms.Tensor(z), model_args, self.text_encoder.null(1),
                additional_args=extra, mask=mask, generator=rng, progress=progress,
                sampler=self.sampler, callback=step_callback)
            outputs.append(sample.asnumpy())
        return Latents(list(embeddings.prompts), seeds, np.concatenate(outputs), self.fps)

    # ---- stage 3

    def decode(self, latents: Latents, output_dir: str | os.PathLike | None = None,
               fmt: str = "mp4") -> list[GeneratedVideo]:
        videos = []
        for i, (prompt, seed) in enumerate(zip(latents.prompts, latents.seeds)):
            clip = self.vae.decode(ms.Tensor(latents.latents[i : i + 1])).asnumpy()[0]
            frames = to_uint8_frames(clip)
            path = None
            if output_dir is not None:
                path = write_video(Path(output_dir) / video_file_name(i, prompt, seed, f".{fmt}"),
                                   frames, latents.fps)
            videos.append(GeneratedVideo(prompt, seed, frames, path))
        return videos

    # ---- all three

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                 output_dir: str | os.PathLike | None = None, fmt: str = "mp4",
                 progress: bool = False) -> list[GeneratedVideo]:
        """Run all three stages; with `output_dir`, each stage's result is saved there."""
        embeddings = self.encode_prompts(prompts)
        if output_dir is not None:
            embeddings.save(Path(output_dir) / "text_embeddings.npz")
        latents = self.sample_latents(embeddings, seeds, progress=progress)
        if output_dir is not None:
            latents.save(Path(output_dir) / "latents.npz")
        return self.decode(latents, output_dir, fmt)
