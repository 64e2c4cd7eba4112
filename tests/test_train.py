"""Training: the loss falls, resume is exact, corrupt checkpoints fall back, bad rows skipped."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_f32_close

from opensora.checkpoint import read_state_dict
from opensora.data import latent_cache, text_cache
from opensora.data.dataset import VideoCaptionDataset
from opensora.data.mask_generator import DEFAULT_MASK_RATIOS, MaskGenerator
from opensora.models.stdit2 import STDiT2
from opensora.models.text_encoder import T5Encoder
from opensora.models.vae import VideoAutoencoderKL
from opensora.parallel.launch import launch
from opensora.presets import get_preset
from opensora.schedulers.iddpm import IDDPM
from opensora.train import (
    Callback,
    LossHistory,
    Trainer,
    TrainStep,
    checkpoint_dirs,
    prepare_caches,
    read_loss_csv,
    sample_latents,
    seed_everything,
)
from opensora.train.__main__ import main as train_main

TINY = dict(input_sq_size=8, in_channels=4, hidden_size=24, depth=1, num_heads=2,
            caption_channels=8, model_max_length=4, qk_norm=True)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Eight clips as cached latents + caption features, plus two bad rows."""
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        (root / "lat" / "v").mkdir(parents=True, exist_ok=True)
        (root / "txt" / "v").mkdir(parents=True, exist_ok=True)
        # a smooth blob that moves: structure the model can learn quickly
        grid = np.linspace(-1, 1, 8, dtype=np.float32)
        frames = [np.exp(-((grid[None] - 0.1 * t + 0.4) ** 2 + grid[:, None] ** 2) * 4)
                  for t in range(8)]
        mean = np.stack(frames)[None] * rng.uniform(-4, 4, (4, 1, 1, 1)).astype(np.float32)
        np.savez(root / "lat" / "v" / f"{i}.npz", latent_mean=mean.astype(np.float32),
                 latent_std=np.full_like(mean, 0.01), fps=np.float32(8),
                 ori_size=np.array([64, 64]))
        np.savez(root / "txt" / "v" / f"{i}.npz",
                 y=rng.standard_normal((4, 8)).astype(np.float32),
                 mask=np.array([1, 1, 1, 0], np.int32))
        rows.append((f"v/{i}.mp4", f"clip {i}"))
    rows += [("v/missing.mp4", "no cache for this one"), ("v/0.mp4", "")]
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    return {"csv": root / "train.csv", "lat": root / "lat", "txt": root / "txt"}


def _dataset(cached: dict[str, Path], seed: int = 0) -> VideoCaptionDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoCaptionDataset(cached["csv"], num_frames=4, image_size=(64, 64),
                                   batch_size=2, latent_folder=cached["lat"],
                                   text_folder=cached["txt"], seed=seed,
                                   latent_scaling_factor=1.0)


def _trainer(cached: dict[str, Path], out: Path, init_seed: int = 0, lr: float = 1e-3,
             **kwargs) -> Trainer:
    seed_everything(init_seed)
    step = TrainStep(STDiT2(**TINY), IDDPM(), lr=lr, ema_decay=0.9)
    kwargs.setdefault("num_workers", 0)
    return Trainer(step, _dataset(cached), out, seed=7, **kwargs)


def test_bad_loop_settings_are_refused(cached: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ckpt_every must be at least 1 step, got 0"):
        _trainer(cached, tmp_path, ckpt_every=0)
    for flag in ("--steps", "--ckpt-every"):
        with pytest.raises(SystemExit):
            train_main(["--latent-folder", str(cached["lat"]), "--text-folder",
                        str(cached["txt"]), "--output-dir", str(tmp_path), flag, "0"])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_bad_rows_are_skipped_and_counted_and_training_runs(cached: dict[str, Path]) -> None:
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        data = VideoCaptionDataset(cached["csv"], num_frames=4, batch_size=2,
                                   latent_folder=cached["lat"], text_folder=cached["txt"])
    assert data.skipped == {"missing text cache": 1, "empty caption": 1}
    assert len(data) == 8


def test_loss_falls(cached: dict[str, Path], tmp_path: Path) -> None:
    trainer = _trainer(cached, tmp_path, lr=2e-3, ckpt_every=1000)
    history = trainer.fit(16)
    losses = history.losses
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    rows = read_loss_csv(tmp_path / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_000016"]  # the final step
    assert history.steps_per_second() > 0


def test_sampling_with_the_compiled_denoiser_matches_pynative() -> None:
    seed_everything(3)
    model = STDiT2(**TINY)
    y = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
    args = (model, y, mask, (4, 4, 8, 8), (64, 64), 8, 3)
    eager = sample_latents(*args, seed=1)
    graph = sample_latents(*args, seed=1, graph=True)
    # float32 op order differs when compiled: ~1e3 roundings over 3 steps of a tiny STDiT2
    assert_f32_close(graph, eager, 1024)
    assert not model.training


def test_sampling_uses_the_given_noise_schedule() -> None:
    seed_everything(3)
    model = STDiT2(**TINY)
    y = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    args = (model, y, np.ones((1, 4), np.int32), (4, 4, 8, 8), (64, 64), 8, 10)
    linear = sample_latents(*args, seed=1)
    cosine = sample_latents(*args, seed=1, noise_schedule="squaredcos_cap_v2")
    # same noise, same model: only the schedule differs, and it changes every step's mean
    assert np.abs(cosine - linear).max() > 1e-2


def test_resume_continues_the_same_loss_curve(cached: dict[str, Path], tmp_path: Path) -> None:
    straight = _trainer(cached, tmp_path / "a", ckpt_every=2).fit(6).losses

    first = _trainer(cached, tmp_path / "b", ckpt_every=2, keep_last=2)
    first.fit(4)
    # the killed job had logged a step past its last checkpoint
    with (tmp_path / "b" / "loss.csv").open("a") as handle:
        handle.write("5,123.0,0.1,0\n")
    second = _trainer(cached, tmp_path / "b", init_seed=99, ckpt_every=2, keep_last=2)
    second.fit(6)
    assert second.resumed_from is not None and second.resumed_from.name == "step_000004"
    resumed = [r["loss"] for r in read_loss_csv(tmp_path / "b" / "loss.csv")]
    np.testing.assert_allclose(resumed, straight, rtol=1e-5, atol=1e-6)
    assert [d.name for d in checkpoint_dirs(tmp_path / "b")] == ["step_000004", "step_000006"]


def test_corrupt_latest_checkpoint_falls_back_to_previous(cached: dict[str, Path],
                                                          tmp_path: Path) -> None:
    _trainer(cached, tmp_path, ckpt_every=2).fit(4)
    latest = checkpoint_dirs(tmp_path)[-1] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # a half-written file
    resumed = _trainer(cached, tmp_path, ckpt_every=2)
    with pytest.warns(UserWarning, match="step_000004 is corrupt, falling back"):
        resumed.fit(5)
    assert resumed.resumed_from.name == "step_000002"
    assert [int(r["step"]) for r in read_loss_csv(tmp_path / "loss.csv")] == [1, 2, 3, 4, 5]


def test_mask_generator_hook_and_callbacks(cached: dict[str, Path], tmp_path: Path) -> None:
    seen = []

    def first_frame_is_condition(x):
        seen.append(tuple(x.shape))
        mask = np.ones((x.shape[0], x.shape[2]), bool)
        mask[:, 0] = False
        return mask

    class Count(Callback):
        def __init__(self) -> None:
            self.steps, self.checkpoints, self.ended = [], [], False

        def on_step_end(self, trainer, record) -> None:
            self.steps.append(record.step)

        def on_checkpoint(self, trainer, step, folder) -> None:
            self.checkpoints.append(step)

        def on_train_end(self, trainer) -> None:
            self.ended = True

    count, history = Count(), LossHistory()
    trainer = _trainer(cached, tmp_path, ckpt_every=2, mask_generator=first_frame_is_condition,
                       callbacks=[count, history], num_workers=2)
    trainer.fit(3)
    assert seen == [(2, 4, 4, 8, 8)] * 3
    assert count.steps == [1, 2, 3] and count.checkpoints == [2, 3] and count.ended
    assert len(history.records) == 3 and all(r.data_seconds >= 0 for r in history.records)
    with pytest.raises(FileExistsError, match="resume=True"):
        _trainer(cached, tmp_path).fit(4, resume=False)


def test_unsupported_settings_are_refused() -> None:
    model = STDiT2(**TINY)
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainStep(model, IDDPM(), mode="eager")
    with pytest.raises(ValueError, match="not supported on CPU"):
        TrainStep(model, IDDPM(), dtype="bf16")


def test_mask_generator_object_is_reseeded_per_step(cached: dict[str, Path],
                                                    tmp_path: Path) -> None:
    generator = MaskGenerator({"random": 1.0}, seed=0)
    trainer = _trainer(cached, tmp_path, mask_generator=generator)
    x = np.zeros((3, 4, 6, 2, 2), np.float32)
    first = trainer._frame_mask(x, step=5)
    assert first.shape == (3, 6) and first.dtype == bool
    trainer._frame_mask(x, step=6)
    np.testing.assert_array_equal(trainer._frame_mask(x, step=5), first)


# ---------------------------------------------------------------- data parallel under msrun


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cached latents / captions shaped for the tiny preset (16 x 8 x 8 latents, 16 x 64
    caption features) for four clips."""
    preset = get_preset("tiny")
    root = tmp_path_factory.mktemp("tiny_cache")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        for sub in ("lat", "txt"):
            (root / sub / "v").mkdir(parents=True, exist_ok=True)
        mean = rng.standard_normal((4, preset.num_frames, 8, 8)).astype(np.float32)
        np.savez(root / "lat" / "v" / f"{i}.npz", latent_mean=mean,
                 latent_std=np.full_like(mean, 0.1), fps=np.float32(8),
                 ori_size=np.array(preset.image_size))
        np.savez(root / "txt" / "v" / f"{i}.npz",
                 y=rng.standard_normal((preset.model_max_length,
                                        preset.model["caption_channels"])).astype(np.float32),
                 mask=(np.arange(preset.model_max_length) < 6).astype(np.int32))
        rows.append((f"v/{i}.mp4", f"clip {i}"))
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    return {"csv": root / "train.csv", "lat": root / "lat", "txt": root / "txt"}


def _train_args(caches: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["-m", "opensora.train", "--csv", str(caches["csv"]), "--latent-folder",
            str(caches["lat"]), "--text-folder", str(caches["txt"]), "--output-dir", str(out),
            "--steps", "2", "--batch-size", "4", "--mode", "pynative", "--ckpt-every", "2",
            *extra]


@pytest.mark.slow
def test_two_workers_train_the_tiny_preset_like_one_process(tiny_caches: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Global batch 4: one process, then 2 msrun workers with 2 samples each (plain and with
    the sharded optimizer) end with the same weights, EMA, optimizer state and losses."""

    alone = tmp_path / "alone"
    subprocess.run([sys.executable, *_train_args(tiny_caches, alone)], check=True,
                   capture_output=True, timeout=600)
    reference = {name: read_state_dict(alone / "checkpoints" / "step_000002" / name)
                 for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}
    losses = [row["loss"] for row in read_loss_csv(alone / "loss.csv")]
    assert len(losses) == 2
    for variant, extra in (("dp", ()), ("dp_zero", ("--optimizer-parallel",))):
        out = tmp_path / variant
        launch(_train_args(tiny_caches, out, *extra), workers=2, timeout=600,
               log_dir=tmp_path / f"logs_{variant}", emit=lambda line: None)
        for name, expected in reference.items():
            got = read_state_dict(out / "checkpoints" / "step_000002" / name)
            assert set(got) == set(expected), (variant, name)
            for key, value in expected.items():  # all-reduce order: rounding of the largest
                assert_f32_close(got[key].reshape(value.shape), value, 1024,
                                 err_msg=f"{variant} {name} {key}")
        np.testing.assert_allclose([r["loss"] for r in read_loss_csv(out / "loss.csv")],
                                   losses, rtol=1e-4)
        with (out / "step_times.csv").open() as handle:
            table = list(csv.reader(handle))
        assert table[0] == ["step", "rank_0", "rank_1"] and len(table) == 3


def test_stills_and_clips_train_together_in_graph_mode(cached: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """Open-Sora 1.1 joint image / video training: one-frame rows fill the image cell, clips
    the video cell; the compiled step (with frame masks on) takes both shapes."""
    rng = np.random.default_rng(1)
    (tmp_path / "lat" / "img").mkdir(parents=True)
    (tmp_path / "txt" / "img").mkdir(parents=True)
    rows = []
    for i in range(4):
        np.savez(tmp_path / "lat" / "img" / f"{i}.npz",
                 latent_mean=rng.standard_normal((4, 1, 8, 8)).astype(np.float32),
                 latent_std=np.full((4, 1, 8, 8), 0.01, np.float32), fps=np.float32(120),
                 ori_size=np.array([64, 64]))
        np.savez(tmp_path / "txt" / "img" / f"{i}.npz",
                 y=rng.standard_normal((4, 8)).astype(np.float32),
                 mask=np.array([1, 1, 0, 0], np.int32))
        rows.append((f"img/{i}.png", f"still {i}"))
    for folder in ("lat", "txt"):
        (tmp_path / folder / "v").symlink_to(cached[folder] / "v")
    with cached["csv"].open() as handle:
        rows += [(r["video"], r["caption"]) for r in csv.DictReader(handle)][:8]
    joint = tmp_path / "joint.csv"
    with joint.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    data = VideoCaptionDataset(joint, bucket_config={"64": {4: (1.0, 4), 1: (1.0, 4)}},
                               latent_folder=tmp_path / "lat", text_folder=tmp_path / "txt",
                               latent_scaling_factor=1.0)
    shapes = []

    class Shapes(Callback):
        def on_step_end(self, trainer, record) -> None:
            shapes.append(trainer.dataset.plan(record.step - 1, 1)[0].bucket[1])

    seed_everything(0)
    step = TrainStep(STDiT2(**TINY), IDDPM(), lr=1e-3, ema_decay=0.9, mode="graph")
    trainer = Trainer(step, data, tmp_path / "run", seed=3, ckpt_every=100, num_workers=1,
                      mask_generator=MaskGenerator(DEFAULT_MASK_RATIOS, seed=0),
                      callbacks=[Shapes()])
    history = trainer.fit(6)
    assert sorted(set(shapes)) == [1, 4] and len(history.records) == 6
    assert all(np.isfinite(history.losses))


def test_given_cache_folders_are_checked_against_the_models(tiny_caches: dict[str, Path],
                                                            tmp_path: Path) -> None:
    preset = get_preset("tiny")
    vae = VideoAutoencoderKL.from_pretrained(preset.vae_path)
    t5 = T5Encoder(preset.t5_path, preset.tokenizer_path,
                   model_max_length=preset.model_max_length)
    lat = shutil.copytree(tiny_caches["lat"], tmp_path / "lat")
    txt = shutil.copytree(tiny_caches["txt"], tmp_path / "txt")
    args = (tiny_caches["csv"], tmp_path / "unused", vae, t5, lat, txt)

    with pytest.warns(UserWarning) as caught:  # no records: usable, but unchecked
        assert prepare_caches(*args) == (lat, txt)
    assert sorted(str(w.message).split(" has no ")[1].split(":")[0] for w in caught) == [
        "t5.json", "vae.json"]

    latent_cache.claim_folder(lat, vae, overwrite=False)
    text_cache.claim_folder(txt, t5, overwrite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_caches(*args) == (lat, txt)

    (txt / text_cache.FINGERPRINT_FILE).write_text(json.dumps({"t5_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="caption embeddings of another T5"):
        prepare_caches(*args)
    (lat / latent_cache.FINGERPRINT_FILE).write_text(json.dumps({"vae_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="latents of another VAE .*pass the folder this VAE"):
        prepare_caches(*args)
    assert not (tmp_path / "unused").exists(), "nothing is built when folders are given"
