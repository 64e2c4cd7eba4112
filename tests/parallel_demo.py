"""A small model trained with data parallel: the worker of the equivalence and launcher tests.

`python tests/parallel_demo.py --steps 5 --global-batch 8 --out r.npz` trains a small MLP
with AdamW on a fixed synthetic regression task. Run alone it uses the whole global batch;
under msrun each of W workers takes its 1/W share of every global batch, averages gradients
with AllReduce and (with --optimizer-parallel) shards the AdamW state. The final parameters
must match to float tolerance: that is the proof the parallel path computes the same thing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from opensora.checkpoint import save_npz_atomic
from opensora.models.ops import gelu_tanh
from opensora.parallel.comm import (
    all_reduce_mean,
    broadcast_parameters,
    gather_step_times,
    gradient_reducer,
)
from opensora.parallel.context import ParallelInfo, init_parallel
from opensora.parallel.data import shard_batch
from opensora.parallel.optimizer import build_optimizer
from opensora.parallel.rank_zero import rank_zero_only
from opensora.runtime import configure


class TinyMLP(nn.Cell):
    """Two hidden layers; enough parameters (6 tensors) to shard over several ranks."""

    def __init__(self, in_dim: int = 16, hidden: int = 64, out_dim: int = 8):
        super().__init__()
        self.fc1 = nn.Dense(in_dim, hidden)
        self.fc2 = nn.Dense(hidden, hidden)
        self.fc3 = nn.Dense(hidden, out_dim)

    def construct(self, x):
        return self.fc3(gelu_tanh(self.fc2(gelu_tanh(self.fc1(x)))))


def synthetic_batch(step: int, global_batch: int, in_dim: int = 16, out_dim: int = 8,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Global batch `step`, identical in every process (a function of seed and step)."""
    rng = np.random.default_rng([seed, step])
    x = rng.standard_normal((global_batch, in_dim)).astype(np.float32)
    w = np.random.default_rng([seed]).standard_normal((in_dim, out_dim)).astype(np.float32)
    return x, np.sin(x @ w).astype(np.float32)


@dataclass
class DemoResult:
    params: dict[str, np.ndarray]
    losses: list[float]  # global-batch loss per step (mean over ranks)
    step_times: np.ndarray  # (steps, world_size) seconds
    state_elements: int  # optimizer-state elements held by this rank
    optimizer_state: dict[str, np.ndarray]  # full state, gathered from every rank


def train_demo(info: ParallelInfo, steps: int, global_batch: int, lr: float = 1e-2,
               optimizer_parallel: bool = False, seed: int = 0,
               hidden: int = 64) -> DemoResult:
    """Train TinyMLP for `steps` global batches with this rank's share of each."""
    net = TinyMLP(hidden=hidden)
    params = net.trainable_params()
    rng = np.random.default_rng([seed, 7])  # the same start in every process, any mode
    for p in params:
        p.set_data(ms.Tensor((rng.standard_normal(p.shape) * 0.3).astype(np.float32)))
    broadcast_parameters(params, root=0, info=info)  # what a real run does after loading
    run_info = ParallelInfo(info.rank, info.world_size, optimizer_parallel,
                            info.native_optimizer_parallel)
    optimizer = build_optimizer(
        params, lambda ps: nn.AdamWeightDecay(ps, learning_rate=lr, weight_decay=0.01),
        run_info)
    reducer = gradient_reducer(params, info)

    def loss_fn(x, y):
        return ops.mean((net(x) - y) ** 2)

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    losses, times = [], []
    for step in range(steps):
        x, y = synthetic_batch(step, global_batch, seed=seed)
        mine = list(shard_batch(range(global_batch), info.rank, info.world_size))
        start = time.perf_counter()
        loss, grads = grad_fn(ms.Tensor(x[mine]), ms.Tensor(y[mine]))
        optimizer(reducer(grads))
        times.append(gather_step_times(time.perf_counter() - start, info))
        losses.append(all_reduce_mean(float(loss.asnumpy()), info))
    state = (optimizer.state_size() if hasattr(optimizer, "state_size")
             else sum(p.size for p in optimizer.get_parameters()
                      if p.size > 1 and all(p is not q for q in params)))
    if hasattr(optimizer, "gather_state"):
        full_state = optimizer.gather_state()
    else:
        full_state = {p.name: p.asnumpy() for p in optimizer.get_parameters()
                      if all(p is not q for q in params)}
    return DemoResult({p.name: p.asnumpy() for p in params}, losses, np.stack(times), state,
                      full_state)


@rank_zero_only
def _save(path: str, results: dict[str, DemoResult], info: ParallelInfo) -> None:
    arrays: dict[str, np.ndarray] = {"world_size": np.int64(info.world_size)}
    for variant, res in results.items():
        arrays.update({f"{variant}/param/{k}": v for k, v in res.params.items()})
        arrays[f"{variant}/losses"] = np.asarray(res.losses, np.float32)
        arrays[f"{variant}/step_times"] = res.step_times
        arrays[f"{variant}/state_elements"] = np.int64(res.state_elements)
        arrays.update({f"{variant}/state/{k}": v for k, v in res.optimizer_state.items()})
    save_npz_atomic(path, **arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--variants", default="plain",
                        help="comma list of plain (data parallel) and sharded (+ optimizer "
                             "parallel); each trains a fresh model from the same seed")
    parser.add_argument("--fail-on-rank", type=int, default=-1,
                        help="raise on this rank after init (tests the launcher)")
    parser.add_argument("--hang-on-rank", type=int, default=-1,
                        help="sleep forever on this rank after init (tests the timeout)")
    parser.add_argument("--out", required=True, help=".npz written by rank 0")
    args = parser.parse_args(argv)
    configure()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"plain", "sharded"}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; use plain and/or sharded")
    info = init_parallel(optimizer_parallel="sharded" in variants)
    if info.rank == args.fail_on_rank:
        raise RuntimeError(f"deliberate failure on rank {info.rank} (--fail-on-rank)")
    if info.rank == args.hang_on_rank:
        while True:  # the other ranks block in their first collective call
            time.sleep(1)
    results = {}
    for variant in variants:
        results[variant] = train_demo(info, args.steps, args.global_batch,
                                      optimizer_parallel=variant == "sharded",
                                      hidden=args.hidden)
        res = results[variant]
        print(f"[{variant}] rank {info.rank}/{info.world_size} losses "
              + " ".join(f"{v:.5f}" for v in res.losses)
              + f" | median step {np.median(res.step_times[:, info.rank]) * 1e3:.2f} ms"
              + f" | optimizer state {res.state_elements} elements", flush=True)
    _save(args.out, results, info)


if __name__ == "__main__":
    main()
