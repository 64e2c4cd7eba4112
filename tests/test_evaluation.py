"""Colour, shape, motion, coherence and background read off pixels: right on real clips."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from opensora.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    ClipSpec,
    random_spec,
    render_clip,
)
from opensora.data.video import read_video
from opensora.evaluation import (
    background_error,
    captioned_shift,
    clip_shape,
    coherent_frames,
    continuation,
    dominant_color,
    motion_direction,
    score_clip,
    score_clips,
)

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


def test_heldout_clips_score_perfectly() -> None:
    with (SAMPLES / "heldout_video_caption.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    clips = [read_video(SAMPLES / r["video"], num_frames=16) for r in rows]
    scores = score_clips(clips, [r["caption"] for r in rows])
    assert scores.color_accuracy == 1.0, scores.table()
    assert scores.motion_accuracy == 1.0, scores.table()
    assert scores.shape_accuracy == 1.0, scores.table()
    assert scores.coherence == 1.0, scores.table()
    assert scores.background_error <= 10.0, scores.table()  # H.264 shifts flat colours a little


def test_every_rendered_combination_reads_back_its_caption() -> None:
    rng = np.random.default_rng(1)
    specs = [random_spec(rng, c, s, d, b) for c in COLORS for s in SHAPES for d in DIRECTIONS
             for b in BACKGROUNDS]
    scores = score_clips([render_clip(s) for s in specs], [s.caption for s in specs])
    assert scores.summary() == {"color_accuracy": 1.0, "motion_accuracy": 1.0,
                                "shape_accuracy": 1.0, "coherence": 1.0,
                                "background_error": 0.0, "clips": len(specs)}


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_is_the_best_fitting_outline(shape: str) -> None:
    spec = ClipSpec("green", shape, "down", "gray", (30.0, 20.0), 1.0, 8.0)
    frames = render_clip(spec, num_frames=6)
    assert clip_shape(frames) == shape
    assert clip_shape(np.full_like(frames, 120)) is None


def test_coherence_fails_split_vanishing_and_swelling_frames() -> None:
    spec = ClipSpec("red", "circle", "right", "black", (16.0, 32.0), 2.0, 6.0)
    frames = render_clip(spec, num_frames=8)
    assert coherent_frames(frames).all()
    broken = frames.copy()
    broken[1, 5:12, 50:57] = COLORS["red"]  # a second blob
    broken[3] = 0  # the shape vanishes
    broken[5, 10:60, 5:60] = COLORS["red"]  # the shape swells to most of the frame
    assert coherent_frames(broken).tolist() == [True, False, True, False, True, False, True,
                                                 True]


def test_background_error_is_the_largest_channel_difference() -> None:
    frames = np.full((2, 16, 16, 3), (118, 125, 120), np.uint8)
    assert background_error(frames, "gray") == 5.0
    assert background_error(frames, "white") == 137.0


@pytest.mark.parametrize("color,direction,background", [
    ("yellow", "left", "white"), ("green", "down", "gray"), ("blue", "up", "black"),
    ("red", "right", "white")])
def test_rendered_clips(color: str, direction: str, background: str) -> None:
    spec = ClipSpec(color, "triangle", direction, background, (32.0, 32.0), 1.0, 8.0)
    frames = render_clip(spec, num_frames=12, size=64, supersample=1)
    assert dominant_color(frames) == color
    assert motion_direction(frames) == direction
    assert score_clip(frames, spec.caption).motion_ok


def test_captioned_shift_is_signed_along_the_caption() -> None:
    spec = ClipSpec("red", "square", "right", "black", (20.0, 32.0), 1.5, 8.0)
    frames = render_clip(spec, num_frames=11, size=64, supersample=1)  # 15 px to the right
    assert captioned_shift(frames, "a red square moving right on a black background") \
        == pytest.approx(15.0, abs=0.5)
    assert captioned_shift(frames, "a red square moving left on a black background") \
        == pytest.approx(-15.0, abs=0.5)
    assert captioned_shift(frames, "a red square moving up on a black background") \
        == pytest.approx(0.0, abs=0.5)
    assert captioned_shift(np.zeros_like(frames), "a red square moving up on a black background") \
        == 0.0  # no shape visible
    with pytest.raises(ValueError, match="names no direction"):
        captioned_shift(frames, "a red square on a black background")


def test_no_shape_or_no_motion_scores_none() -> None:
    empty = np.full((8, 32, 32, 3), 120, np.uint8)
    assert dominant_color(empty) is None and motion_direction(empty) is None
    still = render_clip(ClipSpec("red", "circle", "left", "black", (16.0, 16.0), 0.0, 6.0),
                        num_frames=8, size=32, supersample=1)
    assert dominant_color(still) == "red"
    assert motion_direction(still) is None
    score = score_clip(still, "a red circle moving left on a black background")
    assert score.color_ok and not score.motion_ok
    with pytest.raises(ValueError, match="2 clips but 1 captions"):
        score_clips([empty, empty], ["x"])


def test_continuation_tells_a_continued_motion_from_a_restart() -> None:
    spec = ClipSpec("red", "square", "right", "black", (12.0, 32.0), 2.0, 6.0)
    frames = render_clip(spec, num_frames=24, size=64, supersample=1)[:16]
    generated = np.arange(16) >= 4  # the first 4 frames were given (video extension)
    smooth = continuation(frames, generated)
    assert (smooth.color, smooth.direction) == ("red", "right")
    assert smooth.typical_step == pytest.approx(2.0, abs=0.3)
    assert smooth.boundary_jump == pytest.approx(smooth.typical_step, abs=0.3)
    far = render_clip(spec, num_frames=24, size=64, supersample=1)[12:]
    restart = np.concatenate([frames[:4], far])  # the new frames start elsewhere
    jumped = continuation(restart, generated)
    assert jumped.direction == "right"
    assert jumped.boundary_jump > 4 * jumped.typical_step
    with pytest.raises(ValueError, match="16 frames"):
        continuation(frames, generated[:8])
