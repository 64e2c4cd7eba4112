"""The collective calls a data-parallel training loop makes, on MindSpore's own runtime.

Everything here goes through `mindspore.communication` / `mindspore.ops` collectives (HCCL on
Ascend, MindSpore's CPU collective library here), and degrades to the identity in a single
process, so the training loop is the same code in both cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from opensora.parallel.context import ParallelInfo, get_parallel_info


class _KeepGradients(nn.Cell):
    """Single process: the local gradient already is the global one."""

    def construct(self, grads):
        return grads


def gradient_reducer(parameters: Sequence[ms.Parameter],
                     info: ParallelInfo | None = None) -> nn.Cell:
    """Cell mapping local gradients to their mean over all ranks (AllReduce / world_size).

    This is the PyNative form of DATA_PARALLEL with `gradients_mean=True`: MindSpore's
    `nn.DistributedGradReducer`, which fuses the gradients into few AllReduce calls.
    """
    info = info or get_parallel_info()
    if not info.distributed:
        return _KeepGradients()
    return nn.DistributedGradReducer(list(parameters), mean=True, degree=info.world_size)


def broadcast_parameters(parameters: Sequence[ms.Parameter], root: int = 0,
                         info: ParallelInfo | None = None) -> None:
    """Copy rank `root`'s values into every rank's parameters (same start everywhere)."""
    info = info or get_parallel_info()
    if not info.distributed:
        return
    params = list(parameters)
    for param, value in zip(params, broadcast_flat([p.value() for p in params], root)):
        ops.assign(param, value)  # copies: the value is a view into the flat buffer


def broadcast_flat(tensors: Sequence[ms.Tensor], root: int) -> list[ms.Tensor]:
    """Broadcast several tensors from `root` as one flat buffer (one collective call; the
    CPU backend also rejects multi-tensor Broadcast from a non-zero root)."""
    if not tensors:
        return []
    flat = ops.cat([t.reshape(-1) for t in tensors])
    (flat,) = ops.Broadcast(root)((flat,))
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.size].reshape(t.shape))
        start += t.size
    return out


def all_gather_floats(values: Sequence[float] | float,
                      info: ParallelInfo | None = None) -> np.ndarray:
    """Every rank's values, stacked: shape (world_size, len(values)). Same on all ranks."""
    info = info or get_parallel_info()
    local = np.atleast_1d(np.asarray(values, dtype=np.float32))
    if not info.distributed:
        return local[None]
    gathered = ops.AllGather()(ms.Tensor(local)).asnumpy()
    return gathered.reshape(info.world_size, local.size)


def gather_step_times(step_time: float, info: ParallelInfo | None = None) -> np.ndarray:
    """Each rank's time for this step, indexed by rank. The slowest rank sets the pace of
    synchronous data parallelism, so this is what to log, not rank 0's own time."""
    return all_gather_floats(step_time, info)[:, 0]


def all_reduce_mean(value: float, info: ParallelInfo | None = None) -> float:
    """Mean of a scalar (e.g. the loss) over ranks: the loss of the global batch."""
    return float(all_gather_floats(value, info)[:, 0].mean())
