"""Shared by the staged proof of the tiny preset (`stage_a_one_shape.py`, `stage_b_training.py`,
`stage_c_heldout.py`): writing a world of chosen clips, training the chapter-6 recipe on it as a
job, and scoring sampled clips against their captions over several seeds.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opensora.data.synthetic import ClipSpec, render_clip
from opensora.data.video import write_video
from opensora.evaluation import Scores
from opensora.models.text_encoder import T5Encoder
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import Preset, build_model, get_preset
from opensora.train import evaluate_captions

ROOT = Path(__file__).resolve().parent.parent
RECIPE = dict(batch_size=16, lr=1e-3, ckpt_every=50, keep_last=2, sample_every=0,
              sample_steps=50, max_clips=0, evaluate=False)  # make tiny-weights' values


def write_world(out: Path, specs: Sequence[ClipSpec], fps: int = 8) -> Path:
    """mp4 clips and their caption csv (skipping clips already written: resumable)."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(specs):
        name = f"videos/clip_{i:05d}.mp4"
        if not (out / name).is_file():
            write_video(out / name, render_clip(spec), fps)
        rows.append((name, spec.caption))
    csv_path = out / "video_caption.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    return csv_path


def train_job(csv_path: Path, out: Path, steps: int, export_dir: Path, **overrides: object
              ) -> None:
    """The training chapter as a papermill job on `csv_path` (caches built by the job)."""
    params = {**RECIPE, **overrides, "csv_path": str(csv_path), "steps": steps,
              "export_dir": str(export_dir)}
    command = [sys.executable, "-m", "opensora.jobs", "notebooks/06_training.ipynb", "-o",
               str(out)]
    for key, value in params.items():
        command += ["-p", key, value if isinstance(value, str) else repr(value)]
    subprocess.run(command, check=True, cwd=ROOT)


def sample_scores(captions: Sequence[str], seeds: Sequence[int], model_path: Path | None = None,
                  preset: Preset | None = None) -> tuple[list[Scores], np.ndarray]:
    """Scores of one sampled clip per caption and seed (the book's cfg scale and 50 steps)."""
    preset = preset or get_preset("tiny")
    model = build_model(preset, model_path)
    model.set_train(False)
    vae = VideoAutoencoderKL.from_pretrained(preset.vae_path)
    text_encoder = T5Encoder(preset.t5_path, preset.tokenizer_path,
                             model_max_length=preset.model_max_length)
    scores, clips = [], []
    for seed in seeds:
        score, clip = evaluate_captions(model, vae, text_encoder, captions, preset.num_frames,
                                        preset.image_size, preset.fps, num_sampling_steps=50,
                                        seed=seed, batch_size=8, graph=True,
                                        noise_schedule=preset.noise_schedule)
        scores.append(score)
        clips.append(clip)
    return scores, np.stack(clips)


def pooled(scores: Sequence[Scores]) -> dict[str, float]:
    """The summary statistics over every clip of every seed."""
    return Scores([c for s in scores for c in s.clips]).summary()


def write_record(script: str, record: dict) -> Path:
    out = Path(script).with_suffix(".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return out
