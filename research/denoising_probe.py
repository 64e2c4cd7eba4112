"""How close is a diffusion model's guess of the clean clip, at each noise level?

A sampler settles a clip's layout (where the shape is in each frame, hence which way it moves)
while noise still dominates, and refines detail at the end. The training loss cannot show how
good a model is early on: in eps units an x_0 error shrinks by the signal-to-noise ratio, which
at t = 900 of the linear schedule is about 3e-4. This probe reads the model's own estimate of
the clean latents (`pred_xstart`, whatever the model predicts) from noised training clips, in
latent units, next to two estimates that need no model:

* **identity**: x_t / sqrt(alpha_bar_t), i.e. eps = 0: what ignoring the noise gives;
* **mean**: the batch's per-channel mean latent: what ignoring x_t gives, the best constant.

A useful denoiser beats both at every timestep. Where it does worse than the mean, its guesses
at that noise level are further off than a blur, and the sampler builds the clip on them.

`motion_by_timestep` asks the same question of motion alone: decoded to pixels, how far does
the shape in the model's clean-clip estimate travel along the captioned direction, next to how
far it travels in the clip itself? Where the estimate stops moving, the sampler draws a layout
that does not move either, however well the model denoises the last steps.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clips import committed_tiny, training_batches
from mindspore import Tensor
from temporal_probe import probe_inputs, probe_timesteps

from opensora.evaluation import captioned_shift
from opensora.runtime import configure
from opensora.schedulers.iddpm import IDDPM
from opensora.train import decode_latents

ESTIMATES = ("model", "identity", "mean")


@dataclass(frozen=True)
class DenoisingErrors:
    timesteps: tuple[int, ...]
    errors: dict[str, np.ndarray]  # estimate -> (len(timesteps),) mean squared x_0 error
    clips: int

    def worse_than_mean(self) -> tuple[int, ...]:
        """Timesteps at which the model's x_0 estimate is further off than the batch mean."""
        return tuple(t for t, m, c in zip(self.timesteps, self.errors["model"],
                                          self.errors["mean"]) if m > c)

    def table(self) -> str:
        lines = [f"{'timestep':>8s} " + " ".join(f"{e:>10s}" for e in ESTIMATES)]
        for i, t in enumerate(self.timesteps):
            lines.append(f"{t:>8d} " + " ".join(f"{self.errors[e][i]:10.4f}" for e in ESTIMATES))
        lines.append(f"({self.clips} clips; mean squared error of the clean-latent estimate)")
        return "\n".join(lines)


def noised_estimates(model: object, diffusion: object, x: np.ndarray,
                     kwargs: Mapping[str, Tensor], timesteps: Sequence[int],
                     rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(t, x_t, the model's clean-latent estimate from x_t) for each timestep, x noised afresh
    from `rng` each time."""
    for t in timesteps:
        noise = rng.standard_normal(x.shape).astype(np.float32)
        t_batch = Tensor(np.full(len(x), t, np.int32))
        x_t = diffusion.q_sample(Tensor(x), t_batch, Tensor(noise))
        guess = diffusion.p_mean_variance(model, x_t, t_batch, clip_denoised=False,
                                          model_kwargs=dict(kwargs))["pred_xstart"]
        yield t, x_t.asnumpy(), guess.asnumpy()


def x0_error_by_timestep(model: object, diffusion: object,
                         batches: Iterable[Mapping[str, np.ndarray]],
                         timesteps: Sequence[int] = (100, 300, 500, 700, 900),
                         seed: int = 0) -> DenoisingErrors:
    """Mean squared error of `model`'s clean-latent estimate on noised `batches`
    (`VideoCaptionDataset` batches of latents and caption features) at each timestep of the
    full process of `diffusion` (an `IDDPM` without respacing), with the identity and mean
    estimates beside it."""
    timesteps = probe_timesteps(diffusion, timesteps)
    alphas_cumprod = diffusion.schedule.alphas_cumprod
    rng = np.random.default_rng(seed)
    sums = {e: np.zeros(len(timesteps)) for e in ESTIMATES}
    clips = 0
    for x, kwargs in probe_inputs(model, batches):
        channel_mean = x.mean(axis=tuple(i for i in range(x.ndim) if i != 1), keepdims=True)
        mean_error = ((x - channel_mean) ** 2).reshape(len(x), -1).mean(axis=1).sum()
        for i, (t, x_t, guess) in enumerate(
                noised_estimates(model, diffusion, x, kwargs, timesteps, rng)):
            identity = x_t / np.sqrt(alphas_cumprod[t])
            for name, estimate in (("model", guess), ("identity", identity)):
                sums[name][i] += ((estimate - x) ** 2).reshape(len(x), -1).mean(axis=1).sum()
            sums["mean"][i] += mean_error
        clips += len(x)
    if clips == 0:
        raise ValueError("x0_error_by_timestep got no batches")
    return DenoisingErrors(timesteps, {e: s / clips for e, s in sums.items()}, clips)


@dataclass(frozen=True)
class MotionShifts:
    timesteps: tuple[int, ...]
    model_shift: np.ndarray  # (len(timesteps),) mean px the estimate's shape moves as captioned
    data_shift: float  # the same for the clips themselves
    clips: int

    def moving_up_to(self, fraction: float = 0.5) -> int | None:
        """Highest timestep whose estimate moves at least `fraction` of the clips' own shift."""
        moving = [t for t, s in zip(self.timesteps, self.model_shift)
                  if s >= fraction * self.data_shift]
        return max(moving) if moving else None

    def table(self) -> str:
        lines = [f"{'timestep':>8s} {'model px':>9s} {'of data':>8s}"]
        for t, shift in zip(self.timesteps, self.model_shift):
            lines.append(f"{t:>8d} {shift:9.1f} {shift / self.data_shift:8.0%}")
        lines.append(f"(the clips themselves: {self.data_shift:.1f} px along the captioned "
                     f"direction; {self.clips} clips)")
        return "\n".join(lines)


def motion_by_timestep(model: object, diffusion: object, vae: object,
                       batches: Iterable[Mapping[str, np.ndarray]], captions: Sequence[str],
                       timesteps: Sequence[int] = (200, 400, 600, 800),
                       seed: int = 0) -> MotionShifts:
    """How far the shape in `model`'s clean-latent estimate moves along the captioned direction,
    decoded by `vae`, on `batches` noised to each timestep; `captions` name the clips of all
    batches in order (a moving-shapes caption with a direction each)."""
    timesteps = probe_timesteps(diffusion, timesteps)
    captions = list(captions)
    rng = np.random.default_rng(seed)
    sums, data_sum, clips = np.zeros(len(timesteps)), 0.0, 0
    for x, kwargs in probe_inputs(model, batches):
        names = captions[clips : clips + len(x)]
        if len(names) != len(x):
            raise ValueError(f"{len(captions)} captions, but the batches hold more clips")
        data_sum += sum(map(captioned_shift, decode_latents(vae, x), names))
        for i, (_, _, guess) in enumerate(
                noised_estimates(model, diffusion, x, kwargs, timesteps, rng)):
            sums[i] += sum(map(captioned_shift, decode_latents(vae, guess), names))
        clips += len(x)
    if clips == 0:
        raise ValueError("motion_by_timestep got no batches")
    if clips != len(captions):
        raise ValueError(f"{len(captions)} captions for {clips} clips")
    return MotionShifts(timesteps, sums / clips, data_sum / clips, clips)


def main() -> None:
    """Both probes on the committed tiny weights and the first training clips; writes
    denoising_probe.json beside this file."""
    configure()
    preset, model, vae, text_encoder = committed_tiny()
    batches = list(training_batches(preset, vae, text_encoder, count=2))
    diffusion = IDDPM(noise_schedule=preset.noise_schedule)
    errors = x0_error_by_timestep(model, diffusion, batches)
    print(errors.table())
    captions = [str(c) for b in batches for c in b["caption"]]
    shifts = motion_by_timestep(model, diffusion, vae, batches, captions)
    print(shifts.table())
    record = {"model": str(preset.model_path), "clips": errors.clips,
              "x0_error": {"timesteps": list(errors.timesteps),
                           **{k: v.tolist() for k, v in errors.errors.items()}},
              "motion": {"timesteps": list(shifts.timesteps),
                         "model_shift_px": shifts.model_shift.tolist(),
                         "data_shift_px": shifts.data_shift}}
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
