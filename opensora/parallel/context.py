"""Join the msrun job (or run alone) and describe this process's place in it.

msrun starts one scheduler and N workers and exports `MS_ROLE`, `MS_WORKER_NUM`,
`MS_SCHED_HOST`/`MS_SCHED_PORT` and `RANK_ID` to each. A script that calls `init_parallel()`
therefore runs unchanged with `python script.py` (one process, nothing initialised) and with
`msrun ... script.py` (communication initialised, DATA_PARALLEL with mean gradients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mindspore as ms
from mindspore.communication import get_group_size, get_rank, init

MSRUN_ENV = ("MS_ROLE", "MS_WORKER_NUM", "MS_SCHED_HOST", "MS_SCHED_PORT")


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process stands: what the training loop needs to shard and to log."""

    rank: int = 0
    world_size: int = 1
    optimizer_parallel: bool = False  # shard optimizer state across ranks (ZeRO-1)
    native_optimizer_parallel: bool = False  # MindSpore's own enable_parallel_optimizer

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_STATE: dict[str, ParallelInfo] = {}


def launched_by_msrun(environ: dict[str, str] | None = None) -> bool:
    """True inside a process msrun started: a worker, or the scheduler, which runs the same
    script and must also call `init()` (it serves the cluster there and exits)."""
    env = os.environ if environ is None else environ
    return all(k in env for k in MSRUN_ENV) and env["MS_ROLE"] in ("MS_WORKER", "MS_SCHED")


def init_parallel(optimizer_parallel: bool = False,
                  native_optimizer_parallel: bool = False) -> ParallelInfo:
    """Initialise MindSpore communication if msrun launched us; a no-op alone.

    optimizer_parallel: shard the optimizer state (AdamW moments) across ranks; each rank
        updates the parameters it owns and broadcasts them (`ShardedOptimizer`). Works on
        every backend, CPU included.
    native_optimizer_parallel: instead set MindSpore's `enable_parallel_optimizer`, which
        MindSpore supports in DATA_PARALLEL mode on Ascend only, for `nn.AdamWeightDecay` /
        `nn.Lamb` (it raises on CPU). Then build the optimizer normally.

    Call it first, before building any Cell: MindSpore requires the parallel context to be set
    before parameters are created. Calling it twice returns the first result.
    """
    if "info" in _STATE:
        return _STATE["info"]
    if native_optimizer_parallel and not optimizer_parallel:
        raise ValueError("native_optimizer_parallel=True needs optimizer_parallel=True")
    if not launched_by_msrun():
        info = ParallelInfo(optimizer_parallel=optimizer_parallel)
        _STATE["info"] = info
        return info

    init()  # the scheduler process never returns from here: msrun's own design
    rank, world = get_rank(), get_group_size()
    device = ms.get_context("device_target")
    if native_optimizer_parallel and device != "Ascend":
        raise ValueError(
            f"native_optimizer_parallel needs Ascend (MindSpore implements enable_parallel_"
            f"optimizer in DATA_PARALLEL mode only there); this is {device}. Use "
            "optimizer_parallel=True alone for the portable sharded optimizer.")
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL,
                                 gradients_mean=True, device_num=world,
                                 enable_parallel_optimizer=native_optimizer_parallel)
    info = ParallelInfo(rank, world, optimizer_parallel, native_optimizer_parallel)
    _STATE["info"] = info
    return info


def get_parallel_info() -> ParallelInfo:
    """The info of `init_parallel`, or the single-process default if it was not called."""
    return _STATE.get("info", ParallelInfo())
