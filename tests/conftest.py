"""Shared fixtures: every notebook of the book is executed once per test session (with its CI
parameters) into a copy of the book, which the notebook tests inspect and the book test builds."""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml

from opensora.data.video import read_video
from opensora.jobs import JobError, JobResult, run_notebook, toc_notebooks
from opensora.models.text_encoder import T5Encoder
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import DATA_SAMPLES, get_preset
from opensora.runtime import configure
from opensora.train import caption_embeddings, micro_condition_arrays

ROOT = Path(__file__).resolve().parent.parent
configure()  # as the CLIs and notebooks do: the suite tests the runtime users get
BOOK_SOURCES = ("book", "notebooks", "research", "_config.yml", "_toc.yml")  # research: records


@dataclass
class ExecutedBook:
    root: Path  # a copy of the book sources whose notebooks hold their executed outputs
    results: dict[str, JobResult | JobError] = field(default_factory=dict)

    def result(self, name: str) -> JobResult:
        outcome = self.results[name]
        if isinstance(outcome, JobError):
            raise outcome
        return outcome


@pytest.fixture(scope="session")
def executed_book(tmp_path_factory: pytest.TempPathFactory) -> ExecutedBook:
    os.environ.pop("MPLBACKEND", None)  # kernels must draw inline, whatever the shell set
    root = tmp_path_factory.mktemp("book")
    for name in BOOK_SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("runs", ".*"))
        else:
            shutil.copy2(source, root / name)
    config = yaml.safe_load((root / "_config.yml").read_text())
    # the chapters run below as papermill jobs; the build executes only the prose pages with
    # code cells (book/jobs.md), never a chapter again
    config["execute"]["execute_notebooks"] = "auto"
    config["execute"]["exclude_patterns"] = [
        str(nb.relative_to(ROOT)) for nb in toc_notebooks(ROOT)]
    (root / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    book = ExecutedBook(root)
    for notebook in toc_notebooks(root):
        try:
            result = run_notebook(notebook, output_dir=root / "runs" / notebook.stem, ci=True,
                                  timeout=900)
        except JobError as exc:
            book.results[notebook.stem] = exc
            continue
        shutil.copy2(result.notebook, notebook)
        book.results[notebook.stem] = result
    return book


@pytest.fixture(scope="session")
def real_batch() -> dict[str, np.ndarray]:
    """Four training clips of data_samples as latents, with their captions and micro-conditions."""
    preset = get_preset("tiny")
    with (DATA_SAMPLES / "video_caption.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:4]
    vae = VideoAutoencoderKL.from_pretrained(preset.vae_path)
    video = np.stack([read_video(DATA_SAMPLES / r["video"], num_frames=preset.num_frames,
                                 frame_interval=preset.frame_interval, size=preset.image_size)
                      for r in rows])
    x = vae.encode(ms.Tensor(video), sample_posterior=False).asnumpy()
    text_encoder = T5Encoder(preset.t5_path, preset.tokenizer_path,
                             model_max_length=preset.model_max_length)
    y, mask = caption_embeddings(text_encoder, [r["caption"] for r in rows])
    micro = micro_condition_arrays(len(rows), preset.num_frames, preset.image_size, preset.fps)
    return {"x": x, "y": y, "mask": mask, "caption": np.array([r["caption"] for r in rows]),
            **micro}
