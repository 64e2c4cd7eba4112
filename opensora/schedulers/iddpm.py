"""Gaussian diffusion as Open-Sora 1.0 / 1.1 trains and samples it (Improved DDPM).

The model predicts epsilon and, in as many extra channels, a number v in [-1, 1] that
interpolates the log-variance of p(x_{t-1} | x_t) between the posterior variance (v = -1) and
beta_t (v = 1) ("learned range" sigma). Training minimises the epsilon MSE plus the variational
bound term of that step, with the gradient of the VLB kept off the mean so that it only teaches
the variance.

Schedules are numpy arrays computed the way Open-Sora 1.1 computes them (float64 betas, then
float32 for the process it actually runs, which matches its arrays to float32 rounding), and
become float32 tensors once. The math that touches tensors is written with MindSpore ops, so
`training_losses` differentiates in PyNative and inside `mindspore.jit` (the class is a
`jit_class`); sampling is a Python loop that draws its noise from a numpy Generator, so a seed
reproduces a video in either mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from tqdm.auto import tqdm

ModelFn = Callable[..., Any]
GeneratorLike = np.random.Generator | int | None

MODEL_MEAN_TYPES = ("epsilon", "start_x")
MODEL_VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
SAMPLERS = ("ddpm", "ddim")


# ---------------------------------------------------------------------------------------------
# schedules (numpy)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas for `schedule_name`; "linear" is Ho et al.'s 1e-4 .. 0.02, rescaled to the length."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps,
                           dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise_schedule {schedule_name!r}: use 'linear' (Open-Sora) or 'squaredcos_cap_v2'"
    )


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1], capped at `max_beta`."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """The original timesteps kept when sampling with fewer steps.

    `section_counts` splits [0, num_timesteps) into equal sections and takes that many evenly
    strided (rounded) steps from each, first and last step included: "10" on 1000 keeps
    0, 111, ..., 999. "ddimN" asks for the integer stride of the DDIM paper instead.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps out of {num_timesteps} with an "
                             "integer stride; use a plain number of steps instead of 'ddimN'")
        section_counts = [int(x) for x in section_counts.split(",")]
    counts = list(section_counts)
    if not counts:
        raise ValueError("section_counts is empty: give the number of sampling steps, e.g. '100'")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps "
                             f"(num_timesteps={num_timesteps}, sections={counts})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


@dataclass(frozen=True)
class DiffusionSchedule:
    """Every per-timestep constant of the forward process and its posterior.

    The base 1000-step process is float64; the schedules the diffusion runs on (respaced, even
    when all 1000 steps are kept) are float32, as in Open-Sora 1.1.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray  # index in this schedule -> timestep of the original process

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: np.ndarray | None = None,
                   dtype: type = np.float64) -> DiffusionSchedule:
        """All arrays from betas, computed in `dtype` (the running product in float64)."""
        betas = np.asarray(betas, dtype=dtype)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        one = np.ones(1, dtype=dtype)
        alphas = 1.0 - betas
        cumprod = np.cumprod(alphas.astype(np.float64)).astype(dtype)
        prev = np.concatenate([one, cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - cumprod)
        # the posterior variance is 0 at t=0, so its log borrows the value of t=1
        log_posterior = (np.log(np.concatenate([posterior_variance[1:2], posterior_variance[1:]]))
                         if len(betas) > 1 else np.array([], dtype=dtype))
        if timestep_map is None:
            timestep_map = np.arange(len(betas), dtype=np.int64)
        return cls(
            betas=betas,
            alphas_cumprod=cumprod,
            alphas_cumprod_prev=prev,
            alphas_cumprod_next=np.concatenate([cumprod[1:], 0.0 * one]),
            sqrt_alphas_cumprod=np.sqrt(cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / cumprod - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=log_posterior,
            posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - cumprod),
            posterior_mean_coef2=(1.0 - prev) * np.sqrt(alphas) / (1.0 - cumprod),
            timestep_map=np.asarray(timestep_map, dtype=np.int64),
        )

    def respaced(self, use_timesteps: Iterable[int]) -> DiffusionSchedule:
        """The process that visits only `use_timesteps`, with the same alphas_cumprod there.

        Open-Sora 1.1 stores the rebuilt betas in a float32 tensor and derives every other
        array from it in float32 (torch's cumprod accumulates in float64); the same is done
        here, so the arrays match its own to float32 rounding.
        """
        keep = sorted(set(use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= len(self.betas):
            raise ValueError(f"use_timesteps must lie in [0, {len(self.betas)}), got {keep[:5]}...")
        last, betas = 1.0, []
        for i in keep:
            betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        betas = np.asarray(betas, dtype=np.float32)
        if (betas >= 1.0).any():  # alpha_bar would be 0 and every 1 / alpha_bar infinite
            raise ValueError(
                f"respaced to {len(keep)} steps, this schedule's beta at timestep "
                f"{self.timestep_map[keep][int(np.argmax(betas >= 1.0))]} rounds to 1 in "
                "float32 (Open-Sora stores respaced betas in float32), so sampling would give "
                "nan; use more sampling steps")
        return DiffusionSchedule.from_betas(betas, self.timestep_map[keep], dtype=np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------
# likelihood pieces (MindSpore ops, differentiable)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2)
                  + ops.square(mean1 - mean2) * ops.exp(-logvar2))


def _tanh(x: Tensor) -> Tensor:
    """tanh accurate to float32 rounding near +-1.

    MindSpore's CPU tanh saturates early (1 + tanh(-5) comes out negative), which would zero
    the tails of the normal CDF below; the clamp keeps exp finite so gradients stay finite.
    """
    return 2.0 / (1.0 + ops.exp(-2.0 * ops.clamp(x, -15.0, 15.0))) - 1.0


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that IDDPM's likelihood uses."""
    return 0.5 * (1.0 + _tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of a Gaussian integrated over the 8-bit bin around x (x in [-1, 1]), in nats.

    The outermost bins extend to infinity, as for images; latents are scored the same way
    because that is what the published models were trained with.
    """
    centered = x - means
    inv_stdv = ops.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus,
                     ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(tensor: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over every non-batch axis; with a frame mask (B, T), over the frames marked True.

    The masked form needs (B, C, T, H, W) and divides by the number of selected elements.
    """
    if mask is None:
        return tensor.mean(axis=tuple(range(1, tensor.ndim)))
    weights = mask.astype(ms.float32).reshape(mask.shape[0], 1, mask.shape[1], 1, 1)
    total = (tensor * weights).sum(axis=(1, 2, 3, 4))
    count = (ops.zeros_like(tensor) + weights).sum(axis=(1, 2, 3, 4))
    return total / count


def _broadcast(values: Tensor, ndim: int) -> Tensor:
    """(B,) per-sample constants -> (B, 1, ..., 1) for broadcasting against an ndim tensor."""
    return values.reshape((-1,) + (1,) * (ndim - 1))


def _extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    return _broadcast(ops.gather(table, t, 0), ndim)


def _frame_mask(mask: Tensor, x: Tensor) -> Tensor:
    """A (B, T) frame mask as (B, 1, T, 1, 1), tiled to x's batch when CFG doubled it."""
    if x.ndim != 5 or mask.ndim != 2 or mask.shape[1] != x.shape[2]:
        raise ValueError(f"frame mask must be (B, T) for latents (B, C, T, H, W); got mask "
                         f"{tuple(mask.shape)} for x {tuple(x.shape)}")
    if mask.shape[0] != x.shape[0]:
        if 2 * mask.shape[0] != x.shape[0]:
            raise ValueError(f"frame mask batch {mask.shape[0]} matches neither the latent batch "
                             f"{x.shape[0]} nor its half (classifier-free guidance)")
        mask = ops.tile(mask, (2, 1))
    return mask.astype(ms.bool_).reshape(mask.shape[0], 1, mask.shape[1], 1, 1)


def forward_with_cfg(model: ModelFn, x: Tensor, timestep: Tensor, y: Tensor, cfg_scale: float,
                     cfg_channel: int | None = None, **kwargs: Any) -> Tensor:
    """Classifier-free guidance over a batch laid out as [conditional, unconditional].

    Both halves see the first half of x; y holds [y, y_null]. Only the first `cfg_channel`
    output channels are guided (Open-Sora 1.1 uses 3 of the 4 epsilon channels); the rest,
    including the variance channels, keep each branch's own prediction.
    """
    half = x[: x.shape[0] // 2]
    combined = ops.concat([half, half], axis=0)
    x_mask = kwargs.get("x_mask")
    if x_mask is not None and x_mask.shape[0] != x.shape[0]:
        kwargs["x_mask"] = ops.concat([x_mask, x_mask], axis=0)
    out = model(combined, timestep, y, **kwargs)
    if isinstance(out, dict):
        out = out["x"]
    if cfg_channel is None:
        cfg_channel = out.shape[1] // 2
    eps, rest = out[:, :cfg_channel], out[:, cfg_channel:]
    half_batch = eps.shape[0] // 2
    cond_eps, uncond_eps = eps[:half_batch], eps[half_batch:]
    guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return ops.concat([ops.concat([guided, guided], axis=0), rest], axis=1)


def _as_generator(generator: GeneratorLike) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(generator)


def _randn(rng: np.random.Generator, shape: tuple[int, ...]) -> Tensor:
    return Tensor(rng.standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# the diffusion


@ms.jit_class
class IDDPM:
    """Open-Sora's IDDPM scheduler: same constructor arguments, same training loss and sampler.

    `num_sampling_steps` (or a `timestep_respacing` string) selects the respaced process used
    by the samplers; the model always receives original timesteps (0..999). Training uses
    `IDDPM()` or `IDDPM(timestep_respacing="")`, the full process.
    """

    def __init__(self, num_sampling_steps: int | None = None,
                 timestep_respacing: str | Iterable[int] | None = None,
                 noise_schedule: str = "linear", use_kl: bool = False, sigma_small: bool = False,
                 predict_xstart: bool = False, learn_sigma: bool = True,
                 rescale_learned_sigmas: bool = False, diffusion_steps: int = 1000,
                 cfg_scale: float = 4.0, cfg_channel: int | None = None) -> None:
        if num_sampling_steps is not None:
            if timestep_respacing:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            if int(num_sampling_steps) < 1 or int(num_sampling_steps) > diffusion_steps:
                raise ValueError(f"num_sampling_steps must be in [1, {diffusion_steps}], "
                                 f"got {num_sampling_steps}")
            timestep_respacing = str(int(num_sampling_steps))
        if timestep_respacing is None or timestep_respacing == "":
            timestep_respacing = [diffusion_steps]
        base = DiffusionSchedule.from_betas(
            get_named_beta_schedule(noise_schedule, diffusion_steps))
        self.schedule = base.respaced(space_timesteps(diffusion_steps, timestep_respacing))
        self.original_num_steps = diffusion_steps
        self.num_timesteps = len(self.schedule.betas)
        self.model_mean_type = "start_x" if predict_xstart else "epsilon"
        if learn_sigma:
            self.model_var_type = "learned_range"
        else:
            self.model_var_type = "fixed_small" if sigma_small else "fixed_large"
        if use_kl:
            self.loss_type = "rescaled_kl"
        else:
            self.loss_type = "rescaled_mse" if rescale_learned_sigmas else "mse"
        if not np.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
        self.cfg_scale = float(cfg_scale)
        self.cfg_channel = cfg_channel
        self._learned_sigma = self.model_var_type == "learned_range"
        self._predict_eps = self.model_mean_type == "epsilon"
        self._vb_loss = self.loss_type in ("kl", "rescaled_kl")
        self._vb_scale = {"mse": 1.0, "rescaled_mse": self.num_timesteps / 1000.0, "kl": 1.0,
                          "rescaled_kl": float(self.num_timesteps)}[self.loss_type]
        self._build_tensors()

    def _build_tensors(self) -> None:
        s = self.schedule

        def f32(a: np.ndarray) -> Tensor:
            return Tensor(np.asarray(a, dtype=np.float32))

        self.t_sqrt_alphas_cumprod = f32(s.sqrt_alphas_cumprod)
        self.t_sqrt_one_minus_alphas_cumprod = f32(s.sqrt_one_minus_alphas_cumprod)
        self.t_one_minus_alphas_cumprod = f32(1.0 - s.alphas_cumprod)
        self.t_log_one_minus_alphas_cumprod = f32(s.log_one_minus_alphas_cumprod)
        self.t_sqrt_recip_alphas_cumprod = f32(s.sqrt_recip_alphas_cumprod)
        self.t_sqrt_recipm1_alphas_cumprod = f32(s.sqrt_recipm1_alphas_cumprod)
        self.t_posterior_mean_coef1 = f32(s.posterior_mean_coef1)
        self.t_posterior_mean_coef2 = f32(s.posterior_mean_coef2)
        self.t_posterior_variance = f32(s.posterior_variance)
        self.t_posterior_log_variance_clipped = f32(s.posterior_log_variance_clipped)
        self.t_log_betas = f32(np.log(s.betas))
        self.t_alphas_cumprod = f32(s.alphas_cumprod)
        self.t_alphas_cumprod_prev = f32(s.alphas_cumprod_prev)
        # fixed variances: "large" uses beta_t, with the posterior's value at t=0
        large = np.append(s.posterior_variance[1], s.betas[1:])
        if self.model_var_type == "fixed_large":
            self.t_fixed_variance = f32(large)
            self.t_fixed_log_variance = f32(np.log(large))
        else:
            self.t_fixed_variance = f32(s.posterior_variance)
            self.t_fixed_log_variance = f32(s.posterior_log_variance_clipped)
        self.t_timestep_map = Tensor(s.timestep_map.astype(np.int32))

    # --- forward process -------------------------------------------------------------------

    def __getattr__(self, name: str) -> np.ndarray:
        """Schedule arrays read like Open-Sora's attributes (`diffusion.alphas_cumprod`)."""
        schedule = self.__dict__.get("schedule")
        if schedule is not None and name in schedule.__dataclass_fields__:
            return getattr(schedule, name)
        raise AttributeError(name)

    def map_timesteps(self, t: Tensor) -> Tensor:
        """Respaced step indices -> the original timesteps the model was trained on."""
        return ops.gather(self.t_timestep_map, t, 0)

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = _extract(self.t_sqrt_alphas_cumprod, t, n) * x_start
        variance = _extract(self.t_one_minus_alphas_cumprod, t, n)
        log_variance = _extract(self.t_log_one_minus_alphas_cumprod, t, n)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        if noise is None:
            noise = ops.randn_like(x_start)
        n = x_start.ndim
        return (_extract(self.t_sqrt_alphas_cumprod, t, n) * x_start
                + _extract(self.t_sqrt_one_minus_alphas_cumprod, t, n) * noise)

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor
                                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = (_extract(self.t_posterior_mean_coef1, t, n) * x_start
                + _extract(self.t_posterior_mean_coef2, t, n) * x_t)
        variance = _extract(self.t_posterior_variance, t, n)
        log_variance = _extract(self.t_posterior_log_variance_clipped, t, n)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        n = x_t.ndim
        return (_extract(self.t_sqrt_recip_alphas_cumprod, t, n) * x_t
                - _extract(self.t_sqrt_recipm1_alphas_cumprod, t, n) * eps)

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        n = x_t.ndim
        return ((_extract(self.t_sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart)
                / _extract(self.t_sqrt_recipm1_alphas_cumprod, t, n))

    # --- reverse process -------------------------------------------------------------------

    def output_to_mean_variance(self, model_output: Tensor, x: Tensor, t: Tensor,
                                clip_denoised: bool = True,
                                denoised_fn: Callable[[Tensor], Tensor] | None = None
                                ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a raw model output: mean, variance, log_variance, pred_xstart."""
        c = x.shape[1]
        model_output = model_output.astype(ms.float32)
        if self._learned_sigma:
            model_output, var_values = model_output[:, :c], model_output[:, c:]
            min_log = _extract(self.t_posterior_log_variance_clipped, t, x.ndim)
            max_log = _extract(self.t_log_betas, t, x.ndim)
            frac = (var_values + 1.0) / 2.0  # v in [-1, 1] spans [posterior var, beta]
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = ops.exp(log_variance)
        else:
            variance = _extract(self.t_fixed_variance, t, x.ndim) + ops.zeros_like(x)
            log_variance = _extract(self.t_fixed_log_variance, t, x.ndim) + ops.zeros_like(x)
        if self._predict_eps:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        else:
            pred_xstart = model_output
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = ops.clamp(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: ModelFn, x: Tensor, t: Tensor, clip_denoised: bool = True,
                        denoised_fn: Callable[[Tensor], Tensor] | None = None,
                        model_kwargs: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """Run the model at (respaced) step t and return p(x_{t-1} | x_t)."""
        if model_kwargs is None:
            model_kwargs = {}
        model_output = model(x, self.map_timesteps(t), **model_kwargs)
        if isinstance(model_output, tuple):
            model_output = model_output[0]
        expected = 2 * x.shape[1] if self._learned_sigma else x.shape[1]
        if model_output.shape[1] != expected:
            raise ValueError(f"the model must output {expected} channels for {x.shape[1]} input "
                             f"channels ({self.model_var_type} sigma), got {model_output.shape[1]}")
        return self.output_to_mean_variance(model_output, x, t, clip_denoised, denoised_fn)

    # --- training --------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor,
                     clip_denoised: bool = False, mask: Tensor | None = None) -> Tensor:
        """The VLB term of step t per sample, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL of x_0
        for t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.output_to_mean_variance(model_output, x_t, t, clip_denoised)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl, mask) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"],
                                                   0.5 * out["log_variance"])
        nll = mean_flat(nll, mask) / math.log(2.0)
        return ops.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x_start: Tensor, t: Tensor,
                        model_kwargs: dict[str, Any] | None = None, noise: Tensor | None = None,
                        mask: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses {"loss", "mse", "vb"} (each (B,)) for timesteps t.

        `mask` (B, T), True = frame is generated: frames marked False are only noised to step 0
        in x_t (they condition the others, the model sees them at timestep 0) and are left out
        of both loss terms. Inside `mindspore.jit`, write `model_kwargs` as a dict literal
        ({"y": y, ...}); graph mode cannot unpack a dict made by calling dict().
        """
        if noise is None:
            noise = ops.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        if mask is not None:
            x_t0 = self.q_sample(x_start, ops.zeros_like(t), noise)
            x_t = ops.where(_frame_mask(mask, x_t), x_t, x_t0)
        # no `model_kwargs = {}` rebinding: graph mode cannot join a dict built by dict() with {}
        if model_kwargs is None:
            model_output = model(x_t, self.map_timesteps(t))
        else:
            model_output = model(x_t, self.map_timesteps(t), **model_kwargs)
        if isinstance(model_output, tuple):
            model_output = model_output[0]
        model_output = model_output.astype(ms.float32)
        if self._vb_loss:
            vb = self.vb_terms_bpd(model_output, x_start, x_t, t, False, mask) * self._vb_scale
            return {"loss": vb, "vb": vb}
        c = x_start.shape[1]
        if self._learned_sigma:
            eps, var_values = model_output[:, :c], model_output[:, c:]
            # the VLB trains the variance only: the mean it sees is a constant
            frozen = ops.concat([ops.stop_gradient(eps), var_values], axis=1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t, False, mask) * self._vb_scale
        else:
            eps = model_output
            vb = ops.zeros((x_start.shape[0],), ms.float32)
        target = noise if self._predict_eps else x_start
        mse = mean_flat(ops.square(target - eps), mask)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # --- sampling --------------------------------------------------------------------------

    def p_sample(self, model: ModelFn, x: Tensor, t: Tensor, noise: Tensor,
                 clip_denoised: bool = True,
                 denoised_fn: Callable[[Tensor], Tensor] | None = None,
                 model_kwargs: dict[str, Any] | None = None,
                 mask: Tensor | None = None) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1}.

        Frames with mask False keep their current value, so condition latents written into
        x_T by the caller come out unchanged (the model is told about them via x_mask).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        nonzero = _broadcast((t != 0).astype(ms.float32), x.ndim)  # no noise at t = 0
        sample = out["mean"] + nonzero * ops.exp(0.5 * out["log_variance"]) * noise
        if mask is not None:
            sample = ops.where(_frame_mask(mask, x), sample, x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model: ModelFn, x: Tensor, t: Tensor, noise: Tensor,
                    clip_denoised: bool = True,
                    denoised_fn: Callable[[Tensor], Tensor] | None = None,
                    model_kwargs: dict[str, Any] | None = None, mask: Tensor | None = None,
                    eta: float = 0.0) -> dict[str, Tensor]:
        """One DDIM step (eta = 0: deterministic; eta = 1: ancestral-like)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.t_alphas_cumprod, t, x.ndim)
        alpha_bar_prev = _extract(self.t_alphas_cumprod_prev, t, x.ndim)
        sigma = (eta * ops.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
                 * ops.sqrt(1.0 - alpha_bar / alpha_bar_prev))
        mean = (out["pred_xstart"] * ops.sqrt(alpha_bar_prev)
                + ops.sqrt(1.0 - alpha_bar_prev - sigma * sigma) * eps)
        nonzero = _broadcast((t != 0).astype(ms.float32), x.ndim)
        sample = mean + nonzero * sigma * noise
        if mask is not None:
            sample = ops.where(_frame_mask(mask, x), sample, x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop_progressive(self, model: ModelFn, shape: tuple[int, ...],
                                  noise: Tensor | None = None, clip_denoised: bool = True,
                                  denoised_fn: Callable[[Tensor], Tensor] | None = None,
                                  model_kwargs: dict[str, Any] | None = None,
                                  progress: bool = False, mask: Tensor | None = None,
                                  generator: GeneratorLike = None, sampler: str = "ddpm",
                                  eta: float = 0.0) -> Iterator[dict[str, Any]]:
        """Yield {"sample", "pred_xstart", "t"} after every step, from t = T-1 down to 0.

        `noise` is the starting x_T (drawn from `generator` if None); each step's noise comes
        from `generator` (a numpy Generator or a seed), so equal seeds give equal samples.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        shape = tuple(int(s) for s in shape)
        rng = _as_generator(generator)
        if noise is None:
            img = _randn(rng, shape)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            img = noise.astype(ms.float32)
        indices: Iterable[int] = range(self.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices, total=self.num_timesteps, desc=f"{sampler} sampling")
        for i in indices:
            t = Tensor(np.full((shape[0],), i, dtype=np.int32))
            step_noise = _randn(rng, shape) if sampler == "ddpm" or eta > 0 else ops.zeros_like(img)
            if sampler == "ddpm":
                out = self.p_sample(model, img, t, step_noise, clip_denoised, denoised_fn,
                                    model_kwargs, mask)
            else:
                out = self.ddim_sample(model, img, t, step_noise, clip_denoised, denoised_fn,
                                       model_kwargs, mask, eta)
            out["t"] = i
            yield out
            img = out["sample"]

    def p_sample_loop(self, model: ModelFn, shape: tuple[int, ...], noise: Tensor | None = None,
                      clip_denoised: bool = True,
                      denoised_fn: Callable[[Tensor], Tensor] | None = None,
                      model_kwargs: dict[str, Any] | None = None, progress: bool = False,
                      mask: Tensor | None = None, generator: GeneratorLike = None,
                      sampler: str = "ddpm", eta: float = 0.0) -> Tensor:
        """The final x_0 of `p_sample_loop_progressive`."""
        final = None
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                  model_kwargs, progress, mask, generator,
                                                  sampler, eta):
            final = out["sample"]
        return final

    def ddim_sample_loop(self, model: ModelFn, shape: tuple[int, ...], noise: Tensor | None = None,
                         clip_denoised: bool = True, model_kwargs: dict[str, Any] | None = None,
                         progress: bool = False, mask: Tensor | None = None,
                         generator: GeneratorLike = None, eta: float = 0.0) -> Tensor:
        """Deterministic (eta = 0) DDIM sampling over the respaced steps."""
        return self.p_sample_loop(model, shape, noise, clip_denoised, None, model_kwargs,
                                  progress, mask, generator, "ddim", eta)

    def sample_from_embeddings(self, model: ModelFn, z: Tensor, model_args: dict[str, Any],
                               y_null: Tensor, additional_args: dict[str, Any] | None = None,
                               mask: Tensor | None = None, generator: GeneratorLike = None,
                               progress: bool = True, sampler: str = "ddpm", eta: float = 0.0,
                               callback: Callable[[dict[str, Any]], None] | None = None
                               ) -> Tensor:
        """Guided sampling from caption embeddings: z (B, C, T, H, W) is x_T.

        `model_args` holds y (B, 1, L, C) and the caption mask (B, L); the batch is doubled as
        [y, y_null] and the null branch reuses the same caption mask, as in Open-Sora.
        `mask` (B, T): frames marked False are conditions and keep the values given in z.
        `callback`, if given, sees every step's {"sample", "pred_xstart", "t"} (doubled batch).
        """
        n = z.shape[0]
        if y_null.shape[0] != n or model_args["y"].shape[0] != n:
            raise ValueError(f"y ({model_args['y'].shape[0]}) and y_null ({y_null.shape[0]}) "
                             f"must have one row per latent ({n})")
        kwargs = dict(model_args)
        kwargs["y"] = ops.concat([model_args["y"], y_null], axis=0)
        if kwargs.get("mask") is not None:
            kwargs["mask"] = ops.concat([kwargs["mask"], kwargs["mask"]], axis=0)
        if additional_args:
            kwargs.update(additional_args)
        cfg_scale, cfg_channel = self.cfg_scale, self.cfg_channel

        def guided(x: Tensor, timestep: Tensor, **kw: Any) -> Tensor:
            y = kw.pop("y")
            return forward_with_cfg(model, x, timestep, y, cfg_scale, cfg_channel, **kw)

        z2 = ops.concat([z, z], axis=0).astype(ms.float32)
        final = None
        for out in self.p_sample_loop_progressive(guided, tuple(z2.shape), z2, False, None, kwargs,
                                                  progress, mask, generator, sampler, eta):
            if callback is not None:
                callback(out)
            final = out["sample"]
        return final[:n]

    def sample(self, model: ModelFn, text_encoder: Any, z: Tensor, prompts: list[str],
               additional_args: dict[str, Any] | None = None, mask: Tensor | None = None,
               generator: GeneratorLike = None, progress: bool = True, sampler: str = "ddpm",
               eta: float = 0.0) -> Tensor:
        """Open-Sora's `IDDPM.sample`: encode prompts, then guided sampling from x_T = z."""
        if len(prompts) != z.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {z.shape[0]} latents")
        model_args = text_encoder.encode(list(prompts))
        y_null = text_encoder.null(len(prompts))
        return self.sample_from_embeddings(model, z, model_args, y_null, additional_args, mask,
                                           generator, progress, sampler, eta)
