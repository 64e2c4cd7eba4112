"""The training command line: the same loop alone or on N workers (`python -m opensora.train`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from opensora.data.dataset import VideoCaptionDataset
from opensora.parallel.context import init_parallel
from opensora.presets import DATA_SAMPLES, build_model, get_preset, preset_scaling_factor
from opensora.runtime import configure
from opensora.schedulers.iddpm import IDDPM
from opensora.train.step import MODES, TrainStep, seed_everything
from opensora.train.trainer import Trainer


def main(argv: Sequence[str] | None = None) -> int:
    """Train a preset's transformer from cached latents and T5 features.

        python -m opensora.train --preset tiny --latent-folder C/latents --text-folder C/t5 \\
            --steps 100 --output-dir runs/train
        python -m opensora.parallel.launch --workers 2 -- -m opensora.train ... \\
            [--optimizer-parallel]

    `--batch-size` is the global batch; under msrun each of W workers takes batch / W of it.
    """
    parser = argparse.ArgumentParser(prog="python -m opensora.train",
                                     description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--csv", default=str(DATA_SAMPLES / "video_caption.csv"))
    parser.add_argument("--latent-folder", required=True, help="opensora.data.latent_cache output")
    parser.add_argument("--text-folder", required=True, help="opensora.data.text_cache output")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--mode", choices=MODES, default="graph")
    parser.add_argument("--dtype", default="fp32", help="fp32; bf16 / fp16 on Ascend")
    parser.add_argument("--recompute", action="store_true", help="recompute every block")
    parser.add_argument("--attn-backend", default=None, help="math | chunked | flash")
    parser.add_argument("--optimizer-parallel", action="store_true",
                        help="shard the AdamW state over the workers")
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.ckpt_every < 1:
        parser.error(f"--ckpt-every must be at least 1, got {args.ckpt_every}")
    configure()

    info = init_parallel(optimizer_parallel=args.optimizer_parallel)
    if args.batch_size % info.world_size:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the "
                     f"{info.world_size} workers")
    preset = get_preset(args.preset)
    seed_everything(args.seed)
    overrides = {"attn_backend": args.attn_backend} if args.attn_backend else {}
    model = build_model(preset.with_paths(model_path=None), **overrides)
    dataset = VideoCaptionDataset(
        args.csv, num_frames=preset.num_frames, frame_interval=preset.frame_interval,
        image_size=preset.image_size, batch_size=args.batch_size,
        latent_folder=args.latent_folder, text_folder=args.text_folder, seed=args.seed,
        latent_scaling_factor=preset_scaling_factor(preset), warn=info.is_main)
    step = TrainStep(model, IDDPM(noise_schedule=preset.noise_schedule), lr=args.lr,
                     grad_clip=args.grad_clip, ema_decay=args.ema_decay, mode=args.mode,
                     recompute=args.recompute, dtype=args.dtype, parallel=info)
    trainer = Trainer(step, dataset, args.output_dir, seed=args.seed,
                      ckpt_every=args.ckpt_every, num_workers=0)
    began = time.perf_counter()
    history = trainer.fit(args.steps, resume=not args.no_resume)
    if info.is_main:
        done = len(history.records)
        print(f"rank 0 of {info.world_size}: {done} steps in {time.perf_counter() - began:.1f} s"
              f" ({history.steps_per_second():.3f} steps/s after the first); final loss "
              f"{history.losses[-1] if done else float('nan'):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
