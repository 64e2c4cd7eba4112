"""Attention backends: chunked online softmax equals the full-matrix math, with and without
masks; backend names are checked; flash refuses to run off Ascend."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from numerics import EPS32

from opensora.models.attention import attention, resolve_backend

RNG = np.random.default_rng(0)


def _qkv(batch: int = 2, heads: int = 3, n_q: int = 37, n_k: int = 29, dim: int = 16):
    shape_q, shape_k = (batch, heads, n_q, dim), (batch, heads, n_k, dim)
    arrays = [RNG.standard_normal(s).astype(np.float32) * 2 for s in (shape_q, shape_k, shape_k)]
    return arrays


def _numpy_attention(q, k, v, mask=None):
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    return (probs / probs.sum(-1, keepdims=True)) @ v


def _atol(q: np.ndarray, k: np.ndarray, v: np.ndarray, rounding_steps: float = 8) -> float:
    """Softmax over logits of magnitude L: exp turns a logit's float32 rounding (a few L * eps)
    into that relative error of the weights, so outputs (averages of v) differ by a few
    L * eps * max|v| (L at least 1: the rounding of the weights' normalisation itself)."""
    logits = np.abs(q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2)).max()
    magnitude = max(float(logits) / np.sqrt(q.shape[-1]), 1.0)
    return rounding_steps * EPS32 * magnitude * float(np.abs(v).max())


def _run(backend, q, k, v, mask=None, block_size=8, key_block_size=None):
    """Key blocks default to the query block size, so the online softmax across key blocks runs
    (the backend's own default, 4096 keys, would make these small cases one key block)."""
    tensors = [ms.Tensor(a) for a in (q, k, v)]
    mask_t = None if mask is None else ms.Tensor(mask)
    return attention(*tensors, mask_t, backend=backend, block_size=block_size,
                     key_block_size=key_block_size or block_size).asnumpy()


@pytest.mark.parametrize("block_size,key_block_size",
                         [(1, 1), (8, 8), (13, 5), (64, 64), (8, 4096)])
def test_chunked_equals_math_without_mask(block_size: int, key_block_size: int) -> None:
    q, k, v = _qkv()
    math_out, atol = _run("math", q, k, v), _atol(q, k, v)
    np.testing.assert_allclose(math_out, _numpy_attention(q, k, v), rtol=0, atol=atol)
    np.testing.assert_allclose(_run("chunked", q, k, v, block_size=block_size,
                                    key_block_size=key_block_size), math_out, rtol=0, atol=atol)


def test_chunked_equals_math_with_caption_key_mask() -> None:
    """The cross-attention case: (B, 1, 1, N_tokens) with a different valid length per sample."""
    q, k, v = _qkv(n_k=16)
    lengths = np.array([5, 16])
    mask = (np.arange(16)[None] < lengths[:, None])[:, None, None, :]
    math_out, atol = _run("math", q, k, v, mask), _atol(q, k, v)
    np.testing.assert_allclose(math_out, _numpy_attention(q, k, v, mask), rtol=0, atol=atol)
    np.testing.assert_allclose(_run("chunked", q, k, v, mask, block_size=3), math_out, rtol=0,
                               atol=atol)
    # masked keys really are ignored: the first sample equals attention over its 5 tokens
    trimmed = _numpy_attention(q[:1], k[:1, :, :5], v[:1, :, :5])
    np.testing.assert_allclose(math_out[:1], trimmed, rtol=0, atol=atol)


def test_chunked_equals_math_with_full_mask() -> None:
    q, k, v = _qkv(n_q=20, n_k=20)
    mask = RNG.random((2, 3, 20, 20)) > 0.4
    mask[..., 0] = True  # every query keeps one key
    math_out, atol = _run("math", q, k, v, mask), _atol(q, k, v)
    np.testing.assert_allclose(math_out, _numpy_attention(q, k, v, mask), rtol=0, atol=atol)
    np.testing.assert_allclose(_run("chunked", q, k, v, mask, block_size=6), math_out, rtol=0,
                               atol=atol)
    np.testing.assert_allclose(_run("chunked", q, k, v, mask, block_size=6, key_block_size=64),
                               math_out, rtol=0, atol=atol)


def test_chunked_is_stable_for_large_logits() -> None:
    q, k, v = _qkv(n_q=9, n_k=40)
    q *= 30.0  # logits in the thousands: a naive exp would overflow
    out = _run("chunked", q, k, v, block_size=7)
    assert np.isfinite(out).all()
    # the tolerance grows with the logits (L * eps relative in the weights), not a fixed 1e-5
    np.testing.assert_allclose(out, _run("math", q, k, v), rtol=0, atol=_atol(q, k, v))


def test_chunked_under_jit_matches_pynative() -> None:
    arrays = _qkv()
    q, k, v = (ms.Tensor(a) for a in arrays)

    @ms.jit
    def chunked(q, k, v):
        return attention(q, k, v, None, backend="chunked", block_size=10, key_block_size=10)

    np.testing.assert_allclose(chunked(q, k, v).asnumpy(),
                               attention(q, k, v, None, "chunked", 10, 10).asnumpy(), rtol=0,
                               atol=_atol(*arrays))


def test_backend_names() -> None:
    assert resolve_backend("auto") == "math"  # CPU here
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        resolve_backend("fast")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        _run("xformers", q, k, v)
    with pytest.raises(ValueError, match="block_size"):
        _run("chunked", q, k, v, block_size=0)


def test_flash_refuses_off_ascend() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="Ascend"):
        resolve_backend("flash")
    with pytest.raises(ValueError, match="Ascend"):
        _run("flash", q, k, v)
