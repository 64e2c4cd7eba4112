"""Captions per second of the T5 encoder: MindSpore (PyNative and `mindspore.jit`) against
transformers' T5EncoderModel on PyTorch, same random weights, same token ids, in one run.

Two sizes: the tiny preset's encoder and a t5-v1_1-base-sized one (12 layers, d_model 768,
~110M parameters). Timing covers the encoder forward only (tokenization is the same code on both
sides); captions are padded to `--length` tokens as Open-Sora pads to `model_max_length`.
The PyTorch side runs in a subprocess with the interpreter given by `--torch-python` (it needs
torch and transformers; this process never imports torch), and is skipped without it.

    .venv/bin/python tests/benchmarks/bench_t5.py --torch-python /tmp/torchvenv/bin/python
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

SIZES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                 vocab_size=32128),
}


def make_inputs(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Token ids with varied caption lengths, eos, then padding, like a real batch."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    mask = np.zeros_like(ids)
    for row in range(batch):
        used = int(rng.integers(length // 3, length + 1))
        ids[row, : used - 1] = rng.integers(3, vocab, used - 1)
        ids[row, used - 1] = 1
        mask[row, :used] = 1
    return ids, mask


def _timed(fn, iters: int) -> tuple[float, object]:
    out = fn()  # warm-up (and compilation for graph mode)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    return (time.perf_counter() - start) / iters, out


def bench_mindspore(folder: Path, ids: np.ndarray, mask: np.ndarray, iters: int) -> dict:
    import mindspore as ms

    from opensora.models.t5 import T5EncoderModel
    from opensora.runtime import configure

    configure()

    model = T5EncoderModel.from_pretrained(folder)
    ids_t, mask_t = ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32))
    results = {}
    for mode, fn in (("pynative", model), ("jit", ms.jit(model.construct))):
        seconds, out = _timed(lambda fn=fn: fn(ids_t, mask_t).asnumpy(), iters)
        results[mode] = dict(seconds_per_batch=seconds, captions_per_s=len(ids) / seconds)
        results[f"{mode}_out"] = out
    return results


_TORCH_WORKER = r"""
import json, sys, time
import numpy as np
import torch
from transformers import T5EncoderModel
folder, inputs, out_path, iters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]))
data = np.load(inputs)
ids, mask = torch.from_numpy(data["ids"]), torch.from_numpy(data["mask"])
model = T5EncoderModel.from_pretrained(folder).eval()
with torch.inference_mode():
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    start = time.perf_counter()
    for _ in range(iters):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    seconds = (time.perf_counter() - start) / iters
np.save(out_path, out.numpy())
print(json.dumps(dict(seconds_per_batch=seconds, captions_per_s=len(ids) / seconds,
                      torch=torch.__version__, threads=torch.get_num_threads())))
"""


def bench_torch(python: str, folder: Path, ids: np.ndarray, mask: np.ndarray, iters: int,
                work: Path, threads: int) -> dict:
    inputs, out_path = work / "inputs.npz", work / "torch_out.npy"
    np.savez(inputs, ids=ids, mask=mask)
    # an explicit env: MindSpore's runtime changes the C-level environment (torch then sees one
    # OpenMP thread), while os.environ still holds what the user started us with
    proc = subprocess.run([python, "-c", _TORCH_WORKER, str(folder), str(inputs), str(out_path),
                           str(iters), str(threads)], capture_output=True, text=True,
                          env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed ({python}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out"] = np.load(out_path)
    return result


def run(size: str, batch: int, length: int, iters: int, torch_python: str | None,
        threads: int) -> dict:
    from opensora.models.t5 import T5Config, T5EncoderModel, init_t5_weights
    from opensora.presets import get_preset

    spec = dict(SIZES[size])
    if "vocab_size" not in spec:
        tiny_config = get_preset("tiny").t5_path / "config.json"
        spec["vocab_size"] = T5Config.from_json(tiny_config).vocab_size
    config = T5Config(**spec)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = T5EncoderModel(config)
        model.load_state_dict(init_t5_weights(config, seed=0))
        folder = model.save_pretrained(work / "t5")
        params = sum(int(p.size) for p in model.get_parameters())
        del model
        ids, mask = make_inputs(batch, length, config.vocab_size)
        row: dict = dict(size=size, batch=batch, length=length, params=params)
        ms_result = bench_mindspore(folder, ids, mask, iters)
        row["mindspore_pynative"] = ms_result["pynative"]["captions_per_s"]
        row["mindspore_jit"] = ms_result["jit"]["captions_per_s"]
        if torch_python:
            torch_result = bench_torch(torch_python, folder, ids, mask, iters, work, threads)
            row["torch"] = torch_result["captions_per_s"]
            row["torch_threads"] = torch_result["threads"]
            diff = np.abs(ms_result["pynative_out"] - torch_result["out"])
            row["max_abs_diff_vs_torch"] = float(diff.max())
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", help="interpreter with torch + transformers")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--tiny-length", type=int, default=16)
    parser.add_argument("--base-length", type=int, default=120)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch intra-op threads (MindSpore uses its default pool)")
    args = parser.parse_args(argv)
    for size in args.sizes:
        length = args.tiny_length if size == "tiny" else args.base_length
        row = run(size, args.batch, length, args.iters, args.torch_python, args.threads)
        print(json.dumps(row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
