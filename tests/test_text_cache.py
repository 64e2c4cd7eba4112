"""The T5 embedding cache: mirrored npz files, batching, resuming, atomicity and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_f32_close

from opensora.data.cache_files import cache_path, load_text_embedding
from opensora.data.text_cache import (
    FINGERPRINT_FILE,
    cache_text_embeddings,
    main,
    read_caption_rows,
    t5_fingerprint,
)
from opensora.models.text_encoder import T5Encoder
from opensora.presets import get_preset

TINY = get_preset("tiny")
CAPTIONS = [
    "a red circle moving left on a black background",
    "a blue square moving right on a white background",
    "a green triangle moving left on a gray background",
    "a red square moving right on a gray background",
    "a blue circle moving left on a white background",
]


@pytest.fixture(scope="module")
def encoder() -> T5Encoder:
    return T5Encoder(TINY.t5_path, TINY.tokenizer_path, model_max_length=TINY.model_max_length)


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def caption_csv(tmp_path: Path) -> Path:
    rows = [{"video": f"videos/sub{i % 2}/clip_{i:03d}.mp4", "caption": c}
            for i, c in enumerate(CAPTIONS)]
    return _write_csv(tmp_path / "video_caption.csv", rows)


def test_cache_mirrors_videos_and_matches_encoder(caption_csv: Path, tmp_path: Path,
                                                  encoder: T5Encoder) -> None:
    out = tmp_path / "cache"
    report = cache_text_embeddings(caption_csv, out, encoder, batch_size=2, progress=False)
    assert (report.written, report.skipped) == (len(CAPTIONS), 0)
    direct = encoder.encode(CAPTIONS)
    for i in range(len(CAPTIONS)):
        path = out / f"videos/sub{i % 2}/clip_{i:03d}.npz"
        y, mask = load_text_embedding(path)
        assert y.dtype == np.float32 and y.shape == (TINY.model_max_length, encoder.output_dim)
        assert mask.shape == (TINY.model_max_length,)
        np.testing.assert_array_equal(mask, direct["mask"].asnumpy()[i])
        # the same encoder on batches of 2 and of all captions: another batch shape
        assert_f32_close(y, direct["y"].asnumpy()[i, 0], 64)


def test_cache_resumes_and_overwrites(caption_csv: Path, tmp_path: Path,
                                      encoder: T5Encoder) -> None:
    out = tmp_path / "cache"
    cache_text_embeddings(caption_csv, out, encoder, progress=False)
    again = cache_text_embeddings(caption_csv, out, encoder, progress=False)
    assert (again.written, again.skipped) == (0, len(CAPTIONS))
    (out / "videos/sub0/clip_002.npz").unlink()
    resumed = cache_text_embeddings(caption_csv, out, encoder, progress=False)
    assert (resumed.written, resumed.skipped) == (1, len(CAPTIONS) - 1)
    forced = cache_text_embeddings(caption_csv, out, encoder, overwrite=True, progress=False)
    assert forced.written == len(CAPTIONS)


def test_a_folder_filled_by_another_t5_is_refused(caption_csv: Path, tmp_path: Path,
                                                  encoder: T5Encoder) -> None:
    out = tmp_path / "cache"
    cache_text_embeddings(caption_csv, out, encoder, progress=False)
    assert json.loads((out / FINGERPRINT_FILE).read_text()) == {
        "t5_fingerprint": t5_fingerprint(encoder)}
    shorter = T5Encoder(TINY.t5_path, TINY.tokenizer_path,
                        model_max_length=TINY.model_max_length // 2)
    assert t5_fingerprint(shorter) != t5_fingerprint(encoder)
    with pytest.raises(ValueError, match="caption embeddings of another T5.*overwrite"):
        cache_text_embeddings(caption_csv, out, shorter, progress=False)
    forced = cache_text_embeddings(caption_csv, out, shorter, overwrite=True, progress=False)
    assert forced.written == len(CAPTIONS)
    y, _ = load_text_embedding(next(out.rglob("*.npz")))
    assert y.shape[0] == TINY.model_max_length // 2
    again = cache_text_embeddings(caption_csv, out, shorter, progress=False)
    assert (again.written, again.skipped) == (0, len(CAPTIONS))


def test_interrupted_run_leaves_only_complete_files(caption_csv: Path, tmp_path: Path,
                                                    encoder: T5Encoder) -> None:
    class Crashing:
        t5, model_max_length = encoder.t5, encoder.model_max_length  # same fingerprint

        def __init__(self) -> None:
            self.calls = 0

        def encode(self, texts: list[str]) -> dict:
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return encoder.encode(texts)

    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        cache_text_embeddings(caption_csv, out, Crashing(), batch_size=2,  # type: ignore[arg-type]
                              progress=False)
    files = [p for p in out.rglob("*") if p.is_file() and p.name != FINGERPRINT_FILE]
    assert len(files) == 2 and all(p.suffix == ".npz" for p in files)
    for path in files:
        load_text_embedding(path)
    report = cache_text_embeddings(caption_csv, out, encoder, batch_size=2, progress=False)
    assert (report.written, report.skipped) == (3, 2)


def test_missing_column_is_named(tmp_path: Path, encoder: T5Encoder) -> None:
    path = _write_csv(tmp_path / "bad.csv", [{"video": "a.mp4", "text": "a red circle"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['caption'\].*'text'"):
        cache_text_embeddings(path, tmp_path / "out", encoder, progress=False)
    assert read_caption_rows(path, caption_column="text") == [("a.mp4", "a red circle")]


def test_empty_captions_are_refused_before_encoding(tmp_path: Path, encoder: T5Encoder) -> None:
    rows = [{"video": "a.mp4", "caption": "a red circle"}, {"video": "b.mp4", "caption": "  "},
            {"video": "c.mp4", "caption": ""}]
    path = _write_csv(tmp_path / "empty.csv", rows)
    with pytest.raises(ValueError, match=r"empty caption on line\(s\) \[3, 4\]"):
        cache_text_embeddings(path, tmp_path / "out", encoder, progress=False)
    assert not (tmp_path / "out").exists()


def test_other_bad_input(tmp_path: Path, encoder: T5Encoder) -> None:
    with pytest.raises(FileNotFoundError, match="caption csv"):
        read_caption_rows(tmp_path / "nope.csv")
    (tmp_path / "header.csv").write_text("video,caption\n")
    with pytest.raises(ValueError, match="no rows"):
        read_caption_rows(tmp_path / "header.csv")
    rows = [{"video": "a.mp4", "caption": "one"}, {"video": "a.mp4", "caption": "two"}]
    path = _write_csv(tmp_path / "dup.csv", rows)
    with pytest.raises(ValueError, match="different captions"):
        cache_text_embeddings(path, tmp_path / "out", encoder, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        cache_text_embeddings(path, tmp_path / "out", encoder, batch_size=0)


def test_cache_path_keeps_absolute_videos_inside_out(tmp_path: Path) -> None:
    assert cache_path("out", "videos/x.mp4") == Path("out/videos/x.npz")
    inside = tmp_path / "videos" / "x.mp4"
    assert cache_path("out", str(inside), tmp_path) == Path("out/videos/x.npz")
    assert cache_path("out", "/elsewhere/y.mp4", tmp_path) == Path("out/elsewhere/y.npz")


def test_command_line(caption_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    report = main(["--csv", str(caption_csv), "--t5", str(TINY.t5_path), "--tokenizer",
                   str(TINY.tokenizer_path), "--out", str(out), "--model-max-length", "16",
                   "--batch-size", "4"])
    assert report.written == len(CAPTIONS)
    assert len(list(out.rglob("*.npz"))) == len(CAPTIONS)
