"""AutoencoderKL / VideoAutoencoderKL against diffusers' outputs (no torch needed here).

Two cases: the shared reference (4 levels, new attention key names, B=2 x T=3 at 64x64) and
tests/fixtures/data/vae_two_level (2 levels, old attention key names, no post_quant_conv, a
non-square 32x48 clip), made by tests/fixtures/make_vae_fixtures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from numerics import EPS32, assert_f32_close

from opensora.checkpoint import CheckpointError, read_state_dict
from opensora.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussianDistribution,
    VideoAutoencoderKL,
    normalize_vae_state_dict,
    psnr,
)

REFERENCE = Path("/work/shared/reference")
if not REFERENCE.is_dir():
    REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURES = Path(__file__).parent / "fixtures" / "data"
# Parity with diffusers: a 2-4 level VAE (3x3 convolutions of 16-64 channels, group norms, SiLU,
# mid-block attention) differs by ~1e3 float32 roundings of the compared tensor's magnitude
PARITY_STEPS = 1024

needs_reference = pytest.mark.skipif(not (REFERENCE / "vae_case.npz").is_file(),
                                     reason="shared reference cases not available")


def frames_to_video(frames: np.ndarray, batch: int) -> np.ndarray:
    n, c, h, w = frames.shape
    return frames.reshape(batch, n // batch, c, h, w).transpose(0, 2, 1, 3, 4)


def video_to_frames(video: np.ndarray) -> np.ndarray:
    b, c, t, h, w = video.shape
    return np.ascontiguousarray(video.transpose(0, 2, 1, 3, 4).reshape(b * t, c, h, w))


def max_err(a, b) -> float:
    a = a.asnumpy() if isinstance(a, ms.Tensor) else a
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def assert_close(actual, expected, rounding_steps: float = PARITY_STEPS) -> None:
    actual = actual.asnumpy() if isinstance(actual, ms.Tensor) else actual
    assert_f32_close(actual, expected, rounding_steps)


@pytest.fixture(scope="module")
def ref_case():
    with np.load(REFERENCE / "vae_case.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def ref_vae():
    # 4 frames per micro-batch over B*T = 6 frames: exercises the uneven last chunk
    return VideoAutoencoderKL.from_pretrained(REFERENCE / "vae_tiny", micro_batch_size=4)


@pytest.fixture(scope="module")
def two_level_case():
    with np.load(FIXTURES / "vae_two_level_case.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def two_level_vae():
    return VideoAutoencoderKL.from_pretrained(FIXTURES / "vae_two_level")


# ---- parity with diffusers


@needs_reference
def test_reference_encode_pynative(ref_vae, ref_case):
    x = ms.Tensor(ref_case["x"])
    mean, std = ref_vae.encode_moments(x)
    batch = x.shape[0]
    assert_close(mean, frames_to_video(ref_case["moments.mean"], batch))
    expected_std = np.exp(0.5 * np.clip(ref_case["moments.logvar"], -30, 20))
    assert_close(std, frames_to_video(expected_std, batch))
    assert_close(ref_vae.encode(x, sample_posterior=False), ref_case["encode_mean"])
    eps = frames_to_video(ref_case["encode_sample_eps"], batch)
    sample = ref_vae.encode(x, noise=ms.Tensor(np.ascontiguousarray(eps)))
    assert sample.shape == (2, 4, 3, 8, 8)
    assert_close(sample, ref_case["encode_sample"])


@needs_reference
def test_reference_decode_pynative(ref_vae, ref_case):
    out = ref_vae.decode(ms.Tensor(ref_case["latent_in"]))
    assert out.shape == ref_case["decode_of_latent_in"].shape
    assert_close(out, ref_case["decode_of_latent_in"])
    out = ref_vae.decode(ms.Tensor(ref_case["encode_mean"]))
    assert_close(out, ref_case["decode_of_encode_mean"])


@needs_reference
def test_reference_graph_mode(ref_vae, ref_case):
    """The image VAE compiled with mindspore.jit gives diffusers' numbers too."""
    vae = ref_vae.module
    frames = ms.Tensor(video_to_frames(ref_case["x"]))
    moments = ms.jit(vae.encode_moments)(frames).asnumpy()
    assert_close(moments[:, :4], ref_case["moments.mean"])
    latents = video_to_frames(ref_case["latent_in"]) / ref_vae.scaling_factor
    decoded = ms.jit(vae.decode)(ms.Tensor(latents)).asnumpy()
    assert_close(frames_to_video(decoded, 2), ref_case["decode_of_latent_in"])


def test_two_level_old_key_names(two_level_vae, two_level_case):
    config = two_level_vae.module.config
    assert config.block_out_channels == (16, 24) and not config.use_post_quant_conv
    assert two_level_vae.patch_size == (1, 2, 2)
    x = ms.Tensor(two_level_case["x"])
    assert_close(two_level_vae.encode(x, sample_posterior=False), two_level_case["encode_mean"])
    sample = two_level_vae.encode(x, noise=ms.Tensor(two_level_case["encode_sample_eps"]))
    assert_close(sample, two_level_case["encode_sample"])
    decoded = two_level_vae.decode(ms.Tensor(two_level_case["encode_mean"]))
    assert decoded.shape == (1, 3, 2, 32, 48)
    assert_close(decoded, two_level_case["decode_of_encode_mean"])


def test_two_level_whole_model_graph_mode(two_level_case):
    """construct() (encode the mean, decode) as one compiled graph."""
    vae = AutoencoderKL.from_pretrained(FIXTURES / "vae_two_level")
    frames = ms.Tensor(video_to_frames(two_level_case["x"]))
    out = ms.jit(vae.construct)(frames).asnumpy()
    assert_close(frames_to_video(out, 1), two_level_case["decode_of_encode_mean"])


# ---- the video wrapper


def test_micro_batch_size_does_not_change_results(two_level_vae, two_level_case):
    x = ms.Tensor(two_level_case["x"])
    whole = two_level_vae.encode(x, sample_posterior=False).asnumpy()
    one_by_one = VideoAutoencoderKL(two_level_vae.module, micro_batch_size=1)
    # the same convolutions on batches of 1 and of 2 frames: only the kernels' blocking differs
    assert_close(one_by_one.encode(x, sample_posterior=False), whole, 64)
    z = ms.Tensor(whole)
    assert_close(one_by_one.decode(z), two_level_vae.decode(z).asnumpy(), 64)


def test_seeded_sampling_is_reproducible(two_level_vae, two_level_case):
    x = ms.Tensor(two_level_case["x"])
    first = two_level_vae.encode(x, noise=7).asnumpy()
    again = two_level_vae.encode(x, noise=np.random.default_rng(7)).asnumpy()
    other = two_level_vae.encode(x, noise=8).asnumpy()
    mean = two_level_vae.encode(x, sample_posterior=False).asnumpy()
    np.testing.assert_array_equal(first, again)
    assert max_err(first, other) > 1e-3
    assert max_err(first, mean) > 1e-3


def test_wrapper_rejects_bad_shapes_and_settings(two_level_vae):
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        two_level_vae.encode(ms.Tensor(np.zeros((1, 3, 32, 32), np.float32)))
    with pytest.raises(ValueError, match="micro_batch_size"):
        VideoAutoencoderKL(two_level_vae.module, micro_batch_size=0)
    assert two_level_vae.get_latent_size([4, 32, 48]) == [4, 16, 24]


# ---- loading, saving, configs


def test_old_and_new_key_names_load_identically():
    old = read_state_dict(FIXTURES / "vae_two_level")
    new = normalize_vae_state_dict(old)
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in new
    assert not any(".query." in k for k in new)
    config = AutoencoderKLConfig.from_json(FIXTURES / "vae_two_level" / "config.json")
    a, b = AutoencoderKL(config), AutoencoderKL(config)
    a.load_weights(old)
    b.load_weights(new)
    for (name, pa), (_, pb) in zip(a.parameters_and_names(), b.parameters_and_names()):
        np.testing.assert_array_equal(pa.asnumpy(), pb.asnumpy(), err_msg=name)
    both = dict(old, **{"encoder.mid_block.attentions.0.to_q.weight": new[
        "encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(CheckpointError, match="attention naming"):
        normalize_vae_state_dict(both)


def test_ldm_style_conv_attention_weights_are_squeezed():
    state = {"encoder.mid_block.attentions.0.query.weight": np.ones((8, 8, 1, 1), np.float32)}
    out = normalize_vae_state_dict(state)
    assert out["encoder.mid_block.attentions.0.to_q.weight"].shape == (8, 8)


def test_strict_loading_names_the_problem():
    state = read_state_dict(FIXTURES / "vae_two_level")
    config = AutoencoderKLConfig.from_json(FIXTURES / "vae_two_level" / "config.json")
    vae = AutoencoderKL(config)
    broken = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        vae.load_weights(broken)
    wider = AutoencoderKL(config.to_diffusers_dict() | {"block_out_channels": [16, 32]})
    with pytest.raises(CheckpointError, match="wrong shape"):
        wider.load_weights(state)


def test_from_pretrained_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers AutoencoderKL folder"):
        AutoencoderKL.from_pretrained(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path / "empty")


def test_save_pretrained_round_trip(tmp_path, two_level_vae, two_level_case):
    folder = two_level_vae.module.save_pretrained(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["block_out_channels"] == [16, 24] and config["use_post_quant_conv"] is False
    saved = read_state_dict(folder)
    assert "encoder.mid_block.attentions.0.to_q.weight" in saved
    reloaded = VideoAutoencoderKL.from_pretrained(folder)
    x = ms.Tensor(two_level_case["x"])
    assert_close(reloaded.encode(x, sample_posterior=False), two_level_case["encode_mean"])


def test_config_validation():
    with pytest.raises(ValueError, match="one entry per resolution level"):
        AutoencoderKLConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",) * 2)
    with pytest.raises(ValueError, match="unsupported VAE block types"):
        AutoencoderKLConfig(down_block_types=("CrossAttnDownBlock2D",))
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKLConfig(block_out_channels=(24,), norm_num_groups=32)
    config = AutoencoderKLConfig.from_dict({"block_out_channels": [64], "force_upcast": True,
                                            "latents_mean": None})
    assert config.extra == {"force_upcast": True, "latents_mean": None}


# ---- posterior and metric


def test_posterior_kl_and_clamp():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    logvar = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    logvar[0, 0, 0, 0] = 50.0  # clamped to 20
    posterior = DiagonalGaussianDistribution(ms.Tensor(np.concatenate([mean, logvar], 1)))
    clamped = np.clip(logvar, -30, 20)
    expected = 0.5 * (mean**2 + np.exp(clamped) - 1 - clamped).sum(axis=(1, 2, 3))
    # MindSpore's CPU exp is not correctly rounded: up to ~1e2 eps relative (exp(20) is 43 eps
    # off on one CPU), so allow 256 eps; the KL's terms are >= 0, so relative per image
    np.testing.assert_allclose(posterior.kl().asnumpy(), expected, rtol=256 * EPS32)
    eps = rng.standard_normal(mean.shape).astype(np.float32)
    noise = np.exp(0.5 * clamped) * eps
    # each term within its own 256 eps (the exp); their sum may cancel, so bound by both terms
    error = np.abs(posterior.sample(ms.Tensor(eps)).asnumpy() - (mean + noise))
    np.testing.assert_array_less(error, 256 * EPS32 * (np.abs(mean) + np.abs(noise)))


def test_psnr():
    a = np.zeros((3, 4, 4), np.float32)
    b = a + 0.02
    assert psnr(a, b) == pytest.approx(10 * np.log10(4 / 0.0004))
    assert psnr(a, a) > 150
