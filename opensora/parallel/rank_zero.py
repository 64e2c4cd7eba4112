"""Only rank 0 writes: checkpoints, logs, samples, figures.

Every rank holds the same parameters after each data-parallel step, so one copy on disk is
enough, and several processes writing the same file would race.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from opensora.parallel.context import get_parallel_info

P = ParamSpec("P")
R = TypeVar("R")


def is_main_process() -> bool:
    return get_parallel_info().is_main


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Run `fn` on rank 0; return None elsewhere (decided at call time, after init)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


@rank_zero_only
def rank_zero_print(*args: object) -> None:
    print(*args, flush=True)
