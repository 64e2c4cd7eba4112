"""The sample world: captions say what the pixels show, and regeneration is identical."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from opensora.data import synthetic
from opensora.data.video import read_frames
from opensora.presets import DATA_SAMPLES


def _centroid(frame: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    mask = np.abs(frame.astype(int) - np.array(background)).sum(-1) > 60
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def test_rendering_is_deterministic_and_matches_caption() -> None:
    train, _ = synthetic.plan_dataset()
    again, _ = synthetic.plan_dataset()
    assert train == again
    for spec in train[:12]:
        frames = synthetic.render_clip(spec)
        np.testing.assert_array_equal(frames, synthetic.render_clip(spec))
        background = synthetic.BACKGROUNDS[spec.background]
        motion = _centroid(frames[-1], background) - _centroid(frames[0], background)
        step = np.array(synthetic.DIRECTIONS[spec.direction])
        # moved the captioned way, at least half the frame (about five latent pixels)
        assert motion @ step >= synthetic.TRAVEL[0] * 64 - 1, (spec.caption, motion)
        assert abs(motion @ step[::-1]) < 3  # and not sideways
        colour = frames[0][np.abs(frames[0].astype(int) - background).sum(-1) > 200].mean(0)
        assert np.abs(colour - synthetic.COLORS[spec.color]).max() < 40


def test_shape_stays_inside_the_frame() -> None:
    train, heldout = synthetic.plan_dataset()
    for spec in train + heldout:
        frames = synthetic.render_clip(spec)
        background = np.array(synthetic.BACKGROUNDS[spec.background])
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]],
                                axis=1)
        assert np.abs(border.astype(int) - background).max() < 30, spec


def test_heldout_combinations_never_in_training_csv() -> None:
    with (DATA_SAMPLES / "video_caption.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 64
    combos = set()
    for row in rows:
        parsed = synthetic.parse_caption(row["caption"])
        combos.add((parsed["color"], parsed["shape"], parsed["direction"]))
        assert (DATA_SAMPLES / row["video"]).is_file()
    heldout = (DATA_SAMPLES / "heldout_captions.txt").read_text().splitlines()
    assert len(heldout) == len(synthetic.HELDOUT)
    for caption in heldout:
        parsed = synthetic.parse_caption(caption)
        assert (parsed["color"], parsed["shape"], parsed["direction"]) not in combos
    for key in ("color", "shape", "direction"):  # each attribute alone is seen in training
        assert {c[("color", "shape", "direction").index(key)] for c in combos} == set(
            {"color": synthetic.COLORS, "shape": synthetic.SHAPES,
             "direction": synthetic.DIRECTIONS}[key])


def test_committed_clips_are_what_the_generator_makes(tmp_path: Path) -> None:
    paths = synthetic.write_dataset(tmp_path, num_clips=2)
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    with (DATA_SAMPLES / "video_caption.csv").open() as handle:
        committed = list(csv.DictReader(handle))[:2]
    assert rows == committed
    for row in rows:
        np.testing.assert_array_equal(read_frames(tmp_path / row["video"]),
                                      read_frames(DATA_SAMPLES / row["video"]))


def test_parse_caption_roundtrip() -> None:
    caption = synthetic.caption_for("blue", "triangle", "down", "white")
    assert synthetic.parse_caption(caption) == {
        "color": "blue", "shape": "triangle", "direction": "down", "background": "white"}
    assert synthetic.parse_caption("a purple hexagon")["color"] is None


def test_committed_stills_are_frames_of_training_clips(tmp_path: Path) -> None:
    """Stills for joint image training: generator output, motion-free captions, training clips
    only, and a joint csv that lists them before the videos."""
    paths = synthetic.write_dataset(tmp_path, num_clips=2, num_images=2)
    with paths["image_csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    with (DATA_SAMPLES / "image_caption.csv").open() as handle:
        committed = list(csv.DictReader(handle))
    assert len(committed) == 512 and rows == committed[:2]
    train, _ = synthetic.plan_dataset(num_clips=2)
    for row, (spec, frame) in zip(rows, synthetic.plan_stills(train, 2)):
        still = read_frames(tmp_path / row["video"])
        assert still.shape == (1, 64, 64, 3)
        np.testing.assert_array_equal(still[0], synthetic.render_frame(spec, frame))
        np.testing.assert_array_equal(read_frames(DATA_SAMPLES / row["video"]), still)
        assert row["caption"] == synthetic.still_caption_for(spec.color, spec.shape,
                                                             spec.background)
        assert synthetic.parse_caption(row["caption"])["direction"] is None
    with (DATA_SAMPLES / "image_video_caption.csv").open() as handle:
        joint = list(csv.DictReader(handle))
    with (DATA_SAMPLES / "video_caption.csv").open() as handle:
        videos = list(csv.DictReader(handle))
    assert joint == committed + videos


def test_a_frame_too_small_for_the_travel_is_refused() -> None:
    rng = np.random.default_rng(0)
    spec = synthetic.random_spec(rng, "red", "circle", "left", "black", num_frames=16, size=64)
    assert synthetic.TRAVEL[0] * 64 <= spec.speed * 15 <= synthetic.TRAVEL[1] * 64
    with pytest.raises(ValueError, match="cannot hold"):
        synthetic.random_spec(rng, "red", "circle", "left", "black", num_frames=16, size=24)


def test_a_large_world_cycles_every_training_combination() -> None:
    train, _ = synthetic.plan_dataset(num_clips=80)
    combos = [(s.color, s.shape, s.direction) for s in train]
    allowed = len(synthetic.COLORS) * len(synthetic.SHAPES) * len(synthetic.DIRECTIONS) - len(
        synthetic.HELDOUT)
    assert len(set(combos)) == allowed and all(combos.count(c) == 2 for c in set(combos))
    assert not set(combos) & set(synthetic.HELDOUT)
