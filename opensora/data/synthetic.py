"""The moving-shapes world that `data_samples/` is made of.

Each clip shows one coloured shape gliding in one direction over a plain background, captioned
with exactly what it shows. The world is small enough for a tiny model to learn on a CPU, yet
compositional: some (colour, shape, direction) combinations are held out of training, so a
trained model can be asked for clips it has never seen. Stills (single frames of the training
clips, captioned without motion) come with it for Open-Sora 1.1-style joint image / video
training: an image costs a sixteenth of a 16-frame clip, so colour and shape are learned from
many more samples per CPU second.

    python -m opensora.data.synthetic --out data_samples
"""

from __future__ import annotations

import argparse
import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from opensora.data.video import write_video

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 215, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates, y grows downwards
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

# Combinations never shown in training: every colour, shape and direction still appears in
# training on its own, only these pairings are new.
HELDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "square", "up"),
    ("green", "triangle", "left"),
    ("blue", "circle", "down"),
    ("yellow", "square", "right"),
    ("red", "triangle", "right"),
    ("green", "circle", "up"),
    ("blue", "triangle", "up"),
    ("yellow", "circle", "left"),
)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip's pixels."""

    color: str
    shape: str
    direction: str
    background: str
    start: tuple[float, float]  # shape centre (x, y) in the first frame, pixels
    speed: float  # pixels per frame
    half_size: float  # half the shape's extent, pixels

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape, self.direction, self.background)


def caption_for(color: str, shape: str, direction: str, background: str) -> str:
    return f"a {color} {shape} moving {direction} on a {background} background"


def still_caption_for(color: str, shape: str, background: str) -> str:
    """A still shows no motion, so its caption names none."""
    return f"a {color} {shape} on a {background} background"


def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float,
               half: float) -> np.ndarray:
    """True inside `shape` of half-extent `half` centred on (cx, cy), at coordinates xs, ys."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half * 0.85) & (np.abs(dy) <= half * 0.85)
    if shape == "triangle":  # upright isosceles: apex at the top
        inside_y = (dy >= -half) & (dy <= half)
        return inside_y & (np.abs(dx) <= (dy + half) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render_frame(spec: ClipSpec, t: int, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Frame `t` of the clip, (H, W, 3) uint8, anti-aliased by rendering at `supersample` x."""
    big = size * supersample
    coords = (np.arange(big, dtype=np.float32) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    color = np.array(COLORS[spec.color], np.float32)
    background = np.array(BACKGROUNDS[spec.background], np.float32)
    step_x, step_y = DIRECTIONS[spec.direction]
    cx = spec.start[0] + step_x * spec.speed * t
    cy = spec.start[1] + step_y * spec.speed * t
    mask = shape_mask(spec.shape, xs, ys, cx, cy, spec.half_size)
    coverage = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    image = background + coverage[..., None] * (color - background)
    return np.round(image).astype(np.uint8)


def render_clip(spec: ClipSpec, num_frames: int = 16, size: int = 64,
                supersample: int = 4) -> np.ndarray:
    """(T, H, W, 3) uint8 frames."""
    return np.stack([render_frame(spec, t, size, supersample) for t in range(num_frames)])


# Motion must survive the 8x VAE: a shape travels TRAVEL of the frame's side over a clip, about
# five latent pixels at 64 px, so one direction differs from another by whole patches.
TRAVEL = (0.5, 0.6)
HALF_SIZE = (7.0, 10.0)  # half the shape's extent, pixels: the sizes the tiny VAE was trained on


def random_spec(rng: np.random.Generator, color: str, shape: str, direction: str,
                background: str, num_frames: int = 16, size: int = 64) -> ClipSpec:
    """A clip of the given attributes at a random size, speed and start that keep the shape
    in frame while it travels TRAVEL of the frame."""
    half = float(rng.uniform(*HALF_SIZE))
    travel = float(rng.uniform(*TRAVEL)) * size
    speed = travel / max(num_frames - 1, 1)
    margin = half + 1.0
    if 2 * margin + travel > size:
        raise ValueError(f"a {size}px frame cannot hold a {2 * half:.0f}px shape travelling "
                         f"{travel:.0f}px")
    step_x, step_y = DIRECTIONS[direction]

    def along(step: int) -> float:  # start far enough back that the shape stays in frame
        low, high = margin, size - margin
        if step > 0:
            return float(rng.uniform(low, high - travel))
        if step < 0:
            return float(rng.uniform(low + travel, high))
        return float(rng.uniform(low, high))

    return ClipSpec(color, shape, direction, background, (along(step_x), along(step_y)), speed,
                    half)


def plan_dataset(num_clips: int = 64, num_frames: int = 16, size: int = 64,
                 seed: int = 0) -> tuple[list[ClipSpec], list[ClipSpec]]:
    """Training clips (held-out combinations excluded) and one clip per held-out combination.

    Training cycles through every allowed combination in a seeded order, so each colour, shape
    and direction appears about equally often.
    """
    rng = np.random.default_rng(seed)
    allowed = [c for c in itertools.product(COLORS, SHAPES, DIRECTIONS) if c not in HELDOUT]
    order = rng.permutation(len(allowed))
    backgrounds = list(BACKGROUNDS)
    train = []
    for i in range(num_clips):
        color, shape, direction = allowed[order[i % len(allowed)]]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        train.append(random_spec(rng, color, shape, direction, background, num_frames, size))
    heldout = [
        random_spec(rng, color, shape, direction, backgrounds[i % len(backgrounds)], num_frames,
                     size)
        for i, (color, shape, direction) in enumerate(HELDOUT)
    ]
    return train, heldout


def plan_stills(train: list[ClipSpec], num_images: int, num_frames: int = 16,
                seed: int = 0) -> list[tuple[ClipSpec, int]]:
    """(training clip, frame index) for each still: frames of the training clips only, so no
    held-out clip is ever seen, cycling through the clips in order."""
    rng = np.random.default_rng([seed, 7])
    return [(train[i % len(train)], int(rng.integers(num_frames))) for i in range(num_images)]


def training_captions(count: int = 8) -> list[str]:
    """`count` captions of combinations seen in training, colours, directions, shapes and
    backgrounds in turn (every direction twice per colour cycle at the default 8): the
    training-set half of the tiny preset's evaluation."""
    colors, shapes, directions = list(COLORS), list(SHAPES), list(DIRECTIONS)
    backgrounds = list(BACKGROUNDS)
    captions = []
    for i in range(count):
        color, direction = colors[i % len(colors)], directions[(i + i // 4) % len(directions)]
        shape = next(shapes[(i + k) % len(shapes)] for k in range(len(shapes))
                     if (color, shapes[(i + k) % len(shapes)], direction) not in HELDOUT)
        captions.append(caption_for(color, shape, direction, backgrounds[i % len(backgrounds)]))
    return captions


def parse_caption(caption: str) -> dict[str, str]:
    """Invert `caption_for`: the attributes a caption asks for (used to score generated clips)."""
    words = caption.lower().replace(",", " ").split()
    found = {
        "color": next((w for w in words if w in COLORS), None),
        "shape": next((w for w in words if w in SHAPES), None),
        "direction": next((w for w in words if w in DIRECTIONS), None),
    }
    background = next((w for w, n in zip(words, words[1:]) if n == "background"), None)
    found["background"] = background if background in BACKGROUNDS else None
    return found


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)


def write_dataset(out: str | Path, num_clips: int = 64, num_frames: int = 16, size: int = 64,
                  fps: int = 8, seed: int = 0, num_images: int = 512) -> dict[str, Path]:
    """Render every clip to mp4 and every still to png, and write the captions csvs (paths
    relative to the csv): videos, held-out videos, stills, and stills + videos together (the
    csv for Open-Sora 1.1-style joint image / video training with buckets)."""

    out = Path(out)
    train, heldout = plan_dataset(num_clips, num_frames, size, seed)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(train):
        name = f"videos/clip_{i:03d}.mp4"
        write_video(out / name, render_clip(spec, num_frames, size), fps)
        rows.append((name, spec.caption))
    heldout_rows = []
    for i, spec in enumerate(heldout):
        name = f"heldout/clip_{i:03d}.mp4"
        write_video(out / name, render_clip(spec, num_frames, size), fps)
        heldout_rows.append((name, spec.caption))
    (out / "images").mkdir(parents=True, exist_ok=True)
    image_rows = []
    for i, (spec, frame) in enumerate(plan_stills(train, num_images, num_frames, seed)):
        name = f"images/img_{i:03d}.png"
        pixels = render_frame(spec, frame, size)
        Image.fromarray(pixels).save(out / name, format="PNG", optimize=True)
        image_rows.append((name, still_caption_for(spec.color, spec.shape, spec.background)))
    _write_csv(out / "video_caption.csv", rows)
    _write_csv(out / "heldout_video_caption.csv", heldout_rows)
    _write_csv(out / "image_caption.csv", image_rows)
    _write_csv(out / "image_video_caption.csv", image_rows + rows)
    (out / "heldout_captions.txt").write_text("".join(s.caption + "\n" for s in heldout))
    return {"csv": out / "video_caption.csv", "heldout_csv": out / "heldout_video_caption.csv",
            "heldout_captions": out / "heldout_captions.txt",
            "image_csv": out / "image_caption.csv",
            "joint_csv": out / "image_video_caption.csv"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data_samples")
    parser.add_argument("--num-clips", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=512,
                        help="stills (frames of the training clips) for joint image training")
    args = parser.parse_args(argv)
    paths = write_dataset(args.out, args.num_clips, args.num_frames, args.size, args.fps,
                          args.seed, args.num_images)
    print(f"wrote {args.num_clips} clips, {args.num_images} stills, {paths['csv']} and "
          f"{paths['joint_csv']}")


if __name__ == "__main__":
    main()
