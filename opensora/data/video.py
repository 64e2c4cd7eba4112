"""Reading clips into model-ready arrays and writing generated frames back out as mp4 or gif.

Reading goes through decord (as Open-Sora's data pipeline does); writing mp4 through PyAV
(libx264) and gif through Pillow. Arrays follow Open-Sora's layout: (C, T, H, W) float32 in
[-1, 1] going into the VAE, (T, H, W, C) uint8 coming out of it.
"""

from __future__ import annotations

import fractions
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from opensora.checkpoint import atomic_write

# Stills read as one-frame clips, so an image can sit in a training csv next to videos (Open-Sora
# 1.1's image buckets); their fps micro-condition is Open-Sora's IMG_FPS.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMG_FPS = 120.0


class VideoReadError(ValueError):
    """A clip is missing, unreadable, or too short for the frames asked of it."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def _open(path: str | os.PathLike):
    # imported on use: decord 0.6.0 imported before MindSpore 2.10 aborts the process
    # ("random_device could not be read"); by now MindSpore is loaded
    import decord

    path = Path(path)
    kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
    if not path.is_file():
        raise VideoReadError(f"{kind} not found: {path}")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{kind} is empty (0 bytes): {path}")
    if path.suffix.lower() == ".gif" or kind == "image":
        return _PillowReader(path)
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError
        raise VideoReadError(f"cannot decode video {path}: {str(exc).splitlines()[0]}") from exc
    if len(reader) == 0:
        raise VideoReadError(f"video has no frames: {path}")
    return reader


class _PillowReader:
    """decord reads neither GIFs (which the pipeline writes) nor stills; Pillow does, behind the
    same interface. A still is a one-frame clip at IMG_FPS."""

    def __init__(self, path: Path):
        still = path.suffix.lower() in IMAGE_SUFFIXES
        try:
            with Image.open(path) as image:
                duration_ms = image.info.get("duration", 125) or 125
                frames = []
                for index in range(getattr(image, "n_frames", 1)):
                    image.seek(index)
                    frames.append(np.asarray(image.convert("RGB")))
        except Exception as exc:
            kind = "image" if still else "video"
            raise VideoReadError(f"cannot decode {kind} {path}: {exc}") from exc
        self._frames = np.stack(frames)
        self._fps = IMG_FPS if still else 1000.0 / duration_ms

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._frames[index]

    def get_avg_fps(self) -> float:
        return self._fps

    def get_batch(self, indices: list[int]):
        return _Batch(self._frames[indices])


class _Batch:
    def __init__(self, frames: np.ndarray):
        self._frames = frames

    def asnumpy(self) -> np.ndarray:
        return self._frames


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frames, fps and size; the first frame is decoded, so a damaged stream is a
    VideoReadError here (a dataset probe skips and counts it) rather than decord's own error."""
    reader = _open(path)
    try:
        first = reader[0]
        height, width = np.asarray(first.asnumpy() if hasattr(first, "asnumpy")
                                   else first).shape[:2]
        fps = float(reader.get_avg_fps())
    except Exception as exc:  # decord's DECORDError, raised from C++ for a damaged stream
        raise VideoReadError(f"cannot decode video {path}: {str(exc).splitlines()[0]}") from exc
    return VideoInfo(len(reader), fps, int(height), int(width))


def frame_indices(total: int, num_frames: int, frame_interval: int = 1,
                  start: int | None = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of `num_frames` frames `frame_interval` apart: a window at `start`, or a random
    window when `start` is None (training samples a different window each epoch)."""
    if num_frames < 1 or frame_interval < 1:
        raise ValueError(f"num_frames ({num_frames}) and frame_interval ({frame_interval}) "
                         "must be positive")
    span = (num_frames - 1) * frame_interval + 1
    if span > total:
        raise VideoReadError(
            f"need {span} frames ({num_frames} every {frame_interval}) but the clip has {total}")
    if start is None:
        start = int((rng or np.random.default_rng()).integers(0, total - span + 1))
    if not 0 <= start <= total - span:
        raise VideoReadError(f"window start {start} leaves fewer than {span} of {total} frames")
    return start + np.arange(num_frames) * frame_interval


def resize_center_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale (T, H, W, C) uint8 frames so they cover `size`, then cut the centre."""
    target_h, target_w = size
    height, width = frames.shape[1:3]
    if (height, width) == (target_h, target_w):
        return frames
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    out = np.empty((len(frames), target_h, target_w, frames.shape[3]), dtype=np.uint8)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC)
        out[i] = np.asarray(image)[top : top + target_h, left : left + target_w]
    return out


def to_model_range(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) uint8 -> (C, T, H, W) float32 in [-1, 1]."""
    return (frames.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """(C, T, H, W) float in [-1, 1] -> (T, H, W, C) uint8, clipping what the decoder overshoots."""
    video = np.clip((np.asarray(video, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.round(video).astype(np.uint8).transpose(1, 2, 3, 0)


def read_frames(path: str | os.PathLike, num_frames: int | None = None, frame_interval: int = 1,
                start: int | None = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Decoded frames (T, H, W, C) uint8; all of them when `num_frames` is None."""
    reader = _open(path)
    if num_frames is None:
        indices = np.arange(0, len(reader), frame_interval)
    else:
        try:
            indices = frame_indices(len(reader), num_frames, frame_interval, start, rng)
        except VideoReadError as exc:
            raise VideoReadError(f"{path}: {exc}") from None
    try:
        return reader.get_batch(indices.tolist()).asnumpy()
    except Exception as exc:
        raise VideoReadError(f"cannot decode frames of {path}: {exc}") from exc


def read_video(path: str | os.PathLike, num_frames: int | None = None, frame_interval: int = 1,
               size: tuple[int, int] | None = None, start: int | None = 0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """A clip as the VAE expects it: (C, T, H, W) float32 in [-1, 1], resized and centre-cropped
    to `size` when given."""
    frames = read_frames(path, num_frames, frame_interval, start, rng)
    if size is not None:
        frames = resize_center_crop(frames, tuple(size))
    return to_model_range(frames)


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A still image as a one-frame clip (C, 1, H, W), for image-to-video conditioning."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"image not found: {path}")
    try:
        frame = np.asarray(Image.open(path).convert("RGB"))[None]
    except Exception as exc:
        raise VideoReadError(f"cannot read image {path}: {exc}") from exc
    if size is not None:
        frame = resize_center_crop(frame, tuple(size))
    return to_model_range(frame)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8,
                quality_crf: int = 18) -> Path:
    """Write (T, H, W, C) uint8 frames to `.mp4` (H.264) or `.gif`, atomically.

    Odd sizes are padded by one pixel for mp4 because yuv420p needs even dimensions.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    suffix = path.suffix.lower()
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        with atomic_write(path) as handle:
            images[0].save(handle, format="GIF", save_all=True, append_images=images[1:],
                           duration=round(1000 / fps), loop=0)
        return path
    if suffix != ".mp4":
        raise ValueError(f"{path}: write .mp4 or .gif")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with atomic_write(path) as handle:
        _encode_mp4(handle, frames, fps, quality_crf)
    return path


def _encode_mp4(handle, frames: np.ndarray, fps: float, crf: int) -> None:
    with av.open(handle, mode="w", format="mp4") as container:
        rate = fractions.Fraction(fps).limit_denominator(1000)
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # one thread and fixed options keep the bytes identical from run to run
        stream.options = {"crf": str(crf), "threads": "1", "preset": "medium"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
