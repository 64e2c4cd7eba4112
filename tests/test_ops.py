"""Numerical building blocks: the GELU formula and broadcasting by tiling."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from numerics import assert_f32_close

from opensora.models.ops import expand_to, gelu_tanh

RNG = np.random.default_rng(0)


def test_gelu_tanh_matches_the_tanh_formula() -> None:
    x = np.linspace(-6, 6, 101).astype(np.float32)
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    # a handful of float32 ops, and MindSpore's CPU sigmoid is not correctly rounded (~10 eps)
    assert_f32_close(gelu_tanh(ms.Tensor(x)).asnumpy(), expected, 16)


@pytest.mark.parametrize("small_shape,shape", [((1, 1, 5), (2, 3, 5)), ((3, 1), (2, 3, 4)),
                                               ((4,), (2, 3, 4)), ((2, 3, 4), (2, 3, 4))])
def test_expand_to_equals_numpy_broadcasting(small_shape, shape) -> None:
    small = RNG.standard_normal(small_shape).astype(np.float32)
    out = expand_to(ms.Tensor(small), shape).asnumpy()
    np.testing.assert_array_equal(out, np.broadcast_to(small, shape))


def test_expand_to_gradient_sums_over_the_copies() -> None:
    small = ms.Tensor(RNG.standard_normal((1, 1, 3)).astype(np.float32))
    grad = ms.grad(lambda s: (expand_to(s, (2, 4, 3)) * 2.0).sum())(small)
    np.testing.assert_allclose(grad.asnumpy(), np.full((1, 1, 3), 16.0), atol=1e-6)


def test_expand_to_refuses_incompatible_shapes() -> None:
    with pytest.raises(ValueError, match="cannot expand"):
        expand_to(ms.Tensor(np.zeros((2, 3), np.float32)), (4, 3))
    with pytest.raises(ValueError, match="cannot expand"):
        expand_to(ms.Tensor(np.zeros((2, 3, 4), np.float32)), (3, 4))
