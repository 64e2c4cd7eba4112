"""Data parallel and optimizer parallel training on MindSpore's distributed runtime (msrun).

Typical use in a training script, which then runs unchanged alone or under
`python -m opensora.parallel.launch --workers N -- script.py ...`:

    info = init_parallel(optimizer_parallel=False)      # first, before building Cells
    plan = shard_plan(dataset.plan(0, steps), info.rank, info.world_size)
    reducer = gradient_reducer(params, info)             # mean gradient over ranks
    optimizer = build_optimizer(params, make_adamw, info)
    ...
    optimizer(reducer(grads))
    times = gather_step_times(step_seconds, info)         # per-rank step times
    rank_zero_only(save_checkpoint)(...)
"""

from opensora.parallel.comm import (
    all_gather_floats,
    all_reduce_mean,
    broadcast_parameters,
    gather_step_times,
    gradient_reducer,
)
from opensora.parallel.context import (
    ParallelInfo,
    get_parallel_info,
    init_parallel,
    launched_by_msrun,
)
from opensora.parallel.data import dataset_shard_kwargs, shard_batch, shard_indices, shard_plan
from opensora.parallel.optimizer import ShardedOptimizer, build_optimizer, partition_parameters
from opensora.parallel.rank_zero import is_main_process, rank_zero_only, rank_zero_print

__all__ = [
    "ParallelInfo", "ShardedOptimizer", "all_gather_floats", "all_reduce_mean",
    "broadcast_parameters", "build_optimizer", "dataset_shard_kwargs", "gather_step_times",
    "get_parallel_info", "gradient_reducer", "init_parallel", "is_main_process",
    "launched_by_msrun", "partition_parameters", "rank_zero_only", "rank_zero_print",
    "shard_batch", "shard_indices", "shard_plan",
]
