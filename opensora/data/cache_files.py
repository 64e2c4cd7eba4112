"""Where cached VAE latents and T5 embeddings live, and how they are read back.

Both caches mirror the video paths of a csv with `.npz` files; this module is numpy-only so the
dataset's worker processes read caches without importing the models that wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def parameters_fingerprint(cell: Any, extra: Iterable[bytes] = ()) -> str:
    """sha256 (16 hex digits) over a model's parameter names and values, plus `extra` bytes
    (settings that also change its outputs): identical fingerprints, identical cache files."""
    digest = hashlib.sha256()
    for param in sorted(cell.get_parameters(), key=lambda p: p.name):
        digest.update(param.name.encode())
        digest.update(np.ascontiguousarray(param.asnumpy()).tobytes())
    for item in extra:
        digest.update(item)
    return digest.hexdigest()[:16]


def _other_model(folder: Path, record_name: str, model: str, contents: str, fingerprint: str,
                 remedy: str) -> ValueError | None:
    """The error for a folder whose record names another `model`; None if it names this one
    or there is no record."""
    record = folder / record_name
    if not record.is_file():
        return None
    previous = json.loads(record.read_text()).get(f"{model.lower()}_fingerprint")
    if previous == fingerprint:
        return None
    return ValueError(f"{folder} holds {contents} of another {model} (fingerprint {previous}, "
                      f"this {model} {fingerprint}); {remedy}")


def claim_cache_folder(out_dir: Path, record_name: str, model: str, contents: str,
                       fingerprint: str, overwrite: bool) -> None:
    """Record in `out_dir/record_name` which `model` (e.g. "VAE", "T5") fills the folder with
    `contents`, and refuse a folder another one filled: a resumed run would otherwise mix the
    two models' files silently."""
    if not overwrite:
        error = _other_model(out_dir, record_name, model, contents, fingerprint,
                             "use a new folder, delete it, or pass overwrite=True "
                             "(--overwrite) to re-encode everything")
        if error is not None:
            raise error
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / record_name
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({f"{model.lower()}_fingerprint": fingerprint}) + "\n")
    os.replace(tmp, record)


def verify_cache_folder(folder: str | os.PathLike, record_name: str, model: str, contents: str,
                        fingerprint: str) -> None:
    """Check a folder the user names (and this run will not fill) against the `model` about to
    use it: a record of another model is an error, as in `claim_cache_folder`; a folder
    without one (filled by hand or by an older version) is used with a warning."""
    folder = Path(folder)
    error = _other_model(folder, record_name, model, contents, fingerprint,
                         f"training on them would pair another {model}'s {contents} with this "
                         f"one; pass the folder this {model} filled, or none to build a cache")
    if error is not None:
        raise error
    if not (folder / record_name).is_file():
        warnings.warn(f"{folder} has no {record_name}: cannot check that this {model} encoded "
                      f"its {contents}", stacklevel=3)
