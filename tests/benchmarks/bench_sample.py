"""Seconds per generated clip of the text-to-video pipeline, per stage and per sampling step,
PyNative against graph mode (the denoiser compiled with `mindspore.jit`), in one run.

Each configuration samples `--clips` clips after one warm-up clip; the warm-up's extra time
over a measured clip is reported as `compile_s` (graph compilation, kernel set-up). The
`small` preset has no trained weights: it samples from random ones, which costs the same.

    .venv/bin/python tests/benchmarks/bench_sample.py --presets tiny small --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

from opensora.pipeline import TextToVideoPipeline
from opensora.profiling import format_table
from opensora.runtime import configure

PROMPT = "a red circle moving left on a black background"


def bench(preset: str, mode: str, steps: int, clips: int) -> dict:
    pipe = TextToVideoPipeline.from_preset(preset, num_sampling_steps=steps, mode=mode,
                                           allow_untrained=True)
    timings = []
    for seed in range(clips + 1):
        start = time.perf_counter()
        embeddings = pipe.encode_prompts([PROMPT])
        encoded = time.perf_counter()
        latents = pipe.sample_latents(embeddings, [seed])
        sampled = time.perf_counter()
        pipe.decode(latents)
        timings.append((encoded - start, sampled - encoded, time.perf_counter() - sampled))
    warm, measured = timings[0], timings[1:]
    text_s, sample_s, decode_s = (statistics.median(t[i] for t in measured) for i in range(3))
    return {"preset": preset, "mode": mode, "frames": pipe.num_frames,
            "latent": "x".join(map(str, pipe.latent_shape())), "steps": steps,
            "text_s": text_s, "sample_s": sample_s, "per_step_s": sample_s / steps,
            "decode_s": decode_s, "clip_s": text_s + sample_s + decode_s,
            "compile_s": sum(warm) - (text_s + sample_s + decode_s)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--modes", nargs="+", default=["pynative", "graph"])
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per clip")
    parser.add_argument("--clips", type=int, default=2, help="measured clips per configuration")
    args = parser.parse_args(argv)
    configure()
    rows = [bench(p, m, args.steps, args.clips) for p in args.presets for m in args.modes]
    print(format_table(rows))
    for preset in args.presets:
        by_mode = {r["mode"]: r for r in rows if r["preset"] == preset}
        if {"pynative", "graph"} <= set(by_mode):
            print(f"{preset}: graph mode samples "
                  f"{by_mode['pynative']['per_step_s'] / by_mode['graph']['per_step_s']:.2f}x "
                  "faster per step than PyNative")


if __name__ == "__main__":
    main()
