"""Optimizer parallel (ZeRO stage 1): each rank keeps optimizer state for a share of the
parameters only.

Plain data parallel repeats the same AdamW update on every rank, with two fp32 moments per
parameter on every rank: for a 700M-parameter model that is 5.6 GB of state per device.
Here rank r owns a subset of the parameters (balanced by size), keeps moments only for
those, updates them from the already averaged gradients, and broadcasts them to the others.
Every rank ends the step with the same parameters as plain data parallel, and the state
memory per rank drops by the number of ranks.

MindSpore's own `enable_parallel_optimizer` does this inside compiled graphs, but in
DATA_PARALLEL mode only on Ascend; this class gives the same split on every backend using
MindSpore's Broadcast collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from opensora.parallel.comm import broadcast_flat
from opensora.parallel.context import ParallelInfo, get_parallel_info


def partition_parameters(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least loaded rank.

    Deterministic (ties go to the lower index / rank), so every rank computes the same map.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(sizes) < world_size:
        raise ValueError(f"cannot shard {len(sizes)} parameters over {world_size} ranks: every "
                         "rank must own at least one; use fewer workers or no optimizer parallel")
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda j: (-int(sizes[j]), j)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += int(sizes[i])
    return owner


class ShardedOptimizer(nn.Cell):
    """Wrap an optimizer factory so that each rank updates only the parameters it owns.

    `make_optimizer` is called once with this rank's parameters, e.g.
    `lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-4, weight_decay=0.0)`.

    Call it like an optimizer with the full tuple of (already averaged) gradients, in the
    order of `parameters`.
    """

    def __init__(self, parameters: Sequence[ms.Parameter],
                 make_optimizer: Callable[[list[ms.Parameter]], nn.Cell],
                 info: ParallelInfo | None = None):
        super().__init__(auto_prefix=False)
        info = info or get_parallel_info()
        self.info = info
        params = list(parameters)
        self.parameters = tuple(params)
        self.owner = partition_parameters([p.size for p in params], info.world_size)
        self.owned = tuple(i for i, r in enumerate(self.owner) if r == info.rank)
        self.groups = tuple(tuple(i for i, r in enumerate(self.owner) if r == root)
                            for root in range(info.world_size))
        self.inner = make_optimizer([params[i] for i in self.owned])

    def state_size(self) -> int:
        """Number of optimizer-state elements held on this rank (moments etc.)."""
        own = {id(p) for p in self.parameters}
        return sum(p.size for p in self.inner.get_parameters()
                   if id(p) not in own and p.size > 1)

    def _state_by_parameter(self) -> tuple[list[str], dict[str, ms.Parameter]]:
        """Per-parameter state prefixes (e.g. adam_m, adam_v) and the shared entries."""
        own = {id(p) for p in self.parameters}
        owned_names = {self.parameters[i].name for i in self.owned}
        prefixes, shared = set(), {}
        for p in self.inner.get_parameters():
            if id(p) in own:
                continue
            head, _, tail = p.name.partition(".")
            if tail in owned_names:
                prefixes.add(head)
            else:
                shared[p.name] = p
        return sorted(prefixes), shared

    def gather_state(self) -> dict[str, np.ndarray]:
        """The full optimizer state, as the unsharded optimizer names it (`adam_m.<param>`),
        assembled on every rank. A collective call: every rank must make it (e.g. before
        rank 0 writes a checkpoint), so that a checkpoint does not depend on the world size."""
        prefixes, shared = self._state_by_parameter()
        inner = {p.name: p for p in self.inner.get_parameters()}
        state = {name: p.asnumpy() for name, p in shared.items()}
        for root in range(self.info.world_size):
            group = self.groups[root]
            names = [f"{prefix}.{self.parameters[i].name}" for prefix in prefixes for i in group]
            if root == self.info.rank:
                tensors = [inner[n].value() for n in names]
            else:
                tensors = [ops.zeros(self.parameters[i].shape, self.parameters[i].dtype)
                           for _ in prefixes for i in group]
            values = broadcast_flat(tensors, root) if self.info.world_size > 1 else tensors
            state.update({n: v.asnumpy() for n, v in zip(names, values)})
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Take this rank's share of a full optimizer state (from `gather_state` or from an
        unsharded run's checkpoint)."""
        prefixes, shared = self._state_by_parameter()
        inner = {p.name: p for p in self.inner.get_parameters()}
        wanted = list(shared) + [f"{prefix}.{self.parameters[i].name}"
                                 for prefix in prefixes for i in self.owned]
        missing = [n for n in wanted if n not in state]
        if missing:
            raise KeyError(f"optimizer state lacks {len(missing)} entries: {missing[:5]}")
        for name in wanted:
            param = inner[name]
            param.set_data(ms.Tensor(np.asarray(state[name]).reshape(param.shape),
                                     dtype=param.dtype))

    def construct(self, gradients):
        owned = tuple(gradients[i] for i in self.owned)
        self.inner(owned)
        if self.info.world_size > 1:
            for root in range(self.info.world_size):
                group = self.groups[root]
                values = broadcast_flat([self.parameters[i].value() for i in group], root)
                for i, value in zip(group, values):
                    ops.assign(self.parameters[i], value)
        return True


def build_optimizer(parameters: Sequence[ms.Parameter],
                    make_optimizer: Callable[[list[ms.Parameter]], nn.Cell],
                    info: ParallelInfo | None = None) -> nn.Cell:
    """The optimizer a training loop should use under `info`: sharded when optimizer parallel
    is on (and not left to MindSpore's native Ascend implementation), plain otherwise."""
    info = info or get_parallel_info()
    if info.optimizer_parallel and info.distributed and not info.native_optimizer_parallel:
        return ShardedOptimizer(parameters, make_optimizer, info)
    return make_optimizer(list(parameters))
