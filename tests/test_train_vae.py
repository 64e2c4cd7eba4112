"""Training the tiny VAE: a short run learns, and the folder it writes is a usable preset VAE
whose latent scale is measured, not assumed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from opensora.models.vae import SD_SCALING_FACTOR, VideoAutoencoderKL
from opensora.train.vae import (
    VAETrainConfig,
    crops_around_foreground,
    foreground_mask,
    main,
    train_vae,
)

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


def small_csv(folder: Path, clips: list[str]) -> Path:
    path = folder / "clips.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows([str(SAMPLES / "videos" / c), "a clip"] for c in clips)
    return path


def small_config(tmp_path: Path, steps: int) -> VAETrainConfig:
    return VAETrainConfig(
        csv=str(small_csv(tmp_path, ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4"])),
        eval_csv=None, holdout=1, block_out_channels=(8, 8), norm_num_groups=4, steps=steps,
        batch_size=4, lr=2e-3, log_every=steps // 2, frames_per_clip=4, crop_size=16)


def test_short_run_learns_and_writes_a_loadable_folder_with_its_latent_scale(
        tmp_path: Path) -> None:
    config = small_config(tmp_path, steps=30)
    vae, summary = train_vae(config, tmp_path / "vae", log=lambda _: None)
    first, last = summary["history"][0]["loss"], summary["history"][-1]["loss"]
    assert last < first, summary["history"]
    assert summary["heldout_clips"] == ["clip_002.mp4"]
    assert np.isfinite(summary["heldout_psnr_db"])
    scale = summary["scaling_factor"]
    assert scale > 0 and scale != SD_SCALING_FACTOR
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == scale
    loaded = VideoAutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.scaling_factor == scale, "the wrapper reads the folder's latent scale"
    assert VideoAutoencoderKL.from_pretrained(tmp_path / "vae", scaling_factor=0.5
                                              ).scaling_factor == 0.5


def test_foreground_crops_contain_the_shape() -> None:
    frames = np.full((2, 3, 32, 32), -1.0, np.float32)
    frames[:, 0, 20:24, 5:9] = 1.0  # a red square on black
    masks = foreground_mask(frames)
    assert masks.sum() == 2 * 16
    crops, crop_masks = crops_around_foreground(frames, masks, 12, np.random.default_rng(0))
    assert crops.shape == (2, 3, 12, 12)
    assert (crop_masks.reshape(2, -1).sum(axis=1) > 0).all()


def test_bad_holdout_and_missing_csv_are_clear(tmp_path: Path) -> None:
    config = small_config(tmp_path, steps=2)
    config.holdout = 3
    with pytest.raises(ValueError, match="holdout=3"):
        train_vae(config)
    with pytest.raises(FileNotFoundError, match="video csv not found"):
        main(["--out", str(tmp_path / "x"), "--csv", str(tmp_path / "nope.csv")])
