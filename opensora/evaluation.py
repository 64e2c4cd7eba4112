"""Did the model draw what the caption asked for? Colour and motion read off the pixels.

The moving-shapes world makes this measurable with plain image statistics, no learned metric:

* **background**: the median colour of the clip's border pixels (the shape covers little of
  the border, so the median is the background);
* **shape pixels**: pixels farther than `threshold` (RGB Euclidean, 0..255 scale) from the
  background;
* **colour**: the median colour of the shape pixels over all frames, named by the nearest
  entry of `opensora.data.synthetic.COLORS`;
* **motion**: the centroid of the shape pixels in every frame that has at least `min_pixels`
  of them; the displacement from the first to the last such frame, if longer than
  `min_shift` pixels, is named by the closest of the four directions (image y grows down).
  `captioned_shift` projects the same displacement on the caption's direction: how far the
  shape went the asked-for way, in pixels.

A clip with too few shape pixels or too little movement gets None, which counts as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from opensora.data.synthetic import COLORS, DIRECTIONS, parse_caption
from opensora.data.video import to_uint8_frames


def as_uint8_frames(clip: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8, from itself or from (C, T, H, W) float in [-1, 1]."""
    clip = np.asarray(clip)
    if clip.dtype == np.uint8:
        if clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {clip.shape}")
        return clip
    if clip.ndim != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) float clip in [-1, 1], got {clip.shape}")

    return to_uint8_frames(clip)


def background_color(frames: np.ndarray) -> np.ndarray:
    """Median RGB of the border pixels of every frame."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]],
                            axis=1).reshape(-1, 3)
    return np.median(border.astype(np.float32), axis=0)


def shape_mask(frames: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """(T, H, W) True where a pixel differs from the background by more than `threshold`."""
    distance = np.linalg.norm(frames.astype(np.float32) - background_color(frames), axis=-1)
    return distance > threshold


def dominant_color(frames: np.ndarray, threshold: float = 60.0,
                   min_pixels: int = 10) -> str | None:
    """Name of the COLORS entry nearest to the shape's median colour; None without a shape."""
    mask = shape_mask(frames, threshold)
    if mask.sum() < min_pixels:
        return None
    color = np.median(frames[mask].astype(np.float32), axis=0)
    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(table - color, axis=1)))]


def centroids(frames: np.ndarray, threshold: float = 60.0,
              min_pixels: int = 10) -> np.ndarray:
    """(T, 2) shape centroid (x, y) per frame, NaN where the frame has too few shape pixels."""
    mask = shape_mask(frames, threshold)
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
    out = np.full((len(mask), 2), np.nan, np.float32)
    for t, m in enumerate(mask):
        if m.sum() >= min_pixels:
            out[t] = xs[m].mean(), ys[m].mean()
    return out


def centroid_shift(frames: np.ndarray, threshold: float = 60.0,
                   min_pixels: int = 10) -> np.ndarray | None:
    """(dx, dy) of the shape's centroid from its first to its last visible frame; None when it
    is visible in fewer than two frames."""
    points = centroids(frames, threshold, min_pixels)
    valid = np.flatnonzero(~np.isnan(points[:, 0]))
    if len(valid) < 2:
        return None
    return points[valid[-1]] - points[valid[0]]


def captioned_shift(clip: np.ndarray, caption: str, threshold: float = 60.0,
                    min_pixels: int = 10) -> float:
    """Pixels the shape's centroid moves from its first to its last visible frame, projected on
    the caption's direction (0 when it is visible in fewer than two frames)."""
    direction = parse_caption(caption)["direction"]
    if direction is None:
        raise ValueError(f"caption names no direction ({', '.join(DIRECTIONS)}): {caption!r}")
    shift = centroid_shift(as_uint8_frames(clip), threshold, min_pixels)
    return 0.0 if shift is None else float(shift @ np.asarray(DIRECTIONS[direction]))


def motion_direction(frames: np.ndarray, threshold: float = 60.0, min_pixels: int = 10,
                     min_shift: float = 2.0) -> str | None:
    """left / right / up / down from the first-to-last centroid displacement, or None."""
    shift = centroid_shift(frames, threshold, min_pixels)
    if shift is None or np.linalg.norm(shift) < min_shift:
        return None
    names = list(DIRECTIONS)
    scores = [float(np.dot(shift, DIRECTIONS[n])) for n in names]
    return names[int(np.argmax(scores))]


@dataclass(frozen=True)
class ClipScore:
    caption: str
    want_color: str | None
    got_color: str | None
    want_direction: str | None
    got_direction: str | None

    @property
    def color_ok(self) -> bool:
        return self.got_color is not None and self.got_color == self.want_color

    @property
    def motion_ok(self) -> bool:
        return self.got_direction is not None and self.got_direction == self.want_direction


def score_clip(clip: np.ndarray, caption: str, **kwargs: float) -> ClipScore:
    frames = as_uint8_frames(clip)
    want = parse_caption(caption)
    return ClipScore(caption, want["color"], dominant_color(frames, **{
        k: v for k, v in kwargs.items() if k in ("threshold", "min_pixels")}),
        want["direction"], motion_direction(frames, **kwargs))


@dataclass(frozen=True)
class Scores:
    clips: list[ClipScore]

    @property
    def color_accuracy(self) -> float:
        return float(np.mean([c.color_ok for c in self.clips])) if self.clips else 0.0

    @property
    def motion_accuracy(self) -> float:
        return float(np.mean([c.motion_ok for c in self.clips])) if self.clips else 0.0

    def table(self) -> str:
        lines = [f"{'caption':52s} {'colour':>14s} {'motion':>14s}"]
        for c in self.clips:
            color_mark = "ok" if c.color_ok else "--"
            motion_mark = "ok" if c.motion_ok else "--"
            lines.append(f"{c.caption[:52]:52s} {str(c.got_color):>8s} {color_mark:>5s}"
                         f" {str(c.got_direction):>8s} {motion_mark:>5s}")
        lines.append(f"colour {self.color_accuracy:.0%}   motion {self.motion_accuracy:.0%}")
        return "\n".join(lines)


def score_clips(clips: Sequence[np.ndarray], captions: Sequence[str], **kwargs: float) -> Scores:
    """Colour and motion accuracy of generated clips against their captions."""
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips but {len(captions)} captions")
    return Scores([score_clip(clip, caption, **kwargs) for clip, caption in zip(clips, captions)])


@dataclass(frozen=True)
class Continuation:
    """How the generated frames of a conditioned clip relate to the given ones (chapter 5)."""

    color: str | None  # dominant colour of the generated frames
    direction: str | None  # motion direction over the generated frames
    boundary_jump: float  # mean centroid shift (px) across given <-> generated borders; NaN: none
    typical_step: float  # median centroid shift (px) between consecutive frames of the clip


def continuation(clip: np.ndarray, generated: Sequence[bool], threshold: float = 60.0,
                 min_pixels: int = 10) -> Continuation:
    """Colour and direction of the `generated` frames, and whether the shape jumps where given
    frames meet generated ones: a continuation moves across the border by about one ordinary
    frame-to-frame step, a restart jumps."""
    frames = as_uint8_frames(clip)
    generated = np.asarray(generated, bool)
    if generated.shape != (len(frames),):
        raise ValueError(f"generated has shape {generated.shape}, the clip {len(frames)} frames")
    if not generated.any():
        raise ValueError("no generated frames to describe")
    points = centroids(frames, threshold, min_pixels)
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)  # NaN next to shapeless frames
    borders = steps[np.flatnonzero(generated[1:] != generated[:-1])]
    finite_borders, finite_steps = borders[np.isfinite(borders)], steps[np.isfinite(steps)]
    new = frames[generated]
    return Continuation(
        color=dominant_color(new, threshold, min_pixels),
        direction=motion_direction(new, threshold, min_pixels),
        boundary_jump=float(finite_borders.mean()) if finite_borders.size else float("nan"),
        typical_step=float(np.median(finite_steps)) if finite_steps.size else float("nan"))
