"""A clip whose container is intact but whose video stream is damaged (for fail-safe tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opensora.data.video import write_video


def write_damaged_mp4(path: Path, frames: int = 16, size: int = 64) -> Path:
    """An mp4 that decord opens (header and index intact) but cannot decode: random bytes
    over the first coded frames. Noise frames keep the stream large enough to damage."""
    rng = np.random.default_rng(1)
    write_video(path, rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8), 8)
    data = bytearray(path.read_bytes())
    start = data.find(b"mdat") + 8
    if start < 8 or len(data) < start + 3000:
        raise AssertionError(f"{path}: no media data to damage")
    data[start : start + 3000] = rng.integers(0, 255, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path
