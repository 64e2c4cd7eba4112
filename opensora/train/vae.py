"""Train the tiny preset's VAE: a small AutoencoderKL on the frames of `data_samples/` clips.

Open-Sora itself never trains its VAE (it borrows Stable Diffusion's); the tiny preset needs one
that fits a CPU, so this trains the same architecture from scratch: reconstruction (L1 + MSE)
plus a small KL term that keeps the posterior close to N(0, I), so latents have a sane scale for
the diffusion model. Frames are independent images here, exactly as the video wrapper treats
them. Held-out clips measure reconstruction PSNR. The result is a diffusers-layout folder.

Two things make it learn in CPU minutes. The shapes cover ~3% of a frame, so a plain pixel loss
is first minimised by drawing the background alone (about 20 dB PSNR, shapes gone): pixels that
differ from the frame's background get `foreground_weight` times the weight. And the network is
fully convolutional (the mid-block attention takes any size), so it trains on `crop_size` crops
placed around the shape, a quarter of the compute of whole 64x64 frames per sample.

    python -m opensora.train.vae --out data_samples/models/vae_tiny
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from opensora.data.video import read_video
from opensora.models.vae import (
    AutoencoderKL,
    AutoencoderKLConfig,
    make_noise,
    psnr,
    split_moments,
)
from opensora.presets import DATA_SAMPLES
from opensora.runtime import configure


@dataclass
class VAETrainConfig:
    csv: str = str(DATA_SAMPLES / "video_caption.csv")
    eval_csv: str | None = str(DATA_SAMPLES / "heldout_video_caption.csv")
    holdout: int = 4  # clips of `csv` kept for evaluation when eval_csv is absent
    block_out_channels: Sequence[int] = (16, 32, 64, 64)  # 4 levels: 8x down, as the SD VAE
    layers_per_block: int = 1
    norm_num_groups: int = 8
    latent_channels: int = 4
    steps: int = 2500  # held-out PSNR 18.3 dB at 500 steps, 25.0 dB at 2500 (shapes legible)
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-4
    mse_weight: float = 1.0
    seed: int = 0
    log_every: int = 50
    frames_per_clip: int | None = None  # None: every frame of every clip
    # Compiling the step (mindspore.jit or GRAPH_MODE) is 1.9x faster per step on CPU, but with
    # MindSpore 2.10 the compiled VAE step stalls at its 10th call; PyNative is the default.
    jit: bool = False
    crop_size: int | None = 32  # train on crops around the shape (None: whole frames)
    foreground_weight: float = 10.0  # extra loss weight of pixels that are not background


def _clip_paths(csv_path: str | Path) -> list[Path]:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"video csv not found: {csv_path}")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "video" not in rows[0]:
        raise ValueError(f"{csv_path}: needs a header with a 'video' column")
    return [(csv_path.parent / row["video"]).resolve() for row in rows]


def load_frames(paths: Sequence[Path], frames_per_clip: int | None = None) -> np.ndarray:
    """All (or the first `frames_per_clip`) frames of the clips as (N, C, H, W) in [-1, 1]."""
    clips = [read_video(p, frames_per_clip) for p in paths]
    return np.concatenate([c.transpose(1, 0, 2, 3) for c in clips]).astype(np.float32)


def split_clips(config: VAETrainConfig) -> tuple[list[Path], list[Path]]:
    train = _clip_paths(config.csv)
    if config.eval_csv and Path(config.eval_csv).is_file():
        return train, _clip_paths(config.eval_csv)
    if not 0 < config.holdout < len(train):
        raise ValueError(f"holdout={config.holdout} must leave training clips out of {len(train)}")
    return train[: -config.holdout], train[-config.holdout :]


def foreground_mask(frames: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """(N, 1, H, W) float: 1 where a pixel differs from its frame's background (the median
    colour of the border) by more than `threshold` summed over channels ([-1, 1] range)."""
    border = np.concatenate([frames[..., 0, :], frames[..., -1, :], frames[..., :, 0],
                             frames[..., :, -1]], axis=-1)  # (N, C, 4W)
    background = np.median(border, axis=-1)[..., None, None]
    return (np.abs(frames - background).sum(axis=1, keepdims=True) > threshold).astype(
        np.float32)


def crops_around_foreground(frames: np.ndarray, masks: np.ndarray, size: int,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One `size` x `size` crop per frame containing a random foreground pixel (anywhere when
    the frame has none), with the matching mask crop."""
    n, _, h, w = frames.shape
    out, out_masks = [], []
    for frame, mask in zip(frames, masks):
        ys, xs = np.nonzero(mask[0])
        if len(ys):
            pick = rng.integers(len(ys))
            top = int(np.clip(ys[pick] - rng.integers(size), 0, h - size))
            left = int(np.clip(xs[pick] - rng.integers(size), 0, w - size))
        else:
            top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        out.append(frame[:, top:top + size, left:left + size])
        out_masks.append(mask[:, top:top + size, left:left + size])
    return np.stack(out), np.stack(out_masks)


class VAELoss(nn.Cell):
    """Weighted L1 + mse_weight * MSE on pixels (weights 1 + foreground_weight * mask,
    normalised to mean 1), plus kl_weight * KL per latent element."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, mse_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.mse_weight = mse_weight

    def construct(self, x: ms.Tensor, eps: ms.Tensor, weight: ms.Tensor
                  ) -> tuple[ms.Tensor, ms.Tensor]:
        moments = self.vae.encode_moments(x)
        mean, logvar = ops.chunk(moments, 2, axis=1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        z = mean + ops.exp(0.5 * logvar) * eps
        recon = self.vae.decode(z)
        diff = recon - x
        weight = weight / weight.mean()
        rec = (ops.abs(diff) * weight).mean() + self.mse_weight * (diff * diff * weight).mean()
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).mean()
        return rec + self.kl_weight * kl, kl


def evaluate_psnr(vae: AutoencoderKL, frames: np.ndarray, batch_size: int = 32) -> float:
    """Mean per-frame PSNR (dB, [-1, 1] range) reconstructing through the posterior mean."""
    scores = []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        recon = np.clip(vae(ms.Tensor(chunk)).asnumpy(), -1, 1)
        scores.append(psnr(chunk, recon, axis=(1, 2, 3)))
    return float(np.mean(np.concatenate(scores)))


def latent_scaling_factor(vae: AutoencoderKL, frames: np.ndarray, batch_size: int = 32) -> float:
    """1 / std of the posterior means: the diffusers `scaling_factor` that gives the diffusion
    model unit-variance latents (how SD's 0.18215 was chosen for its VAE)."""
    means = [split_moments(vae.encode_moments(ms.Tensor(frames[i : i + batch_size])))[0].asnumpy()
             for i in range(0, len(frames), batch_size)]
    return float(1.0 / np.concatenate(means).std())


def train_vae(config: VAETrainConfig, out: str | Path | None = None,
              log=print) -> tuple[AutoencoderKL, dict]:
    """Train from scratch with Adam; returns the model and a summary (losses, held-out PSNR)."""
    ms.set_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_paths, eval_paths = split_clips(config)
    train_frames = load_frames(train_paths, config.frames_per_clip)
    eval_frames = load_frames(eval_paths, config.frames_per_clip)
    log(f"training on {len(train_frames)} frames of {len(train_paths)} clips, "
        f"evaluating on {len(eval_frames)} frames of {len(eval_paths)} held-out clips")

    n_levels = len(config.block_out_channels)
    vae = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=config.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        latent_channels=config.latent_channels,
        sample_size=int(train_frames.shape[-1]),
    ))
    loss_cell = VAELoss(vae, config.kl_weight, config.mse_weight)
    schedule = nn.cosine_decay_lr(config.lr * 0.05, config.lr, config.steps, 1, config.steps)
    optimizer = nn.Adam(vae.trainable_params(), learning_rate=schedule)
    grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters, has_aux=True)

    def step(x: ms.Tensor, eps: ms.Tensor, weight: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        (loss, kl), grads = grad_fn(x, eps, weight)
        optimizer(grads)
        return loss, kl

    if config.jit:
        step = ms.jit(step)

    train_masks = foreground_mask(train_frames)
    side = config.crop_size or train_frames.shape[-1]
    latent_hw = [side // vae.downsample_factor] * 2
    history: list[dict] = []
    started = time.perf_counter()
    running = []
    for it in range(1, config.steps + 1):
        picks = rng.integers(0, len(train_frames), config.batch_size)
        batch, masks = train_frames[picks], train_masks[picks]
        if config.crop_size:
            batch, masks = crops_around_foreground(batch, masks, config.crop_size, rng)
        if rng.random() < 0.5:  # horizontal flips: free extra variety for moving shapes
            batch, masks = batch[..., ::-1], masks[..., ::-1]
        eps = make_noise((config.batch_size, config.latent_channels, *latent_hw), rng)
        weight = 1.0 + config.foreground_weight * masks
        loss, kl = step(ms.Tensor(np.ascontiguousarray(batch)), ms.Tensor(eps),
                        ms.Tensor(np.ascontiguousarray(weight)))
        running.append((float(loss.asnumpy()), float(kl.asnumpy())))
        if it % config.log_every == 0 or it == config.steps:
            mean_loss, mean_kl = np.mean(running, axis=0)
            running.clear()
            history.append({"step": it, "loss": float(mean_loss), "kl": float(mean_kl),
                            "seconds": round(time.perf_counter() - started, 1)})
            log(f"step {it:5d}  loss {mean_loss:.4f}  kl {mean_kl:.3f}  "
                f"{time.perf_counter() - started:.0f}s")
    vae.set_train(False)
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(config).items()},
        "history": history,
        "train_seconds": round(time.perf_counter() - started, 1),
        "heldout_psnr_db": round(evaluate_psnr(vae, eval_frames), 2),
        "train_psnr_db": round(evaluate_psnr(vae, train_frames[:: max(1, len(train_frames)
                                                                       // 256)]), 2),
        "heldout_clips": [p.name for p in eval_paths],
        "scaling_factor": round(latent_scaling_factor(vae, train_frames), 5),
    }
    vae.config.scaling_factor = summary["scaling_factor"]
    log(f"held-out PSNR {summary['heldout_psnr_db']:.2f} dB "
        f"(train {summary['train_psnr_db']:.2f} dB)")
    if out is not None:
        folder = vae.save_pretrained(out)
        (Path(folder) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"saved {folder}")
    return vae, summary


def parse_args(argv: Sequence[str] | None = None) -> tuple[VAETrainConfig, str]:
    defaults = VAETrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (diffusers layout)")
    parser.add_argument("--csv", default=defaults.csv)
    parser.add_argument("--eval-csv", default=defaults.eval_csv,
                        help="held-out clips for PSNR ('' to hold out --holdout clips of --csv)")
    parser.add_argument("--holdout", type=int, default=defaults.holdout)
    parser.add_argument("--block-out-channels", type=int, nargs="+",
                        default=list(defaults.block_out_channels))
    parser.add_argument("--layers-per-block", type=int, default=defaults.layers_per_block)
    parser.add_argument("--norm-num-groups", type=int, default=defaults.norm_num_groups)
    parser.add_argument("--latent-channels", type=int, default=defaults.latent_channels)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--mse-weight", type=float, default=defaults.mse_weight)
    parser.add_argument("--frames-per-clip", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--jit", action="store_true", help="compile the step (see VAETrainConfig)")
    parser.add_argument("--crop-size", type=int, default=defaults.crop_size,
                        help="crop side for training (0: whole frames)")
    parser.add_argument("--foreground-weight", type=float, default=defaults.foreground_weight)
    args = parser.parse_args(argv)
    config = VAETrainConfig(
        csv=args.csv, eval_csv=args.eval_csv or None, holdout=args.holdout,
        block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
        norm_num_groups=args.norm_num_groups, latent_channels=args.latent_channels,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
        mse_weight=args.mse_weight, seed=args.seed, log_every=args.log_every,
        frames_per_clip=args.frames_per_clip, jit=args.jit,
        crop_size=args.crop_size or None, foreground_weight=args.foreground_weight,
    )
    return config, args.out


def main(argv: Sequence[str] | None = None) -> int:
    config, out = parse_args(argv)
    configure()
    train_vae(config, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
