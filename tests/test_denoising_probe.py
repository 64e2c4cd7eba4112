"""The clean-latent probe: exact answers for an oracle and a do-nothing model, its checks, and
what it reads off the committed tiny STDiT2."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from opensora.denoising_probe import (
    ESTIMATES,
    DenoisingErrors,
    MotionShifts,
    motion_by_timestep,
    x0_error_by_timestep,
)
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import build_model, get_preset
from opensora.schedulers.iddpm import IDDPM

TIMESTEPS = (50, 400, 900)


class OracleEps(nn.Cell):
    """Knows the clean latents, so returns the exact noise (and a zero variance channel half)."""

    def __init__(self, x0: np.ndarray, diffusion: IDDPM) -> None:
        super().__init__()
        self.x0 = ms.Tensor(x0)
        self.alphas_cumprod = diffusion.schedule.alphas_cumprod

    def construct(self, x, timestep, y=None, mask=None):
        ab = float(self.alphas_cumprod[int(timestep.asnumpy()[0])])
        eps = (x - float(np.sqrt(ab)) * self.x0) / float(np.sqrt(1.0 - ab))
        return ops.concat([eps, ops.zeros_like(eps)], axis=1)


class ZeroEps(nn.Cell):
    def construct(self, x, timestep, y=None, mask=None):
        return ops.zeros((x.shape[0], 2 * x.shape[1], *x.shape[2:]), ms.float32)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 4, 2, 4, 4)) * 0.7 + rng.standard_normal((1, 4, 1, 1, 1)))
    return {"x": x.astype(np.float32), "y": np.zeros((3, 5, 8), np.float32),
            "mask": np.ones((3, 5), np.int32)}


def test_oracle_is_exact_and_do_nothing_equals_identity() -> None:
    diffusion, batch = IDDPM(), _batch()
    oracle = x0_error_by_timestep(OracleEps(batch["x"], diffusion), diffusion, [batch],
                                  TIMESTEPS, seed=1)
    np.testing.assert_allclose(oracle.errors["model"], 0.0, atol=1e-6)
    zero = x0_error_by_timestep(ZeroEps(), diffusion, [batch], TIMESTEPS, seed=1)
    np.testing.assert_allclose(zero.errors["model"], zero.errors["identity"], rtol=1e-5)
    # identity error = (1 - alpha_bar) / alpha_bar times the mean squared noise
    ab = diffusion.schedule.alphas_cumprod[list(TIMESTEPS)]
    np.testing.assert_allclose(zero.errors["identity"], (1 - ab) / ab, rtol=0.25)
    x = batch["x"]
    spread = ((x - x.mean(axis=(0, 2, 3, 4), keepdims=True)) ** 2).mean()
    np.testing.assert_allclose(zero.errors["mean"], spread, rtol=1e-5)
    assert zero.clips == 3 and zero.worse_than_mean() == (400, 900)
    assert oracle.worse_than_mean() == ()


def test_same_seed_same_errors_and_bad_input() -> None:
    diffusion, batch = IDDPM(), _batch()
    first = x0_error_by_timestep(ZeroEps(), diffusion, [batch], TIMESTEPS, seed=3)
    again = x0_error_by_timestep(ZeroEps(), diffusion, [batch], TIMESTEPS, seed=3)
    for name in ESTIMATES:
        np.testing.assert_array_equal(first.errors[name], again.errors[name])
    with pytest.raises(ValueError, match="outside"):
        x0_error_by_timestep(ZeroEps(), diffusion, [batch], (1000,))
    with pytest.raises(ValueError, match="no batches"):
        x0_error_by_timestep(ZeroEps(), diffusion, [], (100,))


def test_table_and_worse_than_mean() -> None:
    result = DenoisingErrors((100, 900), {"model": np.array([0.01, 2.0]),
                                          "identity": np.array([0.12, 3700.0]),
                                          "mean": np.array([0.9, 0.9])}, clips=8)
    assert result.worse_than_mean() == (900,)
    assert "8 clips" in result.table() and "2.0000" in result.table()


def test_committed_tiny_model_denoises_where_noise_is_light(real_batch) -> None:
    """At light noise the trained model is far better than both model-free estimates."""
    model = build_model(get_preset("tiny"))
    result = x0_error_by_timestep(model, IDDPM(), [real_batch], (100, 900), seed=0)
    print(result.table())
    assert np.all(np.isfinite(result.errors["model"]))
    assert result.errors["model"][0] < 0.5 * result.errors["identity"][0], result.table()
    assert result.errors["model"][0] < 0.1 * result.errors["mean"][0], result.table()


@pytest.fixture(scope="module")
def vae() -> VideoAutoencoderKL:
    return VideoAutoencoderKL.from_pretrained(get_preset("tiny").vae_path)


def test_motion_of_an_exact_and_of_a_frozen_estimate(real_batch, vae) -> None:
    """An estimate equal to the clip moves exactly as far as the clip; the clip's first frame
    repeated does not move at all, at any noise level."""
    diffusion, x = IDDPM(), real_batch["x"]
    captions = list(real_batch["caption"])
    exact = motion_by_timestep(OracleEps(x, diffusion), diffusion, vae, [real_batch], captions,
                               (200, 800))
    assert exact.clips == 4 and exact.data_shift > 10.0, exact.table()  # clips move ~17 px
    np.testing.assert_allclose(exact.model_shift, exact.data_shift, atol=0.5)
    frozen_clip = np.repeat(x[:, :, :1], x.shape[2], axis=2)
    frozen = motion_by_timestep(OracleEps(frozen_clip, diffusion), diffusion, vae, [real_batch],
                                captions, (200, 800))
    np.testing.assert_allclose(frozen.model_shift, 0.0, atol=1e-6)
    assert frozen.data_shift == exact.data_shift
    assert exact.moving_up_to() == 800 and frozen.moving_up_to() is None


def test_motion_probe_refuses_captions_that_do_not_fit(real_batch, vae) -> None:
    diffusion, x = IDDPM(), real_batch["x"]
    captions = list(real_batch["caption"])
    with pytest.raises(ValueError, match="5 captions for 4 clips"):
        motion_by_timestep(ZeroEps(), diffusion, vae, [real_batch], captions + captions[:1],
                           (200,))
    with pytest.raises(ValueError, match="3 captions, but the batches hold more clips"):
        motion_by_timestep(ZeroEps(), diffusion, vae, [real_batch], captions[:3], (200,))
    with pytest.raises(ValueError, match="batches hold more clips"):
        motion_by_timestep(ZeroEps(), diffusion, vae, [real_batch, real_batch], captions, (200,))
    with pytest.raises(ValueError, match="names no direction"):
        motion_by_timestep(ZeroEps(), diffusion, vae, [real_batch],
                           ["a red square on a black background"] * len(x), (200,))
    shifts = MotionShifts((200, 800), np.array([15.0, 2.0]), 16.0, clips=8)
    assert shifts.moving_up_to() == 200 and shifts.moving_up_to(0.1) == 800
    assert "16.0 px" in shifts.table() and "94%" in shifts.table()


def test_committed_tiny_model_moves_its_estimate_where_noise_is_light(real_batch, vae) -> None:
    """Given a noised moving clip, the trained model's clean estimate keeps the motion."""
    result = motion_by_timestep(build_model(get_preset("tiny")), IDDPM(), vae, [real_batch],
                                list(real_batch["caption"]), (200, 800))
    print(result.table())
    assert result.model_shift[0] > 0.6 * result.data_shift, result.table()


@pytest.mark.notebook
def test_training_chapter_probes_its_clean_latent_estimates(executed_book) -> None:
    result = executed_book.result("06_training")
    probe = json.loads((result.output_dir / "denoising_probe.json").read_text())
    assert probe["timesteps"] == [100, 300, 500, 700, 900] and probe["clips"] > 0
    assert set(probe["errors"]) == set(ESTIMATES)
    assert all(len(v) == 5 and all(np.isfinite(v)) for v in probe["errors"].values())


@pytest.mark.notebook
def test_training_chapter_probes_the_motion_of_its_estimates(executed_book) -> None:
    result = executed_book.result("06_training")
    probe = json.loads((result.output_dir / "motion_probe.json").read_text())
    assert probe["timesteps"] == [200, 400, 600, 800] and probe["clips"] > 0
    assert len(probe["model_shift"]) == 4 and all(np.isfinite(probe["model_shift"]))
    assert probe["data_shift"] > 10.0  # the training clips move ~17 px
