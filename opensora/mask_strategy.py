"""Open-Sora 1.1's mask strategies: which latent frames are given, and from which reference.

Open-Sora 1.1 turns image-to-video, video extension, interpolation, editing and long videos into
one mechanism: some latent frames are *given* (copied from an encoded reference) and the rest
are generated. A `mask_strategy` string says which frames to copy (training learns to continue
them from `opensora.data.mask_generator`'s random masks; the sampling loop that honours them is
`opensora.schedulers.masked_sampling`).

The grammar (Open-Sora v1.1.0 `scripts/inference.py`): entries separated by ``;``, each
``loop_id,ref_id,ref_start,target_start,length,edit_ratio``. Missing trailing fields default to
``ref_id=0, ref_start=0, target_start=0, length=1, edit_ratio=0``, so ``"0"`` means "in loop 0,
put frame 0 of reference 0 at frame 0" (image-to-video). Negative starts count from the end, as
Python indices do. Each copied frame gets a *frame mask* value equal to its edit ratio; free
frames get 1 (what the values do at each sampling step: `opensora.schedulers.masked_sampling`).

Arrays are numpy (float32 latents (B, C, T, h, w), (B, T) masks); only `encode_reference`
crosses into MindSpore, through the VAE.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from opensora.data.video import read_image, read_video


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
# references


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def read_reference(path: str | os.PathLike, image_size: tuple[int, int]) -> np.ndarray:
    """An image (one frame) or every frame of a video, resized and centre-cropped to
    `image_size`, as (C, T, H, W) float32 in [-1, 1] (Open-Sora's `read_from_path`)."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return read_image(path, size=tuple(image_size))
    return read_video(path, size=tuple(image_size))


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, dtype=np.float32)


def encode_reference(vae: Any, video: np.ndarray) -> np.ndarray:
    """(C, T, H, W) pixels -> (C', T', h, w) latents through `vae.encode` ((B, C, T, H, W)
    `mindspore.Tensor` in, latents out; the per-frame VAE keeps T' = T)."""
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
