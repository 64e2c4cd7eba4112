"""Training speed: steps/s and clips/s of a preset's STDiT2 step, PyNative vs graph, at one or
more batch sizes, and data loading alone (is the step waiting on data?).

    .venv/bin/python tests/benchmarks/bench_train.py [--modes pynative graph] [--steps 10]
    .venv/bin/python tests/benchmarks/bench_train.py --modes graph --batch 8 16 32 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from opensora.models.stdit2 import STDiT2
from opensora.presets import get_preset
from opensora.runtime import configure
from opensora.schedulers.iddpm import IDDPM
from opensora.train import TrainStep, micro_condition_arrays, seed_everything


def bench_step(model_kwargs: dict, batch: int, latent: tuple[int, int, int, int], mode: str,
               steps: int, caption_len: int, warmup: int = 3) -> tuple[float, float]:
    """(first-step seconds incl. compilation, steady steps per second after `warmup` more
    untimed steps: graph mode's first steps after compiling still run slow)."""
    seed_everything(0)
    model = STDiT2(**model_kwargs)
    step = TrainStep(model, IDDPM(), lr=1e-4, mode=mode)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *latent)).astype(np.float32)
    y = rng.standard_normal((batch, caption_len, model_kwargs["caption_channels"]))
    mask = np.ones((batch, caption_len), np.int32)
    micro = micro_condition_arrays(batch, latent[1], (latent[2] * 8, latent[3] * 8), 8)
    began = time.perf_counter()
    step(x, y.astype(np.float32), mask, rng, **micro)
    first = time.perf_counter() - began
    for _ in range(warmup):
        step(x, y.astype(np.float32), mask, rng, **micro)
    began = time.perf_counter()
    for _ in range(steps):
        step(x, y.astype(np.float32), mask, rng, **micro)
    return first, steps / (time.perf_counter() - began)


def bench_data(csv_path: str, batch: int, num_frames: int, size: tuple[int, int], steps: int,
               latent_folder: str | None, text_folder: str | None) -> float:
    from opensora.data.dataset import VideoCaptionDataset

    data = VideoCaptionDataset(csv_path, num_frames=num_frames, image_size=size,
                               batch_size=batch, latent_folder=latent_folder,
                               text_folder=text_folder)
    began = time.perf_counter()
    for _ in data.batches(0, steps):
        pass
    return steps / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--modes", nargs="+", default=["pynative", "graph"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes to time")
    parser.add_argument("--latent-folder")
    parser.add_argument("--text-folder")
    args = parser.parse_args()
    configure()
    preset = get_preset(args.preset)
    h, w = preset.image_size
    latent = (preset.model["in_channels"], preset.num_frames, h // 8, w // 8)
    for mode in args.modes:
        for batch in args.batch:
            first, rate = bench_step(preset.model, batch, latent, mode, args.steps,
                                     preset.model_max_length, args.warmup)
            print(f"{preset.name} {mode:8s} batch {batch:3d} latent {latent}: first step "
                  f"{first:.1f} s, {rate:.2f} steps/s, {rate * batch:.1f} clips/s", flush=True)
    csv_path = str(preset.tokenizer_path.parent / "video_caption.csv")
    rate = bench_data(csv_path, args.batch[0], preset.num_frames, preset.image_size, args.steps,
                      args.latent_folder, args.text_folder)
    source = "cached latents" if args.latent_folder else "decoded videos"
    print(f"data alone ({source}): {rate:.2f} batches/s")


if __name__ == "__main__":
    main()
