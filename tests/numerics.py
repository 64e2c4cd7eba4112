"""Float32 tolerances that follow from the arithmetic, not from one machine's rounding.

Two float32 computations of the same value (another CPU, another thread count, graph mode
against PyNative, MindSpore against PyTorch) differ by rounding: each operation may be off by
half an ulp of its result, EPS32 / 2 relative, and the errors add up over the operations. So
the difference grows with the number of operations and with the magnitude of the values, and
a fixed absolute tolerance (atol=1e-5) is either too tight for large values or meaningless for
small ones. A tolerance here is `rounding_steps * EPS32 * magnitude`: `rounding_steps` is a
generous count of the roundings that can accumulate (say 10 for one elementwise op, 1e3 for a
small network), and the magnitude is that of the compared values, max |reference|, or a larger
`scale` where the result is a cancellation of larger intermediates (a difference near zero of
terms of size `scale`). A wrong implementation is off by a fraction of the magnitude itself,
so it still fails by orders of magnitude while rounding_steps * EPS32 stays far below 1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7: float32's relative spacing
TINY32 = float(np.finfo(np.float32).tiny)  # smallest normal float32, the floor of a magnitude


def f32_magnitude(reference: ArrayLike, scale: float = 0.0) -> float:
    """max |reference| (at least `scale` and the smallest normal float32)."""
    values = np.abs(np.asarray(reference, dtype=np.float64))
    return max(float(values.max()) if values.size else 0.0, float(scale), TINY32)


def f32_atol(reference: ArrayLike, rounding_steps: float, scale: float = 0.0) -> float:
    """rounding_steps * EPS32 * max |reference|: the absolute float32 rounding allowance."""
    return float(rounding_steps) * EPS32 * f32_magnitude(reference, scale)


def assert_f32_close(actual: ArrayLike, expected: ArrayLike, rounding_steps: float, *,
                     scale: float = 0.0, err_msg: str = "") -> None:
    """assert_allclose with rtol=0 and atol=f32_atol(expected, rounding_steps, scale)."""
    atol = f32_atol(expected, rounding_steps, scale)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol,
                               err_msg=f"{err_msg} (float32 tolerance {rounding_steps:g} steps "
                                       f"= {atol:.3g})".strip())
