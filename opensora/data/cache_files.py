"""Where cached VAE latents and T5 embeddings live, and how they are read back.

Both caches mirror the video paths of a csv with `.npz` files; this module is numpy-only so the
dataset's worker processes read caches without importing the models that wrote them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cache_path(out_dir: str | os.PathLike, video: str, csv_dir: Path | None = None) -> Path:
    """Where the embedding of `video` (a path as written in the csv) is stored."""
    relative = Path(video)
    if relative.is_absolute():
        if csv_dir is not None and relative.is_relative_to(csv_dir.resolve()):
            relative = relative.relative_to(csv_dir.resolve())
        else:
            relative = Path(*relative.parts[1:])
    return Path(out_dir) / relative.with_suffix(".npz")


def load_text_embedding(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(y (L, C) float32, mask (L,) int32) from a cache file."""
    with np.load(path) as data:
        missing = {"y", "mask"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: not a text-embedding cache file (missing {sorted(missing)})")
        return data["y"].astype(np.float32), data["mask"].astype(np.int32)


def load_latent_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A cache file as a dict: latent_mean / latent_std (C, T, h, w), fps, ori_size (H, W)."""
    with np.load(path) as data:
        missing = {"latent_mean", "latent_std"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: not a latent cache file (missing {sorted(missing)})")
        return {k: data[k] for k in data.files}
