"""Frames per second of the video VAE: encode and decode at 256x256, MindSpore (PyNative and
`mindspore.jit`) against diffusers' AutoencoderKL on PyTorch, same weights, same frames, in one
run.

Two sizes: the tiny preset's VAE (its trained weights) and an SD-sized one (the architecture of
stabilityai/sd-vae-ft-ema: channels 128/256/512/512, 2 layers per block, 83.7M parameters;
random weights, which cost the same). The PyTorch side runs in a subprocess with the
interpreter given by `--torch-python` (it needs torch and diffusers; this process never imports
torch), and is skipped without it.

    .venv/bin/python tests/benchmarks/bench_vae.py --torch-python /tmp/torchvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SD_CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 norm_num_groups=32, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4)


def _timed(fn, iters: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up (and compilation for jit)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    return (time.perf_counter() - start) / iters, out


def bench_mindspore(folder: Path, frames: np.ndarray, iters: int) -> dict:
    import mindspore as ms

    from opensora.models.vae import AutoencoderKL
    from opensora.runtime import configure

    configure()

    vae = AutoencoderKL.from_pretrained(folder)
    vae.set_train(False)
    x = ms.Tensor(frames)
    results = {}
    encode = {"pynative": vae.encode_moments, "jit": ms.jit(vae.encode_moments)}
    decode = {"pynative": vae.decode, "jit": ms.jit(vae.decode)}
    for mode in ("pynative", "jit"):
        seconds, moments = _timed(lambda m=mode: encode[m](x).asnumpy(), iters)
        z = ms.Tensor(moments[:, : vae.config.latent_channels])
        dec_seconds, decoded = _timed(lambda m=mode, z=z: decode[m](z).asnumpy(), iters)
        results[mode] = dict(encode_fps=len(frames) / seconds, decode_fps=len(frames) / dec_seconds)
        results[f"{mode}_moments"], results[f"{mode}_decoded"] = moments, decoded
    return results


_TORCH_WORKER = r"""
import json, sys, time
import numpy as np
import torch
from diffusers import AutoencoderKL
folder, inputs, out_path, iters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
x = torch.from_numpy(np.load(inputs))
vae = AutoencoderKL.from_pretrained(folder).eval()
def timed(fn):
    out = fn()
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    return (time.perf_counter() - start) / iters, out
with torch.inference_mode():
    enc_s, moments = timed(lambda: vae.quant_conv(vae.encoder(x)) if vae.quant_conv is not None
                           else vae.encoder(x))
    z = moments[:, : vae.config.latent_channels]
    dec_s, decoded = timed(lambda: vae.decode(z).sample)
np.savez(out_path, moments=moments.numpy(), decoded=decoded.numpy())
print(json.dumps(dict(encode_fps=len(x) / enc_s, decode_fps=len(x) / dec_s,
                      torch=torch.__version__, threads=torch.get_num_threads())))
"""


def bench_torch(python: str, folder: Path, frames: np.ndarray, iters: int, work: Path,
                threads: int) -> dict:
    inputs, out_path = work / "frames.npy", work / "torch_out.npz"
    np.save(inputs, frames)
    proc = subprocess.run([python, "-c", _TORCH_WORKER, str(folder), str(inputs), str(out_path),
                           str(iters), str(threads)], capture_output=True, text=True,
                          env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed ({python}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out_path) as data:
        result["moments"], result["decoded"] = data["moments"], data["decoded"]
    return result


def run(size: str, frames_count: int, resolution: int, iters: int, torch_python: str | None,
        threads: int) -> dict:
    import mindspore as ms

    from opensora.models.vae import AutoencoderKL, AutoencoderKLConfig
    from opensora.presets import get_preset

    rng = np.random.default_rng(0)
    frames = rng.uniform(-1, 1, (frames_count, 3, resolution, resolution)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if size == "tiny":
            folder = get_preset("tiny").vae_path
        else:
            ms.set_seed(0)
            model = AutoencoderKL(AutoencoderKLConfig(**SD_CONFIG, sample_size=resolution))
            folder = model.save_pretrained(work / "vae")
            del model
        ms_result = bench_mindspore(folder, frames, iters)
        row: dict = dict(size=size, frames=frames_count, resolution=resolution,
                         ms_pynative=ms_result["pynative"], ms_jit=ms_result["jit"])
        if torch_python:
            torch_result = bench_torch(torch_python, Path(folder), frames, iters, work, threads)
            row["torch"] = {k: torch_result[k] for k in ("encode_fps", "decode_fps", "threads")}
            row["max_abs_diff_vs_torch"] = {
                "moments": float(np.abs(ms_result["pynative_moments"]
                                        - torch_result["moments"]).max()),
                "decoded": float(np.abs(ms_result["pynative_decoded"]
                                        - torch_result["decoded"]).max())}
            best = {k: max(ms_result["pynative"][k], ms_result["jit"][k])
                    for k in ("encode_fps", "decode_fps")}
            row["ms_best_over_torch"] = {k: round(best[k] / torch_result[k], 2) for k in best}
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", help="interpreter with torch + diffusers")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "sd"], choices=["tiny", "sd"])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (MindSpore uses its default pool)")
    args = parser.parse_args(argv)
    for size in args.sizes:
        row = run(size, args.frames, args.resolution, args.iters, args.torch_python,
                  args.threads)
        print(json.dumps(row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
