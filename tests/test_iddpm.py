"""IDDPM: schedules and q_sample against Open-Sora's own arrays, training loss and one sampling
step against its torch computation (tests/fixtures/make_iddpm_fixtures.py), closed-form facts,
and the sampler's contracts (seeds, guidance channels, conditioned frames)."""

from __future__ import annotations

import math
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops
from numerics import EPS32, assert_f32_close

from opensora.schedulers.iddpm import (
    IDDPM,
    DiffusionSchedule,
    forward_with_cfg,
    get_named_beta_schedule,
    normal_kl,
    space_timesteps,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURE = Path(__file__).parent / "fixtures" / "data" / "iddpm_losses.npz"
SCHEDULE_NAMES = [n for n in DiffusionSchedule.__dataclass_fields__ if n != "timestep_map"]
CASES = [("train1000", None), ("respaced10", 10)]


@pytest.fixture(scope="module")
def schedules_ref() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE / "iddpm_schedules.npz"))


@pytest.fixture(scope="module")
def losses_ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE))


def constant_model(output: np.ndarray):
    """A 'model' whose prediction is a fixed tensor, to test the loss math alone."""
    out = Tensor(output)
    return lambda x, timestep, **kwargs: out


# --- schedules --------------------------------------------------------------------------------


def test_linear_betas_are_open_soras(schedules_ref):
    np.testing.assert_allclose(get_named_beta_schedule("linear", 1000),
                               schedules_ref["base_linear_betas_float64"], rtol=1e-14, atol=0)


def test_space_timesteps():
    ten = sorted(space_timesteps(1000, "10"))
    assert ten == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    # two sections of 5: 2 steps from the first, 3 from the second
    assert sorted(space_timesteps(10, "2,3")) == [0, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="cannot take 11 steps"):
        space_timesteps(10, "11")


@pytest.mark.parametrize("tag,steps", CASES)
def test_schedules_match_open_sora(schedules_ref, tag, steps):
    diffusion = IDDPM(num_sampling_steps=steps)
    for name in SCHEDULE_NAMES:
        np.testing.assert_allclose(getattr(diffusion, name).astype(np.float32),
                                   schedules_ref[f"{tag}.{name}"], rtol=1e-6, atol=1e-9,
                                   err_msg=name)
    np.testing.assert_array_equal(diffusion.timestep_map, schedules_ref[f"{tag}.timestep_map"])


def test_schedule_closed_forms():
    betas = get_named_beta_schedule("linear", 1000)
    s = DiffusionSchedule.from_betas(betas)
    np.testing.assert_allclose(s.alphas_cumprod, np.exp(np.cumsum(np.log1p(-betas))), rtol=1e-10)
    alphas = 1.0 - betas
    # q(x_{t-1} | x_t, x_0) is a product of two Gaussians: its precision is the sum of theirs
    precision = 1.0 / (1.0 - s.alphas_cumprod_prev[1:]) + alphas[1:] / betas[1:]
    np.testing.assert_allclose(s.posterior_variance[1:], 1.0 / precision, rtol=1e-9)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    # its mean coefficients reproduce x_0 when x_t is exactly the noiseless forward mean
    noiseless = s.posterior_mean_coef1 + s.posterior_mean_coef2 * np.sqrt(s.alphas_cumprod)
    np.testing.assert_allclose(noiseless, np.sqrt(s.alphas_cumprod_prev), rtol=1e-9)
    # respacing keeps alpha_bar at the kept steps
    respaced = IDDPM(num_sampling_steps=10)
    np.testing.assert_allclose(respaced.alphas_cumprod,
                               s.alphas_cumprod[respaced.timestep_map], rtol=1e-6)


@pytest.mark.parametrize("tag,steps", CASES)
def test_q_sample_matches_open_sora(tag, steps):
    ref = np.load(REFERENCE / "iddpm_q_sample.npz")
    out = IDDPM(num_sampling_steps=steps).q_sample(
        Tensor(ref["x_start"]), Tensor(ref[f"t_{tag}"].astype(np.int32)), Tensor(ref["noise"]))
    assert_f32_close(out.asnumpy(), ref[f"q_sample_{tag}"], 8)  # two products and a sum


def test_q_sample_statistics():
    diffusion = IDDPM()
    t = np.array([10, 300, 900], dtype=np.int32)
    x0 = np.full((3, 20000), 0.7, dtype=np.float32)
    noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    xt = diffusion.q_sample(Tensor(x0), Tensor(t), Tensor(noise)).asnumpy()
    ac = diffusion.alphas_cumprod[t]
    np.testing.assert_allclose(xt.mean(axis=1), np.sqrt(ac) * 0.7, atol=0.02)
    np.testing.assert_allclose(xt.std(axis=1), np.sqrt(1.0 - ac), rtol=0.02)
    mean, var, log_var = diffusion.q_mean_variance(Tensor(x0[:, :4]), Tensor(t))
    np.testing.assert_allclose(mean.asnumpy()[:, 0], np.sqrt(ac) * 0.7, rtol=1e-6)
    np.testing.assert_allclose(var.asnumpy()[:, 0], 1.0 - ac, rtol=1e-5)
    np.testing.assert_allclose(log_var.asnumpy()[:, 0], np.log(1.0 - ac), rtol=1e-5)


# --- training loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("tag,steps", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_training_losses_match_open_sora(losses_ref, tag, steps, masked):
    ref = losses_ref
    mask = Tensor(ref["mask"]) if masked else None
    out = IDDPM(num_sampling_steps=steps).training_losses(
        constant_model(ref["model_output"]), Tensor(ref["x_start"]),
        Tensor(ref[f"{tag}.t"].astype(np.int32)), noise=Tensor(ref["noise"]), mask=mask)
    prefix = f"{tag}.masked" if masked else tag
    # the VLB's KL cancels log variances (up to ~10 in size) before its means over the elements
    log_variance = float(np.abs(ref[f"{tag}.p_log_variance"]).max())
    for key in ("loss", "mse", "vb"):
        assert_f32_close(out[key].asnumpy(), ref[f"{prefix}.{key}"], 64, scale=log_variance,
                         err_msg=key)


@pytest.mark.parametrize("tag,steps", CASES)
def test_reverse_step_matches_open_sora(losses_ref, tag, steps):
    ref = losses_ref
    diffusion = IDDPM(num_sampling_steps=steps)
    t = Tensor(ref[f"{tag}.t"].astype(np.int32))
    x_t = diffusion.q_sample(Tensor(ref["x_start"]), t, Tensor(ref["noise"]))
    model = constant_model(ref["model_output"])
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=False)
    # pred_xstart divides by sqrt(alpha_bar) >= 0.0066: its rounding is that of its own (large)
    # magnitude, so every key compares at its magnitude
    for key, name in (("mean", "p_mean"), ("log_variance", "p_log_variance"),
                      ("pred_xstart", "pred_xstart")):
        assert_f32_close(out[key].asnumpy(), ref[f"{tag}.{name}"], 16, err_msg=key)
    step = diffusion.p_sample(model, x_t, t, Tensor(ref["step_noise"]), clip_denoised=False,
                              mask=Tensor(ref["mask"]))
    assert_f32_close(step["sample"].asnumpy(), ref[f"{tag}.p_sample_masked"], 16)


def perfect_output(diffusion: IDDPM, noise: np.ndarray, v: float) -> np.ndarray:
    return np.concatenate([noise, np.full_like(noise, v)], axis=1)


def test_vlb_of_a_perfect_model_is_zero():
    """Exact epsilon and v = -1 (posterior variance) make p(x_{t-1}|x_t) equal the posterior."""
    rng = np.random.default_rng(1)
    diffusion = IDDPM()
    x0 = rng.uniform(-0.9, 0.9, (4, 3, 2, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = Tensor(np.array([1, 20, 400, 999], dtype=np.int32))
    perfect = diffusion.training_losses(constant_model(perfect_output(diffusion, noise, -1.0)),
                                        Tensor(x0), t, noise=Tensor(noise))
    np.testing.assert_allclose(perfect["mse"].asnumpy(), 0.0, atol=1e-12)
    # the KL of equal Gaussians: terms of the size of the log variances cancel to float32 rounding
    log_variance = float(np.abs(diffusion.posterior_log_variance_clipped[t.asnumpy()]).max())
    assert_f32_close(perfect["vb"].asnumpy(), 0.0, 16, scale=log_variance)
    # the widest variance (beta_t) costs a KL that shrinks as beta_t approaches the posterior
    # variance at large t
    wide = diffusion.training_losses(constant_model(perfect_output(diffusion, noise, 1.0)),
                                     Tensor(x0), t, noise=Tensor(noise))["vb"].asnumpy()
    assert wide[0] > wide[1] > wide[2] > 0 and 0 <= wide[3] < 1e-5
    # the KL itself is >= 0 and 0 only for equal Gaussians
    m1, m2 = Tensor(rng.standard_normal(50).astype(np.float32)), Tensor(np.zeros(50, np.float32))
    lv = Tensor(rng.standard_normal(50).astype(np.float32))
    assert (normal_kl(m1, lv, m2, lv * 0.5).asnumpy() >= 0).all()
    assert_f32_close(normal_kl(m1, lv, m1, lv).asnumpy(), 0.0, 8,
                     scale=1.0 + float(np.abs(lv.asnumpy()).max()))  # -1 + lv - lv + exp(0)


def test_decoder_nll_at_t0_is_the_mass_of_the_8bit_bin():
    """At t = 0 the VLB term is -log2 P(x_0's bin of width 2/255) under p(x_0 | x_1)."""
    diffusion = IDDPM()
    x0 = np.linspace(-0.9, 0.9, 2 * 3 * 2 * 4 * 4, dtype=np.float32).reshape(2, 3, 2, 4, 4)
    noise = np.random.default_rng(2).standard_normal(x0.shape).astype(np.float32)
    t = Tensor(np.zeros(2, dtype=np.int32))
    vb = diffusion.training_losses(constant_model(perfect_output(diffusion, noise, -1.0)),
                                   Tensor(x0), t, noise=Tensor(noise))["vb"].asnumpy()
    # exact epsilon: the mean is coef1 * x_0 (coef2 is 0 at t = 0), sigma the clipped posterior
    mean = diffusion.posterior_mean_coef1[0] * x0.astype(np.float64)
    sigma = np.exp(0.5 * diffusion.posterior_log_variance_clipped[0])
    cdf = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))
    mass = cdf((x0 - mean + 1 / 255) / sigma) - cdf((x0 - mean - 1 / 255) / sigma)
    expected = (-np.log2(mass)).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(vb, expected, rtol=2e-3)


def test_vb_gradient_reaches_only_the_variance():
    rng = np.random.default_rng(3)
    diffusion = IDDPM()
    x0 = Tensor(rng.uniform(-1, 1, (2, 2, 2, 2, 2)).astype(np.float32))
    noise_np = rng.standard_normal((2, 2, 2, 2, 2)).astype(np.float32)
    output_np = rng.standard_normal((2, 4, 2, 2, 2)).astype(np.float32)
    t = Tensor(np.array([3, 600], dtype=np.int32))

    def total(output: Tensor) -> Tensor:
        model = lambda x, timestep: output  # noqa: E731
        return diffusion.training_losses(model, x0, t, noise=Tensor(noise_np))["loss"].sum()

    grad = ms.grad(total)(Tensor(output_np)).asnumpy()
    per_sample = noise_np[0].size
    assert_f32_close(grad[:, :2], 2.0 * (output_np[:, :2] - noise_np) / per_sample, 8)
    assert np.abs(grad[:, 2:]).max() > 0


class TinyEpsModel(nn.Cell):
    """A linear 'denoiser' with learned-sigma output, timestep and caption dependent."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        w = np.random.default_rng(4).standard_normal((2 * channels, channels)) * 0.3
        self.weight = ms.Parameter(Tensor(w.astype(np.float32)), name="weight")

    def construct(self, x: Tensor, timestep: Tensor, y: Tensor | None = None,
                  mask: Tensor | None = None) -> Tensor:
        b, c, f, h, w = x.shape
        flat = x.reshape(b, c, f * h * w)
        out = ops.matmul(self.weight, flat).reshape(b, 2 * c, f, h, w)
        scale = 1.0 + timestep.astype(ms.float32).reshape(b, 1, 1, 1, 1) / 1000.0
        out = out * scale
        if y is not None:
            out = out + y.mean(axis=(1, 2, 3)).reshape(b, 1, 1, 1, 1)
        return ops.tanh(out)


def test_training_losses_graph_mode_equals_pynative():
    rng = np.random.default_rng(5)
    diffusion = IDDPM()
    net = TinyEpsModel()
    x0 = Tensor(rng.uniform(-1, 1, (2, 3, 2, 4, 4)).astype(np.float32))
    noise = Tensor(rng.standard_normal((2, 3, 2, 4, 4)).astype(np.float32))
    y = Tensor(rng.standard_normal((2, 1, 5, 8)).astype(np.float32))
    t = Tensor(np.array([0, 700], dtype=np.int32))
    frames = Tensor(np.array([[True, True], [False, True]]))

    def loss_fn(x0: Tensor, t: Tensor, noise: Tensor, y: Tensor, frames: Tensor) -> Tensor:
        terms = diffusion.training_losses(net, x0, t, {"y": y}, noise, frames)
        return terms["loss"].mean()

    step = ms.value_and_grad(loss_fn, None, net.trainable_params())
    loss_py, grads_py = step(x0, t, noise, y, frames)
    loss_graph, grads_graph = ms.jit(step)(x0, t, noise, y, frames)
    np.testing.assert_allclose(loss_graph.asnumpy(), loss_py.asnumpy(), rtol=1e-5)
    # the weight's gradient sums over 2 x 32 positions: another order when compiled
    assert_f32_close(grads_graph[0].asnumpy(), grads_py[0].asnumpy(), 64)
    assert np.abs(grads_py[0].asnumpy()).max() > 0


# --- sampling ---------------------------------------------------------------------------------


def oracle_model(x0: np.ndarray):
    """Predicts the exact noise that turns x0 into x at the (original) timestep it is given.

    Only correct if the sampler hands the model original timesteps, not respaced indices.
    """
    full = IDDPM()
    sqrt_ac = full.sqrt_alphas_cumprod.astype(np.float32)
    sqrt_1m = full.sqrt_one_minus_alphas_cumprod.astype(np.float32)

    def model(x: Tensor, timestep: Tensor, **kwargs) -> Tensor:
        ts = timestep.asnumpy()
        shape = (-1,) + (1,) * (x.ndim - 1)
        eps = (x.asnumpy() - sqrt_ac[ts].reshape(shape) * x0) / sqrt_1m[ts].reshape(shape)
        var = -np.ones_like(eps)
        return Tensor(np.concatenate([eps, var], axis=1).astype(np.float32))

    return model


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_with_an_oracle_recovers_the_data(sampler):
    x0 = np.random.default_rng(6).uniform(-1, 1, (2, 3, 2, 4, 4)).astype(np.float32)
    diffusion = IDDPM(num_sampling_steps=10)
    out = diffusion.p_sample_loop(oracle_model(x0), x0.shape, clip_denoised=False, generator=0,
                                  sampler=sampler)
    # each step's x0 estimate divides float32 differences of terms of size |x_t| (< 5) by
    # sqrt(alpha_bar), down to sqrt(alpha_bar_999) = 0.0066: x0's rounding is amplified ~150x
    amplified = 5.0 / float(np.sqrt(diffusion.alphas_cumprod.min()))
    np.testing.assert_allclose(out.asnumpy(), x0, rtol=0, atol=16 * EPS32 * amplified)


def test_sampling_is_reproducible_from_a_seed():
    diffusion = IDDPM(num_sampling_steps=5)
    net = TinyEpsModel()
    shape = (2, 3, 2, 4, 4)
    first = diffusion.p_sample_loop(net, shape, generator=123).asnumpy()
    again = diffusion.p_sample_loop(net, shape, generator=np.random.default_rng(123)).asnumpy()
    other = diffusion.p_sample_loop(net, shape, generator=124).asnumpy()
    assert first.shape == shape
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    # DDIM with eta = 0 draws nothing after x_T: a given x_T fixes the result
    x_t = Tensor(np.random.default_rng(7).standard_normal(shape).astype(np.float32))
    a = diffusion.ddim_sample_loop(net, shape, noise=x_t, generator=1).asnumpy()
    b = diffusion.ddim_sample_loop(net, shape, noise=x_t, generator=2).asnumpy()
    np.testing.assert_array_equal(a, b)


def test_progressive_sampling_visits_every_respaced_step():
    diffusion = IDDPM(num_sampling_steps=4)
    seen = []

    def model(x: Tensor, timestep: Tensor, **kwargs) -> Tensor:
        seen.append(int(timestep.asnumpy()[0]))
        return ops.zeros((x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:]), ms.float32)

    steps = [out["t"] for out in diffusion.p_sample_loop_progressive(
        model, (1, 2, 1, 2, 2), generator=0, progress=True)]
    assert steps == [3, 2, 1, 0]
    assert seen == [999, 666, 333, 0]


class CaptionEchoModel:
    """Output = x-dependent part + a caption-dependent offset (variance channels clipped to the
    learned range); records what it was given."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, timestep, y, mask=None, x_mask=None):
        self.calls.append({"x": x.asnumpy(), "y": y.asnumpy(), "mask": mask, "x_mask": x_mask})
        offset = y.reshape(y.shape[0], -1)[:, 0].reshape(-1, 1, 1, 1, 1)
        return ops.concat([0.1 * x + offset, ops.clamp(0.5 * x + offset, -1.0, 1.0)], axis=1)


def test_forward_with_cfg_guides_only_the_first_channels():
    rng = np.random.default_rng(8)
    model = CaptionEchoModel()
    x = Tensor(rng.standard_normal((4, 4, 2, 2, 2)).astype(np.float32))
    y = Tensor(np.array([2.0, -1.0, 0.0, 0.0], np.float32).reshape(4, 1, 1, 1))
    x_mask = Tensor(np.array([[True, False], [True, True]]))
    out = forward_with_cfg(model, x, Tensor(np.zeros(4, np.int32)), y, cfg_scale=3.0,
                           cfg_channel=3, x_mask=x_mask).asnumpy()
    call = model.calls[-1]
    half = x.asnumpy()[:2]
    np.testing.assert_array_equal(call["x"], np.concatenate([half, half]))  # x's 2nd half unused
    assert call["x_mask"].shape == (4, 2)
    offset = y.asnumpy().reshape(4, 1, 1, 1, 1)
    both = np.concatenate([half, half])
    raw = np.concatenate([0.1 * both + offset, np.clip(0.5 * both + offset, -1, 1)], axis=1)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3])
    np.testing.assert_allclose(out[:2, :3], guided, rtol=1e-6)
    np.testing.assert_allclose(out[2:, :3], guided, rtol=1e-6)
    np.testing.assert_allclose(out[:, 3:], raw[:, 3:], rtol=1e-6)  # each branch its own
    default = forward_with_cfg(model, x, Tensor(np.zeros(4, np.int32)), y, cfg_scale=3.0)
    np.testing.assert_allclose(default.asnumpy()[:, :4], np.concatenate([
        uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])] * 2), rtol=1e-6)


def test_guided_sampling_doubles_the_batch_and_keeps_conditioned_frames():
    rng = np.random.default_rng(9)
    model = CaptionEchoModel()
    diffusion = IDDPM(num_sampling_steps=3, cfg_scale=5.0, cfg_channel=2)
    z = rng.standard_normal((2, 2, 3, 2, 2)).astype(np.float32)
    y = Tensor(rng.standard_normal((2, 1, 4, 6)).astype(np.float32))
    caption_mask = Tensor(np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.int32))
    y_null = Tensor(np.zeros((2, 1, 4, 6), np.float32))
    frames = np.array([[False, True, True], [True, False, True]])
    out = diffusion.sample_from_embeddings(
        model, Tensor(z), {"y": y, "mask": caption_mask}, y_null, mask=Tensor(frames),
        generator=0, progress=False).asnumpy()
    assert out.shape == z.shape and len(model.calls) == 3
    call = model.calls[0]
    np.testing.assert_array_equal(call["y"], np.concatenate([y.asnumpy(), y_null.asnumpy()]))
    np.testing.assert_array_equal(call["mask"].asnumpy(),
                                  np.concatenate([caption_mask.asnumpy()] * 2))
    kept = ~frames
    np.testing.assert_array_equal(out.transpose(0, 2, 1, 3, 4)[kept],
                                  z.transpose(0, 2, 1, 3, 4)[kept])
    assert np.abs(out.transpose(0, 2, 1, 3, 4)[frames] - z.transpose(0, 2, 1, 3, 4)[frames]
                  ).min() > 0
    again = diffusion.sample_from_embeddings(
        model, Tensor(z), {"y": y, "mask": caption_mask}, y_null, mask=Tensor(frames),
        generator=0, progress=False).asnumpy()
    np.testing.assert_array_equal(out, again)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_sampling_steps must be in"):
        IDDPM(num_sampling_steps=1001)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number, got nan"):
        IDDPM(num_sampling_steps=10, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="not both"):
        IDDPM(num_sampling_steps=10, timestep_respacing="20")
    with pytest.raises(ValueError, match="unknown noise_schedule"):
        IDDPM(noise_schedule="cosine")
    # the cosine schedule's last beta (0.999 over one step) tends to 1 over a long stride
    with pytest.raises(ValueError, match="rounds to 1 in float32.*more sampling steps"):
        IDDPM(num_sampling_steps=3, noise_schedule="squaredcos_cap_v2")
    cosine = IDDPM(num_sampling_steps=10, noise_schedule="squaredcos_cap_v2")
    assert np.isfinite(cosine.sqrt_recip_alphas_cumprod).all()
    diffusion = IDDPM(num_sampling_steps=2)
    x = Tensor(np.zeros((1, 2, 3, 2, 2), np.float32))
    t = Tensor(np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="must output 4 channels for 2 input"):
        diffusion.p_mean_variance(lambda x, ts: x, x, t)
    with pytest.raises(ValueError, match="frame mask must be"):
        diffusion.p_sample(constant_model(np.zeros((1, 4, 3, 2, 2), np.float32)), x, t, x,
                           mask=Tensor(np.ones((1, 2), np.bool_)))
    with pytest.raises(ValueError, match="sampler must be one of"):
        diffusion.p_sample_loop(lambda x, ts: x, (1, 2, 3, 2, 2), sampler="euler")
