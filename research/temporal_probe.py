"""Does a video model know which way time runs? A loss probe on real clips.

Sampled clips can be scored for motion only after the model has learned to draw; this probe
reads the same knowledge off the training loss, long before. The same clips, noise and
timesteps are scored four ways:

* **forward**: the clips as recorded;
* **reversed**: played backwards (every shape moves the other way than its caption says);
* **shuffled**: frames in a random order (no temporal coherence left);
* **frozen**: the first frame repeated (coherent, but nothing moves).

A model that uses time at all denoises `shuffled` clips worse than `forward` ones. A model
that has learned the captioned *direction* denoises `reversed` clips worse than `forward`
ones: `arrow_gap` = (reversed - forward) / forward, per timestep, is that margin. And a model
whose loss on `frozen` clips is lower than on `forward` ones has learned "shapes stay where
they are" as its prior, which is what a sampler then draws.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clips import committed_tiny, training_batches
from mindspore import Tensor

from opensora.runtime import configure
from opensora.schedulers.iddpm import IDDPM
from opensora.train import MICRO_CONDITIONS, takes_micro_conditions

VARIANTS = ("forward", "reversed", "shuffled", "frozen")


def clip_variants(x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The four orderings of a (B, C, T, H, W) latent batch along T."""
    if x.ndim != 5 or x.shape[2] < 2:
        raise ValueError(f"expected (B, C, T, H, W) latents with T >= 2, got {x.shape}")
    frames = x.shape[2]
    order = rng.permutation(frames)
    while frames > 2 and np.array_equal(order, np.arange(frames)):
        order = rng.permutation(frames)
    return {
        "forward": x,
        "reversed": np.ascontiguousarray(x[:, :, ::-1]),
        "shuffled": np.ascontiguousarray(x[:, :, order]),
        "frozen": np.repeat(x[:, :, :1], frames, axis=2),
    }


@dataclass(frozen=True)
class ProbeResult:
    timesteps: tuple[int, ...]
    losses: dict[str, np.ndarray]  # variant -> (len(timesteps),) mean eps MSE
    clips: int

    def arrow_gap(self) -> np.ndarray:
        """(reversed - forward) / forward per timestep: > 0 when the captioned direction helps."""
        return self.relative("reversed")

    def relative(self, variant: str) -> np.ndarray:
        """(variant - forward) / forward per timestep."""
        return (self.losses[variant] - self.losses["forward"]) / self.losses["forward"]

    def table(self) -> str:
        lines = [f"{'timestep':>8s} " + " ".join(f"{v:>9s}" for v in VARIANTS)
                 + f" {'arrow gap':>10s}"]
        for i, t in enumerate(self.timesteps):
            lines.append(f"{t:>8d} " + " ".join(f"{self.losses[v][i]:9.5f}" for v in VARIANTS)
                         + f" {self.arrow_gap()[i]:+10.2%}")
        lines.append(f"({self.clips} clips; eps MSE, same noise for every variant)")
        return "\n".join(lines)


def probe_timesteps(diffusion: object, timesteps: Sequence[int]) -> tuple[int, ...]:
    """The timesteps as ints, refused unless all lie in the full process of `diffusion`."""
    num_timesteps = diffusion.num_timesteps
    for t in timesteps:
        if not 0 <= int(t) < num_timesteps:
            raise ValueError(f"timestep {t} outside [0, {num_timesteps})")
    return tuple(int(t) for t in timesteps)


def probe_inputs(model: object, batches: Iterable[Mapping[str, np.ndarray]]
                 ) -> Iterator[tuple[np.ndarray, dict[str, Tensor]]]:
    """Each batch's float32 latents and model keywords, with `model` switched to inference."""
    micro = takes_micro_conditions(model)
    model.set_train(False)
    for batch in batches:
        yield np.asarray(batch["x"], np.float32), batch_model_kwargs(batch, micro)


def batch_model_kwargs(batch: Mapping[str, np.ndarray], micro: bool) -> dict[str, Tensor]:
    """A probe batch's model keywords: caption features with the (B, 1, L, C) axis the models
    take, plus the micro-conditions when the model reads them (STDiT2)."""
    y = np.asarray(batch["y"], np.float32)
    kwargs = {"y": Tensor(y[:, None] if y.ndim == 3 else y), "mask": Tensor(batch["mask"])}
    if micro:
        kwargs.update({k: Tensor(np.asarray(batch[k], np.float32)) for k in MICRO_CONDITIONS})
    return kwargs


def temporal_probe(model: object, diffusion: object, batches: Iterable[Mapping[str, np.ndarray]],
                   timesteps: Sequence[int] = (100, 300, 500, 700),
                   seed: int = 0) -> ProbeResult:
    """Mean eps MSE of `model` on every variant of every batch at each timestep.

    `batches` are `VideoCaptionDataset` batches (x latents, y / mask caption features and, for
    STDiT2, the micro-conditions); multi-frame batches only, since a still has no arrow.
    """
    timesteps = probe_timesteps(diffusion, timesteps)
    rng = np.random.default_rng(seed)
    sums = {v: np.zeros(len(timesteps)) for v in VARIANTS}
    clips = 0
    for x, kwargs in probe_inputs(model, batches):
        variants = clip_variants(x, rng)
        for i, t in enumerate(timesteps):
            noise = Tensor(rng.standard_normal(x.shape).astype(np.float32))
            t_batch = Tensor(np.full(len(x), t, np.int32))
            for name, clip in variants.items():
                out = diffusion.training_losses(model, Tensor(clip), t_batch, kwargs, noise)
                sums[name][i] += float(out["mse"].sum().asnumpy())
        clips += len(x)
    if clips == 0:
        raise ValueError("temporal_probe got no batches")
    return ProbeResult(timesteps, {v: s / clips for v, s in sums.items()}, clips)


def main() -> None:
    """The probe on the committed tiny weights and the first training clips; writes
    temporal_probe.json beside this file."""
    configure()
    preset, model, vae, text_encoder = committed_tiny()
    batches = training_batches(preset, vae, text_encoder, count=3)
    diffusion = IDDPM(noise_schedule=preset.noise_schedule)
    result = temporal_probe(model, diffusion, batches, timesteps=(100, 300, 500, 700))
    print(result.table())
    record = {"model": str(preset.model_path), "clips": result.clips,
              "timesteps": list(result.timesteps),
              "losses": {k: v.tolist() for k, v in result.losses.items()},
              "arrow_gap": result.arrow_gap().tolist()}
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
