"""A model's forward pass compiled once with `mindspore.jit`, for loops that call it many times.

Sampling calls the denoiser at every step with the same shapes, which is where graph mode pays:
on this CPU the tiny preset samples ~3.5x faster per step, after a compilation of a few seconds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import mindspore as ms

_ATTRIBUTE = "_opensora_compiled_forward"


def compiled_forward(model: Any) -> Callable[..., Any]:
    """`model`'s forward pass under `mindspore.jit`, called like the model.

    Keywords are put in the order of the model's `construct`, because a compiled function takes
    a fixed positional signature; each new set of input shapes (or of inputs left as None)
    compiles once. The compiled function is kept on the model, so later calls (the next
    evaluation, the next preview) reuse its graphs. Weights are read at call time: training the
    model between calls is seen by the compiled forward.
    """
    cached = getattr(model, _ATTRIBUTE, None)
    if cached is not None:
        return cached
    names = list(inspect.signature(model.construct).parameters)

    @ms.jit
    def forward(*args: Any) -> Any:
        return model(*args)

    def call(*args: Any, **kwargs: Any) -> Any:
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"{type(model).__name__} takes no argument(s) {sorted(unknown)}")
        values = list(args) + [kwargs.get(name) for name in names[len(args):]]
        while values and values[-1] is None:
            values.pop()
        return forward(*values)

    object.__setattr__(model, _ATTRIBUTE, call)
    return call
