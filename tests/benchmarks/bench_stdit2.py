"""Time STDiT2 forward and forward+backward steps, PyNative vs graph mode (mindspore.jit), and
compare the achieved GFLOP/s with this machine's float32 matmul peak measured in the same run.

    .venv/bin/python tests/benchmarks/bench_stdit2.py                 # `small` preset
    .venv/bin/python tests/benchmarks/bench_stdit2.py --preset tiny --steps 3

FLOPs are counted analytically by `opensora.models.shapes.stdit2_flops` (2 per multiply-add of
every matmul); a backward pass is counted as twice the forward.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import mindspore as ms
import numpy as np
from mindspore import ops

from opensora.models.shapes import stdit2_flops
from opensora.presets import build_model, get_preset
from opensora.runtime import configure


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of a float32 size x size matmul through MindSpore."""
    a = ms.Tensor(np.random.default_rng(0).standard_normal((size, size)).astype(np.float32))
    b = ms.Tensor(np.random.default_rng(1).standard_normal((size, size)).astype(np.float32))
    ops.matmul(a, b).asnumpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ops.matmul(a, b).asnumpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def time_calls(fn: Callable[[], object], steps: int) -> tuple[float, float]:
    """(first call seconds (includes compilation), median of the next `steps` calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def vae_downsampling(vae_folder) -> int:
    """Spatial factor of a diffusers VAE folder: 2 per block after the first."""
    config = json.loads((vae_folder / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=None, help="latent frames (preset's)")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="latent H = W (default: the preset's image through its VAE)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    configure()

    preset = get_preset(args.preset)
    frames = args.frames or preset.num_frames
    side = args.latent_size or preset.image_size[0] // vae_downsampling(preset.vae_path)
    model = build_model(preset, attn_backend=args.backend)
    model.set_train(True)
    model.y_embedder.uncond_prob = 0.0
    cfg = model.config
    rng = np.random.default_rng(0)
    batch = args.batch
    x = ms.Tensor(rng.standard_normal((batch, cfg["in_channels"], frames, side, side))
                  .astype(np.float32))
    timestep = ms.Tensor(rng.integers(0, 1000, batch))
    y = ms.Tensor(rng.standard_normal((batch, 1, cfg["model_max_length"],
                                       cfg["caption_channels"])).astype(np.float32))
    mask = ms.Tensor(np.ones((batch, cfg["model_max_length"]), np.int64))
    micro = {k: ms.Tensor(np.full(batch, v, np.float32)) for k, v in dict(
        num_frames=frames, height=preset.image_size[0], width=preset.image_size[1], ar=1.0,
        fps=preset.fps).items()}
    params = model.trainable_params()

    def forward(x, timestep, y, mask):
        return model(x, timestep, y, mask, None, **micro)

    def loss_fn(x, timestep, y, mask):
        return (forward(x, timestep, y, mask) ** 2).mean()

    train_step = ms.value_and_grad(loss_fn, None, params)
    variants = {
        "forward/pynative": forward,
        "forward/graph": ms.jit(forward),
        "forward+backward/pynative": train_step,
        "forward+backward/graph": ms.jit(train_step),
    }
    peak = matmul_peak_gflops()
    fwd_flops = float(sum(stdit2_flops(cfg, (frames, side, side), batch).values()))
    results = {"preset": preset.name, "batch": batch, "latent": [frames, side, side],
               "parameters": sum(int(np.prod(p.shape)) for p in params),
               "forward_gflop": fwd_flops / 1e9, "matmul_peak_gflops": peak, "runs": {}}
    print(f"preset {preset.name}: latent {batch}x{cfg['in_channels']}x{frames}x{side}x{side}, "
          f"{results['parameters'] / 1e6:.1f}M parameters, {fwd_flops / 1e9:.1f} GFLOP forward; "
          f"matmul peak {peak:.1f} GFLOP/s")

    def run(fn: Callable) -> object:
        out = fn(x, timestep, y, mask)
        first = out[0] if isinstance(out, tuple) else out
        return first.asnumpy()

    for name, fn in variants.items():
        first, median = time_calls(lambda fn=fn: run(fn), args.steps)
        flops = fwd_flops * (3 if "backward" in name else 1)
        gflops = flops / median / 1e9
        results["runs"][name] = {"first_call_s": first, "step_s": median, "gflops": gflops,
                                 "fraction_of_peak": gflops / peak}
        print(f"{name:28s} step {median:7.3f} s  (first call {first:6.2f} s)  "
              f"{gflops:7.1f} GFLOP/s = {100 * gflops / peak:4.1f}% of matmul peak")
    for kind in ("forward", "forward+backward"):
        speedup = (results["runs"][f"{kind}/pynative"]["step_s"]
                   / results["runs"][f"{kind}/graph"]["step_s"])
        results[f"{kind}_graph_speedup"] = speedup
        print(f"{kind}: graph mode is {speedup:.2f}x PyNative")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
