"""Video reading and writing, including every kind of bad clip a user can hand us."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from damaged_media import write_damaged_mp4
from PIL import Image

from opensora.data.video import (
    IMG_FPS,
    VideoReadError,
    frame_indices,
    read_frames,
    read_image,
    read_video,
    resize_center_crop,
    to_uint8_frames,
    video_info,
    write_video,
)
from opensora.presets import DATA_SAMPLES

CLIP = DATA_SAMPLES / "videos" / "clip_000.mp4"


def _moving_square(frames: int = 12, size: int = 32) -> np.ndarray:
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        video[t, 8:16, 2 + t : 10 + t] = (200, 60, 30)
    return video


def test_read_video_layout_and_range() -> None:
    video = read_video(CLIP, num_frames=8, frame_interval=2)
    assert video.shape == (3, 8, 64, 64) and video.dtype == np.float32
    assert -1.0 <= video.min() and video.max() <= 1.0


def test_frame_interval_picks_the_right_frames() -> None:
    every = read_frames(CLIP)
    picked = read_frames(CLIP, num_frames=4, frame_interval=3, start=2)
    np.testing.assert_array_equal(picked, every[[2, 5, 8, 11]])


def test_random_window_is_seeded() -> None:
    a = frame_indices(32, 8, 2, start=None, rng=np.random.default_rng(3))
    b = frame_indices(32, 8, 2, start=None, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a[-1] < 32 and np.all(np.diff(a) == 2)


def test_resize_and_center_crop() -> None:
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # a white centre band that the crop should keep
    out = resize_center_crop(frames, (20, 20))
    assert out.shape == (2, 20, 20, 3)
    assert out[:, :, 5:15].mean() > 250
    assert read_video(CLIP, 4, size=(32, 48)).shape == (3, 4, 32, 48)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_write_then_read_roundtrip(tmp_path: Path, suffix: str) -> None:
    video = _moving_square()
    path = write_video(tmp_path / f"clip{suffix}", video, fps=8)
    info = video_info(path)
    assert (info.num_frames, info.height, info.width) == (12, 32, 32)
    back = read_frames(path)
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 6  # lossy codecs, small error


def test_odd_sizes_are_padded_for_mp4(tmp_path: Path) -> None:
    video = np.full((3, 15, 17, 3), 100, np.uint8)
    info = video_info(write_video(tmp_path / "odd.mp4", video))
    assert (info.height, info.width) == (16, 18)


def test_write_rejects_float_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))


def test_missing_empty_corrupt_and_short_videos_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VideoReadError, match="not found.*missing.mp4"):
        read_video(tmp_path / "missing.mp4", 4)
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoReadError, match="empty.*empty.mp4"):
        read_video(empty, 4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        read_video(corrupt, 4)
    with pytest.raises(VideoReadError, match=r"clip_000.mp4: need 39 frames .* has 16"):
        read_video(CLIP, num_frames=20, frame_interval=2)


def test_a_damaged_stream_is_a_read_error_naming_the_file(tmp_path: Path) -> None:
    damaged = write_damaged_mp4(tmp_path / "damaged.mp4")
    for read in (video_info, lambda p: read_video(p, 4)):
        with pytest.raises(VideoReadError, match="cannot decode .*damaged.mp4"):
            read(damaged)


def test_uint8_conversion_clips_overshoot() -> None:
    video = np.array([-1.5, -1.0, 0.0, 1.0, 1.7], np.float32).reshape(1, 5, 1, 1)
    video = np.repeat(video, 3, axis=0)
    out = to_uint8_frames(video)
    assert out[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_read_image(tmp_path: Path) -> None:
    Image.fromarray(_moving_square()[0]).save(tmp_path / "frame.png")
    assert read_image(tmp_path / "frame.png", size=(16, 16)).shape == (3, 1, 16, 16)
    with pytest.raises(VideoReadError, match="not found"):
        read_image(tmp_path / "none.png")


def test_a_still_reads_as_a_one_frame_clip(tmp_path: Path) -> None:
    """Images sit in training csvs next to videos (1.1's image buckets): one frame at IMG_FPS."""

    frame = _moving_square()[3]
    Image.fromarray(frame).save(tmp_path / "still.png")
    info = video_info(tmp_path / "still.png")
    assert (info.num_frames, info.height, info.width, info.fps) == (1, 32, 32, IMG_FPS)
    assert np.array_equal(read_frames(tmp_path / "still.png", 1)[0], frame)
    with pytest.raises(VideoReadError, match="need 2 frames"):
        read_frames(tmp_path / "still.png", 2)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(VideoReadError, match="cannot decode image"):
        video_info(tmp_path / "bad.png")
    with pytest.raises(VideoReadError, match="image not found: .*gone.png"):
        video_info(tmp_path / "gone.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(VideoReadError, match="image is empty"):
        read_frames(tmp_path / "empty.jpg", 1)
