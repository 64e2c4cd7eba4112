"""The video-caption dataset: bad rows, buckets, caches, determinism, the MindSpore pipeline."""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from damaged_media import write_damaged_mp4

from opensora.data.dataset import (
    Bucket,
    VideoCaptionDataset,
    aspect_ratio_table,
    create_dataloader,
    get_closest_ratio,
    subset_csv,
)

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    return path


@pytest.fixture
def video_csv(tmp_path: Path) -> Path:
    """Four good clips plus one missing, one corrupt and one uncaptioned row."""
    (tmp_path / "videos").mkdir()
    rows = []
    with (SAMPLES / "video_caption.csv").open() as handle:
        for row in list(csv.DictReader(handle))[:4]:
            shutil.copy(SAMPLES / row["video"], tmp_path / row["video"])
            rows.append((row["video"], row["caption"]))
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video at all" * 10)
    rows += [("videos/missing.mp4", "a red square moving up on a black background"),
             ("videos/broken.mp4", "a red square moving up on a black background"),
             (rows[0][0], "   ")]
    return _write_csv(tmp_path / "train.csv", rows)


def test_bad_rows_are_skipped_and_counted(video_csv: Path) -> None:
    with pytest.warns(UserWarning, match="skipped 3 bad row"):
        data = VideoCaptionDataset(video_csv, num_frames=4, frame_interval=2, image_size=(32, 32),
                                   batch_size=2)
    assert len(data) == 4
    assert data.skipped == {"missing video": 1, "corrupt video": 1, "empty caption": 1}
    assert sorted(line for line, _ in data.skipped_lines) == [6, 7, 8]
    # an epoch over the good rows runs to the end
    batches = list(data.batches(0, data.steps_per_epoch()))
    assert len(batches) == 2
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == [0, 1, 2, 3]


def test_a_damaged_stream_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    write_damaged_mp4(tmp_path / "videos" / "damaged.mp4")
    with (SAMPLES / "video_caption.csv").open() as handle:
        good = list(csv.DictReader(handle))[0]
    shutil.copy(SAMPLES / good["video"], tmp_path / good["video"])
    csv_path = _write_csv(tmp_path / "train.csv", [(good["video"], good["caption"]),
                                                   ("videos/damaged.mp4", good["caption"])])
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        data = VideoCaptionDataset(csv_path, num_frames=4, image_size=(32, 32), batch_size=1)
    assert len(data) == 1 and data.skipped == {"corrupt video": 1}


def test_clip_that_breaks_after_the_scan_is_replaced_and_counted(video_csv: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = VideoCaptionDataset(video_csv, num_frames=4, image_size=(32, 32), batch_size=4)
    data.rows[1].video.write_bytes(b"")  # the file is truncated while training runs
    with pytest.warns(UserWarning, match="skipping line"):
        batch = next(data.batches(0, 1))
    assert batch["x"].shape == (4, 3, 4, 32, 32)
    assert 1 not in batch["index"].tolist()
    assert sum(data.runtime_skipped.values()) == 1


def test_video_batches_shapes_conditions_and_determinism(video_csv: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = VideoCaptionDataset(video_csv, num_frames=4, frame_interval=2, image_size=(32, 48),
                                   batch_size=2, seed=3)
        again = VideoCaptionDataset(video_csv, num_frames=4, frame_interval=2,
                                    image_size=(32, 48), batch_size=2, seed=3)
    batch = next(data.batches(0, 1))
    assert data.column_names == ["x", "caption", "num_frames", "height", "width", "ar", "fps",
                                 "index"]
    assert batch["x"].shape == (2, 3, 4, 32, 48) and batch["x"].dtype == np.float32
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    np.testing.assert_allclose(batch["ar"], 32 / 48, rtol=1e-6)
    np.testing.assert_allclose(batch["fps"], 8 / 2)  # the clips are 8 fps, every 2nd frame
    np.testing.assert_array_equal(batch["x"], next(again.batches(0, 1))["x"])
    # the plan of a resumed run is the tail of the uninterrupted plan
    assert data.plan(3, 4) == data.plan(0, 7)[3:]
    # each epoch draws new frame windows for the same clip
    index = int(batch["index"][0])
    bucket = data.plan(0, 1)[0].bucket
    windows = {data.load_sample(index, bucket, epoch)["x"].tobytes() for epoch in range(4)}
    assert len(windows) > 1


def test_generator_dataset_matches_in_process_batches(video_csv: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = VideoCaptionDataset(video_csv, num_frames=4, image_size=(32, 32), batch_size=2)
    loader = create_dataloader(data, start_step=1, num_steps=3, num_workers=2)
    got = list(loader.create_dict_iterator(num_epochs=1, output_numpy=True))
    want = list(data.batches(1, 3))
    assert len(got) == 3
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a["x"], b["x"])
        assert [str(c) for c in a["caption"]] == [str(c) for c in b["caption"]]


def test_cached_latents_and_text(tmp_path: Path) -> None:
    rows = []
    for i in range(3):
        video = f"clips/c{i}.mp4"
        rows.append((video, f"caption {i}"))
        (tmp_path / "lat" / "clips").mkdir(parents=True, exist_ok=True)
        (tmp_path / "txt" / "clips").mkdir(parents=True, exist_ok=True)
        mean = np.full((4, 10, 4, 6), i, np.float32) + np.arange(10, dtype=np.float32)[:, None,
                                                                                       None]
        np.savez(tmp_path / "lat" / "clips" / f"c{i}.npz", latent_mean=mean,
                 latent_std=np.zeros_like(mean), fps=np.float32(24),
                 ori_size=np.array([32, 48]))
        np.savez(tmp_path / "txt" / "clips" / f"c{i}.npz",
                 y=np.full((5, 8), i, np.float32), mask=np.array([1, 1, 0, 0, 0], np.int32))
    csv_path = _write_csv(tmp_path / "data.csv", rows)
    data = VideoCaptionDataset(csv_path, num_frames=3, frame_interval=2, image_size=(32, 48),
                               batch_size=3, latent_folder=tmp_path / "lat",
                               text_folder=tmp_path / "txt", latent_scaling_factor=0.5)
    batch = next(data.batches(0, 1))
    assert data.column_names[:3] == ["x", "y", "mask"]
    assert batch["x"].shape == (3, 4, 3, 4, 6)
    assert batch["y"].shape == (3, 5, 8) and batch["mask"].shape == (3, 5)
    for row, index in enumerate(batch["index"]):
        frames = batch["x"][row, 0, :, 0, 0] / 0.5 - index  # frame numbers of the window
        assert np.all(np.diff(frames) == 2)  # frame_interval in latent frames
        assert batch["y"][row, 0, 0] == index
    np.testing.assert_allclose(batch["fps"], 12)
    # a missing cache file is a bad row, not a crash
    (tmp_path / "txt" / "clips" / "c2.npz").unlink()
    with pytest.warns(UserWarning, match="missing text cache"):
        data = VideoCaptionDataset(csv_path, num_frames=3, image_size=(32, 48), batch_size=1,
                                   latent_folder=tmp_path / "lat", text_folder=tmp_path / "txt")
    assert len(data) == 2 and data.skipped["missing text cache"] == 1


def test_aspect_ratio_table_and_closest_ratio() -> None:
    table = aspect_ratio_table(240 * 426)
    for key, (height, width) in table.items():
        assert height % 8 == 0 and width % 8 == 0
        assert abs(height / width - float(key)) < 0.08
        assert abs(height * width / (240 * 426) - 1) < 0.1
    assert get_closest_ratio(720, 1280, table) == "0.56"
    assert get_closest_ratio(100, 100, table) == "1.00"


def test_bucket_assignment_follows_open_sora_rules() -> None:
    bucket = Bucket({"64": {16: (1.0, 4), 4: (1.0, 8), 1: (1.0, 16)},
                     "128": {16: (0.0, 2), 8: (1.0, 2)},
                     "32": {32: (1.0, None)}})
    rng = np.random.default_rng(0)
    # big and long enough for 128 px, but its 16-frame cell has probability 0: 8 frames
    assert bucket.get_bucket_id(40, 128, 128, 1, rng)[:2] == ("128", 8)
    # too small for 128 px (< 80% of the pixels): 64 px, longest duration that fits
    assert bucket.get_bucket_id(40, 64, 64, 1, rng)[:2] == ("64", 16)
    assert bucket.get_bucket_id(10, 64, 64, 2, rng)[:2] == ("64", 4)
    assert bucket.get_bucket_id(1, 64, 64, 1, rng)[:2] == ("64", 1)
    # a batch size of None disables the 32 px cell; too small for any other: nowhere
    assert bucket.get_bucket_id(40, 32, 32, 1, rng) is None
    # aspect ratio picks the closest table entry and get_thw gives its shape
    bucket_id = bucket.get_bucket_id(40, 72, 128, 1, rng)
    frames, height, width = bucket.get_thw(bucket_id)
    assert (bucket_id[1], frames) == (16, 16) and height < width
    assert bucket.get_batch_size(bucket_id) == 4
    with pytest.raises(ValueError, match="unknown resolution"):
        Bucket({"77p": {16: (1.0, 2)}})


def test_probabilities_split_clips_between_buckets(video_csv: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = VideoCaptionDataset(video_csv, bucket_config={"64": {16: (0.5, 1)},
                                                             "32": {4: (1.0, 1)}})
    # a clip refused by the 64 px cell falls through to the next resolution down
    plan = data.plan(0, 40)
    shapes = [spec.bucket[:2] for spec in plan]
    assert set(shapes) == {("64", 16), ("32", 4)}
    assert 8 < shapes.count(("64", 16)) < 32
    for spec in plan[:6]:
        batch = data.load_batch(spec)
        frames, height, width = data.bucket.get_thw(spec.bucket)
        assert batch["x"].shape == (1, 3, frames, height, width)
        assert batch["num_frames"][0] == frames and batch["height"][0] == height


def test_stills_and_clips_train_together_in_image_and_video_buckets(tmp_path: Path) -> None:
    """The joint csv of data_samples: pngs go to the 1-frame cell, clips to the video cell."""
    rows = []
    with (SAMPLES / "image_video_caption.csv").open() as handle:
        joint = list(csv.DictReader(handle))
    picked = [r for r in joint if r["video"].startswith("images/")][:4]
    picked += [r for r in joint if r["video"].startswith("videos/")][:2]
    for row in picked:
        (tmp_path / row["video"]).parent.mkdir(exist_ok=True)
        shutil.copy(SAMPLES / row["video"], tmp_path / row["video"])
        rows.append((row["video"], row["caption"]))
    data = VideoCaptionDataset(_write_csv(tmp_path / "joint.csv", rows), bucket_config={
        "64": {16: (1.0, 2), 1: (1.0, 4)}})
    assert len(data) == 6 and not data.skipped
    plan = data.plan(0, 2)
    assert sorted(spec.bucket[1] for spec in plan) == [1, 16]
    for spec in plan:
        batch = data.load_batch(spec)
        if spec.bucket[1] == 1:
            assert batch["x"].shape == (4, 3, 1, 64, 64)
            assert (batch["fps"] == 120.0).all() and (batch["num_frames"] == 1).all()
        else:
            assert batch["x"].shape == (2, 3, 16, 64, 64) and (batch["fps"] == 8.0).all()


def test_subset_csv_keeps_paths_valid(video_csv: Path, tmp_path: Path) -> None:
    copy = subset_csv(video_csv, tmp_path / "elsewhere" / "few.csv", 2)
    data = VideoCaptionDataset(copy, num_frames=4, image_size=(32, 32), batch_size=2)
    assert len(data) == 2 and not data.skipped
