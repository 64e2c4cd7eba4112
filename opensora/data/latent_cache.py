"""Encode every video of a video-caption csv once, so training never runs the VAE.

One `.npz` per video, at the video's path under `out` with the suffix replaced
(`videos/clip_000.mp4` -> `OUT/videos/clip_000.npz`), as the seed's `infer_vae` writes them:

- `latent_mean`, `latent_std`: the *unscaled* posterior mean and std, (C, T, H/f, W/f) float32;
  a training sample is `(mean + std * eps) * 0.18215`, a fresh posterior draw every epoch;
- `fps`: the clip's frame rate; `ori_size`: (H, W) of the frames that were encoded.

With `image_size` the frames are resized and centre-cropped first; `multi_resolution=True` then
writes under `OUT/latent_{H}x{W}/...`, so one folder holds caches for several bucket resolutions.
Files are written atomically: an interrupted run leaves only complete files and the next run
skips them (resumable). An unreadable video is reported with its csv line and error and does not
stop the others. `vae.json` in the folder records a fingerprint of the VAE's weights: resuming
into a folder encoded by another VAE is an error (stale latents would silently train a model for
the wrong decoder), unless `overwrite` re-encodes everything.

    python -m opensora.data.latent_cache --csv data_samples/video_caption.csv \\
        --vae data_samples/models/vae_tiny --out cache/latents
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from tqdm.auto import tqdm

from opensora.checkpoint import save_npz_atomic
from opensora.data.cache_files import (
    cache_path,
    claim_cache_folder,
    parameters_fingerprint,
    verify_cache_folder,
)
from opensora.data.video import VideoReadError, read_video, video_info
from opensora.models.vae import VideoAutoencoderKL
from opensora.runtime import configure


@dataclass
class LatentCacheReport:
    written: int
    skipped: int
    out_dir: Path
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (csv line, video, error)

    def summary(self) -> str:
        text = (f"{self.written} written, {self.skipped} already cached, {len(self.failed)} "
                f"failed, in {self.out_dir}")
        for line, video, error in self.failed[:20]:
            text += f"\n  line {line}: {video}: {error}"
        return text


def resolution_folder(out_dir: str | os.PathLike, image_size: tuple[int, int]) -> Path:
    """The multi-resolution layout: `out/latent_{H}x{W}`."""
    return Path(out_dir) / f"latent_{image_size[0]}x{image_size[1]}"


def read_video_rows(csv_path: str | os.PathLike, video_column: str = "video"
                    ) -> list[tuple[int, str]]:
    """(csv line, video) for every row; a missing csv or column is an error, not a skip."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"video csv {csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if video_column not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: no {video_column!r} column; the csv has "
                             f"{reader.fieldnames}. Pass --video-column to name it.")
        rows = [(i + 2, (row[video_column] or "").strip()) for i, row in enumerate(reader)]
    if not rows:
        raise ValueError(f"{csv_path}: no rows below the header")
    return rows


def encode_video_moments(vae: Any, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, T, H, W) clip in [-1, 1] -> unscaled posterior (mean, std), each (c, T, h, w)."""
    mean, std = vae.encode_moments(ms.Tensor(video[None].astype(np.float32)))
    return mean.asnumpy()[0].astype(np.float32), std.asnumpy()[0].astype(np.float32)


FINGERPRINT_FILE = "vae.json"
RECORD = (FINGERPRINT_FILE, "VAE", "latents")  # record file, owner, contents


def vae_fingerprint(vae: Any) -> str:
    """Identical weights, identical latents."""
    return parameters_fingerprint(vae)


def claim_folder(out_dir: Path, vae: Any, overwrite: bool) -> None:
    """Record the VAE that encodes into `out_dir`; refuse a folder another VAE filled."""
    claim_cache_folder(out_dir, *RECORD, vae_fingerprint(vae), overwrite)


def check_folder(folder: str | os.PathLike, vae: Any) -> None:
    """A latent folder given to a run (not filled by it): refuse another VAE's, warn when it
    records none."""
    verify_cache_folder(folder, *RECORD, vae_fingerprint(vae))


def cache_latents(csv_path: str | os.PathLike, out_dir: str | os.PathLike, vae: Any,
                  image_size: tuple[int, int] | None = None, multi_resolution: bool = False,
                  video_column: str = "video", overwrite: bool = False,
                  progress: bool = True) -> LatentCacheReport:
    """Encode the videos whose cache file is missing (all with `overwrite`); `vae` is a
    `VideoAutoencoderKL` (its `micro_batch_size` bounds the frames per VAE call)."""
    if multi_resolution and image_size is None:
        raise ValueError("multi_resolution needs image_size: the folder is named after it")
    csv_path = Path(csv_path)
    out_dir = resolution_folder(out_dir, image_size) if multi_resolution else Path(out_dir)
    rows = read_video_rows(csv_path, video_column)
    claim_folder(out_dir, vae, overwrite)
    report = LatentCacheReport(written=0, skipped=0, out_dir=out_dir)
    done: set[Path] = set()
    bar = tqdm(rows, desc="VAE latents", unit="video", disable=not progress)
    for line, video in bar:
        if not video:
            report.failed.append((line, video, f"empty {video_column!r} cell"))
            continue
        target = cache_path(out_dir, video, csv_path.parent)
        if target in done or (not overwrite and target.is_file()):
            report.skipped += 1
            continue
        source = Path(video) if Path(video).is_absolute() else csv_path.parent / video
        try:
            info = video_info(source)
            clip = read_video(source, size=image_size)
        except VideoReadError as exc:
            report.failed.append((line, video, str(exc)))
            continue
        mean, std = encode_video_moments(vae, clip)
        save_npz_atomic(target, latent_mean=mean, latent_std=std, fps=np.float32(info.fps),
                        ori_size=np.array(clip.shape[-2:], np.int32))
        done.add(target)
        report.written += 1
    bar.close()
    return report


def main(argv: list[str] | None = None) -> LatentCacheReport:
    parser = argparse.ArgumentParser(description="Cache VAE latents of a video-caption csv.")
    parser.add_argument("--csv", required=True, help="csv with a video column")
    parser.add_argument("--vae", required=True, help="diffusers-layout AutoencoderKL folder")
    parser.add_argument("--out", required=True, help="output folder, mirrors the video paths")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="resize and centre-crop frames first (default: as stored)")
    parser.add_argument("--multi-resolution", action="store_true",
                        help="write under OUT/latent_{H}x{W}/ (needs --image-size)")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="frames per VAE call (default: a whole clip)")
    parser.add_argument("--video-column", default="video")
    parser.add_argument("--overwrite", action="store_true", help="re-encode existing files")
    args = parser.parse_args(argv)
    configure()
    vae = VideoAutoencoderKL.from_pretrained(args.vae, micro_batch_size=args.micro_batch_size)
    report = cache_latents(args.csv, args.out, vae,
                           tuple(args.image_size) if args.image_size else None,
                           args.multi_resolution, args.video_column, args.overwrite)
    print(report.summary())
    if report.failed:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
