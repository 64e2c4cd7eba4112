"""Conditioning on reference frames: Open-Sora 1.1's mask strategies, at inference and training.

Open-Sora 1.1 turns image-to-video, video extension, interpolation, editing and long videos into
one mechanism: some latent frames are *given* (copied from an encoded reference) and the rest
are generated. At inference a `mask_strategy` string says which frames to copy; in training a
`MaskGenerator` picks random frames to leave clean, so the model learns to continue them.

The `mask_strategy` grammar (Open-Sora v1.1.0 `scripts/inference.py`): entries separated by
``;``, each ``loop_id,ref_id,ref_start,target_start,length,edit_ratio``. Missing trailing
fields default to ``ref_id=0, ref_start=0, target_start=0, length=1, edit_ratio=0``, so ``"0"``
means "in loop 0, put frame 0 of reference 0 at frame 0" (image-to-video). Negative starts
count from the end, as Python indices do. Each copied frame gets a *frame mask* value
equal to its edit ratio; free frames get 1.

What a frame-mask value m does during sampling with S steps (Open-Sora's `p_sample`): let
k = int(m * S). At steps t > k the frame is a clean condition (the model sees it with
timestep 0, `x_mask` False, and the step leaves it unchanged); at t == k it is re-noised to
level k; below k it is generated like any other frame. So m = 0 keeps the reference, m = 1
generates the frame (starting from the reference in z rather than from noise), and
0 < m < 1 is SDEdit-style editing with strength m.

Arrays: everything here is numpy (float32 latents (B, C, T, h, w), (B, T) masks), except the
two model boundaries, which take and return `mindspore.Tensor`: the VAE (`encode_reference`)
and the diffusion sampler (`masked_p_sample`, `sample_with_frame_mask`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_MASK_RATIOS",
    "LEGACY_MASK_NAMES",
    "MASK_TYPES",
    "Conditioning",
    "LoopResult",
    "MaskGenerator",
    "MaskOp",
    "MaskStrategy",
    "MaskStrategyError",
    "StepMasks",
    "apply_mask_strategy",
    "collect_references_batch",
    "encode_reference",
    "loop_generate",
    "masked_p_sample",
    "parse_mask_strategy",
    "read_reference",
    "sample_with_frame_mask",
    "step_masks",
]


class MaskStrategyError(ValueError):
    """A mask strategy string, or its use on a latent, that cannot mean anything."""


# ---------------------------------------------------------------------------------------------
# the mask_strategy grammar

FIELD_NAMES = ("loop_id", "ref_id", "ref_start", "target_start", "length", "edit_ratio")
_GRAMMAR = "loop_id,ref_id,ref_start,target_start,length,edit_ratio"


@dataclass(frozen=True)
class MaskOp:
    """One entry: copy `length` frames of reference `ref_id` from `ref_start` to `target_start`
    of the generated latent, during loop `loop_id`, with frame-mask value `edit_ratio`."""

    loop_id: int = 0
    ref_id: int = 0
    ref_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.loop_id < 0:
            raise MaskStrategyError(f"loop_id must be >= 0 (the loop it applies to), "
                                    f"got {self.loop_id}")
        if self.ref_id < 0:
            raise MaskStrategyError(f"ref_id must be >= 0 (an index into the references), "
                                    f"got {self.ref_id}")
        if self.length < 1:
            raise MaskStrategyError(f"length must be >= 1 frame, got {self.length}")
        if not 0.0 <= self.edit_ratio <= 1.0:  # also rejects nan
            raise MaskStrategyError(f"edit_ratio must be in [0, 1] (0 keeps the reference, 1 "
                                    f"regenerates it), got {self.edit_ratio}")

    def __str__(self) -> str:
        return (f"{self.loop_id},{self.ref_id},{self.ref_start},{self.target_start},"
                f"{self.length},{self.edit_ratio:g}")

    def resolve(self, num_frames: int, ref_frames: int) -> tuple[int, int]:
        """Non-negative (ref_start, target_start), checked against both lengths."""
        ref_start = self.ref_start + ref_frames if self.ref_start < 0 else self.ref_start
        target_start = (self.target_start + num_frames if self.target_start < 0
                        else self.target_start)
        if ref_start < 0 or ref_start + self.length > ref_frames:
            raise MaskStrategyError(
                f"mask entry '{self}' reads reference frames [{self.ref_start}, "
                f"{self.ref_start}+{self.length}) but reference {self.ref_id} has {ref_frames} "
                f"latent frame(s); use a ref_start in [-{ref_frames}, {ref_frames - 1}] and a "
                f"length that fits")
        if target_start < 0 or target_start + self.length > num_frames:
            raise MaskStrategyError(
                f"mask entry '{self}' writes frames [{self.target_start}, "
                f"{self.target_start}+{self.length}) but the latent has {num_frames} frame(s); "
                f"use a target_start in [-{num_frames}, {num_frames - 1}] and a length that fits")
        return ref_start, target_start


def _parse_field(entry: str, index: int, name: str, text: str) -> int | float:
    text = text.strip()
    try:
        return float(text) if name == "edit_ratio" else int(text)
    except ValueError:
        kind = "a number" if name == "edit_ratio" else "an integer"
        raise MaskStrategyError(
            f"mask_strategy entry {index} ('{entry}'): field '{name}' must be {kind}, got "
            f"{text!r} (format: {_GRAMMAR})") from None


def _parse_entry(entry: str, index: int) -> MaskOp:
    parts = entry.split(",")
    if not entry.strip():
        raise MaskStrategyError(f"mask_strategy entry {index} is empty: remove the extra ';' "
                                f"(format: {_GRAMMAR};...)")
    if len(parts) > len(FIELD_NAMES):
        raise MaskStrategyError(
            f"mask_strategy entry {index} ('{entry}') has {len(parts)} fields; at most "
            f"{len(FIELD_NAMES)} are allowed: {_GRAMMAR}")
    values = [_parse_field(entry, index, name, part) for name, part in zip(FIELD_NAMES, parts)]
    try:
        return MaskOp(**dict(zip(FIELD_NAMES, values)))
    except MaskStrategyError as exc:
        raise MaskStrategyError(f"mask_strategy entry {index} ('{entry}'): {exc}") from None


@dataclass(frozen=True)
class MaskStrategy:
    """The parsed `mask_strategy` of one sample: an ordered tuple of `MaskOp` (later entries
    overwrite earlier ones where they overlap, as in Open-Sora)."""

    ops: tuple[MaskOp, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> MaskStrategy:
        """Parse ``"loop_id,ref_id,ref_start,target_start,length,edit_ratio;..."``; None or a
        blank string is the empty strategy (plain text-to-video)."""
        if text is None or not str(text).strip():
            return cls()
        entries = str(text).split(";")
        return cls(tuple(_parse_entry(entry, i) for i, entry in enumerate(entries)))

    def for_loop(self, loop_i: int) -> tuple[MaskOp, ...]:
        return tuple(op for op in self.ops if op.loop_id == loop_i)

    def with_op(self, op: MaskOp) -> MaskStrategy:
        return MaskStrategy((*self.ops, op))

    @property
    def max_ref_id(self) -> int:
        """Largest reference index used (-1 when none)."""
        return max((op.ref_id for op in self.ops), default=-1)

    def __str__(self) -> str:
        return ";".join(str(op) for op in self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[MaskOp]:
        return iter(self.ops)


def parse_mask_strategy(text: str | MaskStrategy | None) -> MaskStrategy:
    """A `MaskStrategy` from a string (or an already parsed one, returned as is)."""
    if isinstance(text, MaskStrategy):
        return text
    if text is not None and not isinstance(text, str):
        raise MaskStrategyError(f"mask_strategy must be a string, got {type(text).__name__}")
    return MaskStrategy.parse(text)


# ---------------------------------------------------------------------------------------------
# references: read and encode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_reference(path: str | os.PathLike, image_size: tuple[int, int]) -> np.ndarray:
    """An image (one frame) or every frame of a video, resized and centre-cropped to
    `image_size`, as (C, T, H, W) float32 in [-1, 1] (Open-Sora's `read_from_path`)."""
    from opensora.data.video import read_image, read_video

    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return read_image(path, size=tuple(image_size))
    return read_video(path, size=tuple(image_size))


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, dtype=np.float32)


def encode_reference(vae: Any, video: np.ndarray) -> np.ndarray:
    """(C, T, H, W) pixels -> (C', T', h, w) latents through `vae.encode` ((B, C, T, H, W)
    `mindspore.Tensor` in, latents out; the per-frame VAE keeps T' = T)."""
    import mindspore as ms

    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4:
        raise ValueError(f"a reference is (C, T, H, W); got shape {video.shape}")
    latents = _to_numpy(vae.encode(ms.Tensor(video[None])))
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"vae.encode must return (1, C, T, h, w) latents, got {latents.shape}")
    return latents[0]


def collect_references_batch(reference_paths: Sequence[str | None], vae: Any,
                             image_size: tuple[int, int]) -> list[list[np.ndarray]]:
    """Per sample, the encoded latents of its ``;``-separated reference paths (empty list for
    None or "")."""
    batch = []
    for paths in reference_paths:
        if paths is None or not str(paths).strip():
            batch.append([])
            continue
        batch.append([encode_reference(vae, read_reference(p.strip(), image_size))
                      for p in str(paths).split(";")])
    return batch


# ---------------------------------------------------------------------------------------------
# applying a strategy to a latent


@dataclass
class Conditioning:
    """Latents with the reference frames copied in, and the frame mask that goes with them.

    `frame_mask` (B, T) float32: 1 = generate, an edit ratio in [0, 1) = frame taken from a
    reference. `x_mask` is its boolean form at the first sampling step (True = generated),
    the (B, T) mask STDiT2 takes and training uses.
    """

    z: np.ndarray
    frame_mask: np.ndarray

    @property
    def x_mask(self) -> np.ndarray:
        return self.frame_mask >= 1.0


def apply_mask_strategy(z: Any, references: Sequence[Sequence[np.ndarray]],
                        strategies: Sequence[str | MaskStrategy | None],
                        loop_i: int = 0) -> Conditioning:
    """Copy each sample's reference frames for loop `loop_i` into a copy of `z` (B, C, T, h, w)
    and build the frame mask. `references[b][ref_id]` is a (C, T_ref, h, w) latent."""
    z = _to_numpy(z).copy()
    if z.ndim != 5:
        raise ValueError(f"z must be (B, C, T, h, w) latents, got shape {z.shape}")
    batch, channels, num_frames = z.shape[:3]
    if len(strategies) != batch or len(references) != batch:
        raise MaskStrategyError(f"need one mask strategy and one reference list per sample: "
                                f"batch {batch}, {len(strategies)} strategies, "
                                f"{len(references)} reference lists")
    frame_mask = np.ones((batch, num_frames), dtype=np.float32)
    for b, (refs, strategy) in enumerate(zip(references, strategies)):
        for op in parse_mask_strategy(strategy).for_loop(loop_i):
            if op.ref_id >= len(refs):
                raise MaskStrategyError(
                    f"sample {b}: mask entry '{op}' uses reference {op.ref_id} but "
                    f"{len(refs)} reference(s) were given; add its path to reference_path "
                    f"(';'-separated) or change ref_id")
            ref = _to_numpy(refs[op.ref_id])
            if ref.ndim != 4 or ref.shape[0] != channels or ref.shape[2:] != z.shape[3:]:
                raise MaskStrategyError(
                    f"sample {b}: reference {op.ref_id} has shape {ref.shape}, expected "
                    f"({channels}, T, {z.shape[3]}, {z.shape[4]}); encode it at the image "
                    f"size being generated")
            ref_start, target_start = op.resolve(num_frames, ref.shape[1])
            z[b, :, target_start:target_start + op.length] = \
                ref[:, ref_start:ref_start + op.length]
            frame_mask[b, target_start:target_start + op.length] = op.edit_ratio
    return Conditioning(z, frame_mask)


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


# ---------------------------------------------------------------------------------------------
# sampling with a frame mask (Open-Sora's masked p_sample)


def _frames_5d(mask: np.ndarray, batch: int) -> Any:
    """(B, T) bool -> (batch, 1, T, 1, 1) Tensor, tiled when CFG doubled the batch."""
    import mindspore as ms

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
    import mindspore as ms
    from mindspore import ops

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
    import mindspore as ms
    from mindspore import ops

    from opensora.schedulers.iddpm import forward_with_cfg

    rng = generator if isinstance(generator, np.random.Generator) \
        else np.random.default_rng(generator)
    z = ms.Tensor(_to_numpy(z))
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


# ---------------------------------------------------------------------------------------------
# long videos: loops


@dataclass
class LoopResult:
    """Every loop's latents (B, C, T, h, w) and the long video with the repeated condition
    frames of loops 1.. dropped: T + (loops - 1) * (T - condition_frame_length) frames.
    `references` and `strategies` are each sample's final lists (the given ones plus one
    reference and one entry per later loop)."""

    segments: list[np.ndarray]
    video: np.ndarray
    strategies: list[MaskStrategy] = field(default_factory=list)
    references: list[list[np.ndarray]] = field(default_factory=list)


def loop_generate(sample_fn: Callable[[Conditioning, int], Any],
                  latent_shape: Sequence[int],
                  references: Sequence[Sequence[np.ndarray]] | None = None,
                  strategies: Sequence[str | MaskStrategy | None] | None = None,
                  loops: int = 1, condition_frame_length: int = 4,
                  condition_frame_edit: float = 0.0,
                  generator: np.random.Generator | int | None = None,
                  reencode: Callable[[np.ndarray], Any] | None = None) -> LoopResult:
    """Open-Sora's loop generation ("infinite time").

    Each loop draws fresh noise of `latent_shape` (B, C, T, h, w), applies that loop's entries
    of the strategies, and calls `sample_fn(conditioning, loop_i)` for latents. From loop 1
    on, the previous loop's latents become a new reference of every sample and an entry
    ``loop_i,<new ref>,-L,0,L,condition_frame_edit`` conditions the first L frames on its last
    L (L = `condition_frame_length`, in latent frames; the per-frame VAE keeps pixel frames).
    `reencode`, when given, maps the previous latents before reuse (Open-Sora decodes and
    re-encodes: ``lambda z: vae.encode(vae.decode(Tensor(z)))``).
    """
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 5:
        raise ValueError(f"latent_shape must be (B, C, T, h, w), got {shape}")
    batch, num_frames = shape[0], shape[2]
    if loops < 1:
        raise ValueError(f"loops must be >= 1, got {loops}")
    if loops > 1 and not 1 <= condition_frame_length < num_frames:
        raise ValueError(f"condition_frame_length must be in [1, {num_frames - 1}] so each loop "
                         f"adds new frames to the {num_frames}-frame latent, got "
                         f"{condition_frame_length}")
    refs = [list(r) for r in references] if references is not None \
        else [[] for _ in range(batch)]
    plans = [parse_mask_strategy(s) for s in strategies] if strategies is not None \
        else [MaskStrategy() for _ in range(batch)]
    if len(refs) != batch or len(plans) != batch:
        raise ValueError(f"batch {batch} needs as many reference lists ({len(refs)}) and "
                         f"strategies ({len(plans)})")
    rng = generator if isinstance(generator, np.random.Generator) \
        else np.random.default_rng(generator)
    segments: list[np.ndarray] = []
    for loop_i in range(loops):
        if loop_i > 0:
            previous = segments[-1] if reencode is None else _to_numpy(reencode(segments[-1]))
            for b in range(batch):
                refs[b].append(previous[b])
                plans[b] = plans[b].with_op(MaskOp(loop_i, len(refs[b]) - 1,
                                                   -condition_frame_length, 0,
                                                   condition_frame_length, condition_frame_edit))
        z = rng.standard_normal(shape).astype(np.float32)
        conditioning = apply_mask_strategy(z, refs, plans, loop_i)
        out = _to_numpy(sample_fn(conditioning, loop_i))
        if out.shape != shape:
            raise ValueError(f"sample_fn returned shape {out.shape}, expected {shape}")
        segments.append(out)
    pieces = [segments[0]] + [s[:, :, condition_frame_length:] for s in segments[1:]]
    return LoopResult(segments, np.concatenate(pieces, axis=2), plans, refs)


# ---------------------------------------------------------------------------------------------
# training: random frame masks

MASK_TYPES = (
    "identity",
    "quarter_random",
    "quarter_head",
    "quarter_tail",
    "quarter_head_tail",
    "image_random",
    "image_head",
    "image_tail",
    "image_head_tail",
    "random",
    "intepolate",  # sic: Open-Sora's spelling, kept so configs carry over
)

# Open-Sora v1.1.0 configs spell the types "mask_no", "mask_quarter_random", ...
LEGACY_MASK_NAMES = {"mask_no": "identity",
                     **{f"mask_{name}": name for name in MASK_TYPES[1:9]}}

# The ratios of Open-Sora 1.1's training configs (75% of samples unmasked).
DEFAULT_MASK_RATIOS: dict[str, float] = {
    "identity": 0.75,
    "quarter_random": 0.025,
    "quarter_head": 0.025,
    "quarter_tail": 0.025,
    "quarter_head_tail": 0.05,
    "image_random": 0.025,
    "image_head": 0.025,
    "image_tail": 0.025,
    "image_head_tail": 0.05,
}


def _canonical_ratios(mask_ratios: Mapping[str, float]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for name, ratio in mask_ratios.items():
        canonical = LEGACY_MASK_NAMES.get(name, name)
        if canonical not in MASK_TYPES:
            raise ValueError(f"unknown mask type {name!r}; use one of {', '.join(MASK_TYPES)} "
                             f"(or Open-Sora 1.1's {', '.join(LEGACY_MASK_NAMES)})")
        if canonical in ratios:
            raise ValueError(f"mask type {canonical!r} is given twice (as {name!r} too)")
        ratio = float(ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio of {name!r} must be in [0, 1], got {ratio}")
        ratios[canonical] = ratio
    total = sum(ratios.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        hint = (f"; e.g. add 'identity': {1.0 - total:.6g}" if total < 1.0 and
                "identity" not in ratios else "")
        raise ValueError(f"mask ratios must sum to 1, got {total:.6g}{hint}")
    return ratios


class MaskGenerator:
    """Open-Sora 1.1's training frame masks: per sample, a mask type drawn with the given
    ratios, then its frames. Masks are (T,) / (B, T) bool, True = frame is noised and learnt,
    False = frame stays clean as a condition.

    Types: identity (no condition); image_head / image_tail / image_head_tail / image_random
    (one frame at the start, end, both ends, anywhere); quarter_* (the same with a run of 1 to
    T//4 frames); intepolate (every other frame, from 0 or 1); random (each frame a condition
    with a probability drawn in [0.1, 0.9]). A mask never conditions every frame; T <= 1 is
    never masked. Unlike the reference (which fails there) quarter runs for T < 4 have length 1.
    """

    def __init__(self, mask_ratios: Mapping[str, float] | None = None,
                 seed: np.random.Generator | int | None = None) -> None:
        self.mask_ratios = _canonical_ratios(DEFAULT_MASK_RATIOS if mask_ratios is None
                                             else mask_ratios)
        self._names = list(self.mask_ratios)
        self._cumulative = np.cumsum([self.mask_ratios[n] for n in self._names])
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def draw_type(self) -> str:
        """A mask type, with probability equal to its ratio."""
        index = int(np.searchsorted(self._cumulative, self.rng.random(), side="right"))
        return self._names[index] if index < len(self._names) else "identity"

    def make_mask(self, mask_type: str, num_frames: int) -> np.ndarray:
        """The (T,) mask of one type, its random sizes and positions drawn from the generator."""
        mask_type = LEGACY_MASK_NAMES.get(mask_type, mask_type)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask type {mask_type!r}; use one of {MASK_TYPES}")
        mask = np.ones(num_frames, dtype=bool)
        if num_frames <= 1 or mask_type == "identity":
            return mask
        rng = self.rng
        family, _, where = mask_type.partition("_")
        if family in ("quarter", "image"):
            size = 1 if family == "image" else int(rng.integers(1, max(1, num_frames // 4) + 1))
            if where == "random":
                start = int(rng.integers(0, num_frames - size + 1))
                mask[start:start + size] = False
            if where in ("head", "head_tail"):
                mask[:size] = False
            if where in ("tail", "head_tail"):
                mask[-size:] = False
        elif mask_type == "intepolate":
            mask[int(rng.integers(0, 2))::2] = False
        elif mask_type == "random":
            condition_probability = rng.uniform(0.1, 0.9)
            mask = rng.random(num_frames) > condition_probability
        if not mask.any():
            mask[-1] = True
        return mask

    def get_mask(self, num_frames: int) -> np.ndarray:
        return self.make_mask(self.draw_type(), num_frames)

    def get_masks(self, batch_size: int, num_frames: int) -> np.ndarray:
        """(B, T) bool, one independently drawn mask per sample."""
        if batch_size < 1 or num_frames < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_frames ({num_frames}) must be "
                             f"positive")
        return np.stack([self.get_mask(num_frames) for _ in range(batch_size)])
