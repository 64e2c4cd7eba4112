"""Did the model draw what the caption asked for? Colour, shape and motion read off the pixels.

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
* **shape**: in every frame, the shape pixels are compared with a circle, a square and a
  triangle of the same area placed on the same centroid (intersection over union); the clip's
  shape is the outline that fits most frames best;
* **coherence**: a frame is coherent when its shape pixels form one connected blob (specks under
  `min_pixels` aside, holding at most a tenth of the pixels) whose area is within half to twice
  the clip's median area: a sample that splits, smears or vanishes fails it;
* **background error**: the largest channel difference (0..255) between the clip's background
  and the colour its caption names.

A clip with too few shape pixels or too little movement gets None, which counts as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from opensora.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, parse_caption
from opensora.data.synthetic import shape_mask as outline_mask
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


# Half-extent of each outline per unit area, and where its centroid sits below its centre
# (the apex-up triangle's mass lies low), both in units of the half-extent (synthetic.py).
_AREA_PER_HALF2 = {"circle": np.pi, "square": (2 * 0.85) ** 2, "triangle": 2.0}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


def frame_shape(mask: np.ndarray, min_pixels: int = 10) -> str | None:
    """The outline (circle, square, triangle) of the same area and centroid that overlaps the
    frame's shape pixels best; None with fewer than `min_pixels` of them."""
    area = int(mask.sum())
    if area < min_pixels:
        return None
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    cx, cy = (xs[mask].mean() + 0.5, ys[mask].mean() + 0.5)
    px, py = xs + 0.5, ys + 0.5
    best, best_iou = None, -1.0
    for shape in SHAPES:
        half = float(np.sqrt(area / _AREA_PER_HALF2[shape]))
        template = outline_mask(shape, px, py, cx, cy - _CENTROID_DROP[shape] * half, half)
        iou = (template & mask).sum() / max((template | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return best


def clip_shape(frames: np.ndarray, threshold: float = 60.0, min_pixels: int = 10) -> str | None:
    """The outline that fits the most frames (`frame_shape`); None when no frame has a shape."""
    votes = [frame_shape(m, min_pixels) for m in shape_mask(frames, threshold)]
    votes = [v for v in votes if v is not None]
    if not votes:
        return None
    return max(SHAPES, key=votes.count)


def coherent_frames(frames: np.ndarray, threshold: float = 60.0,
                    min_pixels: int = 10) -> np.ndarray:
    """(T,) True where the frame shows one connected blob of about the clip's usual area."""
    blobs, areas = [], []
    for mask in shape_mask(frames, threshold):
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        big = sizes[sizes >= min_pixels]
        one = len(big) == 1 and sizes.sum() - big.sum() <= 0.1 * sizes.sum()
        blobs.append(one)
        areas.append(float(big[0]) if one else 0.0)
    areas = np.asarray(areas)
    typical = np.median(areas[areas > 0]) if (areas > 0).any() else 0.0
    steady = (areas >= 0.5 * typical) & (areas <= 2.0 * typical) & (areas > 0)
    return np.asarray(blobs) & steady


def background_error(frames: np.ndarray, background: str) -> float:
    """Largest channel difference (0..255) between the clip's background and `background`."""
    want = np.asarray(BACKGROUNDS[background], np.float32)
    return float(np.abs(background_color(frames) - want).max())


@dataclass(frozen=True)
class ClipScore:
    caption: str
    want_color: str | None
    got_color: str | None
    want_direction: str | None
    got_direction: str | None
    want_shape: str | None = None
    got_shape: str | None = None
    coherence: float = 0.0  # fraction of frames with one steady blob
    background_error: float = float("nan")  # 0..255; NaN when the caption names no background

    @property
    def color_ok(self) -> bool:
        return self.got_color is not None and self.got_color == self.want_color

    @property
    def motion_ok(self) -> bool:
        return self.got_direction is not None and self.got_direction == self.want_direction

    @property
    def shape_ok(self) -> bool:
        return self.got_shape is not None and self.got_shape == self.want_shape


def score_clip(clip: np.ndarray, caption: str, threshold: float = 60.0, min_pixels: int = 10,
               min_shift: float = 2.0) -> ClipScore:
    frames = as_uint8_frames(clip)
    want = parse_caption(caption)
    return ClipScore(
        caption, want["color"], dominant_color(frames, threshold, min_pixels),
        want["direction"], motion_direction(frames, threshold, min_pixels, min_shift),
        want["shape"], clip_shape(frames, threshold, min_pixels),
        float(coherent_frames(frames, threshold, min_pixels).mean()),
        background_error(frames, want["background"]) if want["background"] else float("nan"))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


@dataclass(frozen=True)
class Scores:
    clips: list[ClipScore]

    @property
    def color_accuracy(self) -> float:
        return _mean([c.color_ok for c in self.clips])

    @property
    def motion_accuracy(self) -> float:
        return _mean([c.motion_ok for c in self.clips])

    @property
    def shape_accuracy(self) -> float:
        return _mean([c.shape_ok for c in self.clips])

    @property
    def coherence(self) -> float:
        """Fraction of all frames that show one steady blob."""
        return _mean([c.coherence for c in self.clips])

    @property
    def background_error(self) -> float:
        """Mean over clips of the background's largest channel error (0..255)."""
        errors = [c.background_error for c in self.clips if np.isfinite(c.background_error)]
        return _mean(errors) if errors else float("nan")

    def summary(self) -> dict[str, float]:
        return {"color_accuracy": self.color_accuracy, "motion_accuracy": self.motion_accuracy,
                "shape_accuracy": self.shape_accuracy, "coherence": self.coherence,
                "background_error": self.background_error, "clips": len(self.clips)}

    def table(self) -> str:
        lines = [f"{'caption':52s} {'colour':>14s} {'shape':>14s} {'motion':>14s} "
                 f"{'coherent':>8s} {'bg err':>6s}"]

        def cell(got: str | None, ok: bool) -> str:
            return f"{str(got):>8s} {'ok' if ok else '--':>5s}"

        for c in self.clips:
            lines.append(f"{c.caption[:52]:52s} {cell(c.got_color, c.color_ok)} "
                         f"{cell(c.got_shape, c.shape_ok)} {cell(c.got_direction, c.motion_ok)} "
                         f"{c.coherence:8.0%} {c.background_error:6.1f}")
        lines.append(f"colour {self.color_accuracy:.0%}   shape {self.shape_accuracy:.0%}   "
                     f"motion {self.motion_accuracy:.0%}   coherent frames {self.coherence:.0%}"
                     f"   background error {self.background_error:.1f}/255")
        return "\n".join(lines)


def score_clips(clips: Sequence[np.ndarray], captions: Sequence[str], **kwargs: float) -> Scores:
    """Colour, shape, motion, coherence and background of generated clips against captions."""
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
