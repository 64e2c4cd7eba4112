"""Give each rank its share of every global batch.

All ranks build the same batch plan (it is a function of the seed), and rank r takes
elements r, r + W, r + 2W, ... of each global batch. The union over ranks of one step's
inputs is then exactly the single-process batch, which is what makes "W workers with batch B"
and "one process with batch W*B" compute the same mean gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _check(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def shard_indices(items: int | Sequence[T], rank: int, world_size: int,
                  drop_remainder: bool = True) -> list[int] | list[T]:
    """This rank's strided share of `range(items)` (an int) or of a sequence.

    With `drop_remainder` the tail that does not divide evenly is dropped, so every rank gets
    the same number of elements (ranks must run the same number of steps, or the collective
    calls of the longer ones wait forever).
    """
    _check(rank, world_size)
    seq = list(range(items)) if isinstance(items, int) else list(items)
    if drop_remainder:
        seq = seq[: len(seq) - len(seq) % world_size]
    return seq[rank::world_size]


def shard_batch(batch_indices: Sequence[T], rank: int, world_size: int) -> tuple[T, ...]:
    """This rank's part of one global batch; the batch must split evenly."""
    _check(rank, world_size)
    if len(batch_indices) % world_size:
        raise ValueError(
            f"a global batch of {len(batch_indices)} samples cannot be split over "
            f"{world_size} workers; make the batch size a multiple of the number of workers")
    return tuple(batch_indices[rank::world_size])


def shard_plan(plan: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Split every step of a batch plan (dataclasses with an `indices` field, such as
    `opensora.data.dataset.BatchSpec`) so that this rank loads only its part."""
    return [dataclasses.replace(spec, indices=shard_batch(spec.indices, rank, world_size))
            for spec in plan]


def dataset_shard_kwargs(rank: int, world_size: int) -> dict[str, int]:
    """Keyword arguments for `mindspore.dataset` sources (`num_shards`, `shard_id`) when a
    dataset is sharded per sample instead of per global batch."""
    _check(rank, world_size)
    return {"num_shards": world_size, "shard_id": rank} if world_size > 1 else {}
