"""Encode every caption of a video-caption csv once, so training never runs T5.

One `.npz` per video, at the video's path under `out` with the suffix replaced
(`videos/clip_000.mp4` -> `OUT/videos/clip_000.npz`), holding `y` (L, C) float32 and `mask` (L,)
int32. Files are written atomically, so an interrupted run leaves only complete files and the
next run skips them (resumable). All captions are checked before any encoding starts.
`t5.json` in the folder records a fingerprint of the T5 weights, tokenizer and
`model_max_length`: resuming into a folder another T5 filled is refused instead of mixing the
two encoders' features.

    python -m opensora.data.text_cache --csv data_samples/video_caption.csv \\
        --t5 data_samples/models/t5_tiny --tokenizer data_samples/tokenizer --out cache/t5 \\
        --model-max-length 16
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from opensora.checkpoint import save_npz_atomic
from opensora.data.cache_files import (
    cache_path,
    claim_cache_folder,
    parameters_fingerprint,
    verify_cache_folder,
)
from opensora.models.text_encoder import T5Encoder
from opensora.runtime import configure

FINGERPRINT_FILE = "t5.json"
RECORD = (FINGERPRINT_FILE, "T5", "caption embeddings")  # record file, owner, contents
# tokenized into the fingerprint, so a different vocabulary or padding changes it
_TOKENIZER_PROBE = "a red circle moving left on a gray background, 0123456789 ÄÖü ?!"


def t5_fingerprint(encoder: T5Encoder) -> str:
    """Identical weights, tokenizer and caption length, identical cache files."""
    ids, mask = encoder.t5.tokenize([_TOKENIZER_PROBE])
    extra = (f"model_max_length={encoder.model_max_length}".encode(),
             np.ascontiguousarray(ids, np.int64).tobytes(),
             np.ascontiguousarray(mask, np.int64).tobytes())
    return parameters_fingerprint(encoder.t5.model, extra)


def check_folder(folder: str | os.PathLike, encoder: T5Encoder) -> None:
    """A caption folder given to a run (not filled by it): refuse another T5's, warn when it
    records none."""
    verify_cache_folder(folder, *RECORD, t5_fingerprint(encoder))


def claim_folder(out_dir: Path, encoder: T5Encoder, overwrite: bool) -> None:
    """Record that this T5 fills `out_dir`; refuse a folder another T5 filled."""
    claim_cache_folder(out_dir, *RECORD, t5_fingerprint(encoder), overwrite)


@dataclass
class CacheReport:
    written: int
    skipped: int
    out_dir: Path


def read_caption_rows(csv_path: str | os.PathLike, video_column: str = "video",
                      caption_column: str = "caption") -> list[tuple[str, str]]:
    """(video, caption) pairs, refusing missing columns and empty captions with row numbers."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"caption csv {csv_path} not found")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (video_column, caption_column) if c not in columns]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {missing}; the csv has {columns}. Pass "
                "--video-column / --caption-column to name the right ones."
            )
        rows = [(row[video_column] or "", row[caption_column] or "") for row in reader]
    if not rows:
        raise ValueError(f"{csv_path}: no rows below the header")
    # line numbers as an editor shows them: the header is line 1
    empty = [i + 2 for i, (_, caption) in enumerate(rows) if not caption.strip()]
    if empty:
        raise ValueError(
            f"{csv_path}: empty caption on line(s) {empty[:20]}"
            f"{' ...' if len(empty) > 20 else ''}; write a caption or drop those rows "
            "(an empty caption would silently train the model on the null prompt)"
        )
    no_video = [i + 2 for i, (video, _) in enumerate(rows) if not video.strip()]
    if no_video:
        raise ValueError(f"{csv_path}: empty {video_column!r} on line(s) {no_video[:20]}")
    return rows


def _plan(rows: list[tuple[str, str]], out_dir: Path, csv_dir: Path
          ) -> dict[Path, tuple[str, int]]:
    """Output file -> (caption, csv line); one video listed twice must keep one caption."""
    plan: dict[Path, tuple[str, int]] = {}
    for i, (video, caption) in enumerate(rows):
        target = cache_path(out_dir, video, csv_dir)
        if target in plan and plan[target][0] != caption:
            raise ValueError(
                f"{video} appears on lines {plan[target][1]} and {i + 2} with different captions; "
                "one cache file per video cannot hold both"
            )
        plan.setdefault(target, (caption, i + 2))
    return plan


def cache_text_embeddings(csv_path: str | os.PathLike, out_dir: str | os.PathLike,
                          encoder: T5Encoder, batch_size: int = 8, video_column: str = "video",
                          caption_column: str = "caption", overwrite: bool = False,
                          progress: bool = True) -> CacheReport:
    """Encode the captions whose cache file is missing (all of them with `overwrite`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    plan = _plan(read_caption_rows(csv_path, video_column, caption_column), out_dir,
                 csv_path.parent)
    claim_folder(out_dir, encoder, overwrite)
    todo = [(path, caption) for path, (caption, _) in plan.items()
            if overwrite or not path.is_file()]
    bar = tqdm(total=len(todo), desc="T5 captions", unit="caption", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        out = encoder.encode([caption for _, caption in batch])
        y = out["y"].asnumpy()[:, 0].astype(np.float32)
        mask = out["mask"].asnumpy().astype(np.int32)
        for row, (path, _) in enumerate(batch):
            save_npz_atomic(path, y=y[row], mask=mask[row])
        bar.update(len(batch))
    bar.close()
    return CacheReport(written=len(todo), skipped=len(plan) - len(todo), out_dir=out_dir)


def main(argv: list[str] | None = None) -> CacheReport:
    parser = argparse.ArgumentParser(description="Cache T5 embeddings of a video-caption csv.")
    parser.add_argument("--csv", required=True, help="csv with video and caption columns")
    parser.add_argument("--t5", required=True, help="T5 folder (config.json + weights)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the T5 folder)")
    parser.add_argument("--out", required=True, help="output folder, mirrors the video paths")
    parser.add_argument("--model-max-length", type=int, default=120,
                        help="tokens per caption (Open-Sora 1.0: 120, 1.1: 200, tiny: 16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--video-column", default="video")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--overwrite", action="store_true", help="re-encode existing files")
    args = parser.parse_args(argv)
    configure()
    encoder = T5Encoder(args.t5, args.tokenizer, model_max_length=args.model_max_length)
    report = cache_text_embeddings(args.csv, args.out, encoder, args.batch_size,
                                   args.video_column, args.caption_column, args.overwrite)
    print(f"{report.written} written, {report.skipped} already cached, in {report.out_dir}")
    return report


if __name__ == "__main__":
    main()
