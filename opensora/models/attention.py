"""Scaled dot-product attention with interchangeable backends.

Every attention layer of STDiT / STDiT2 calls `attention(q, k, v, mask, backend)`, so the
algorithm is chosen in one place:

- ``math``: softmax(Q K^T / sqrt(d)) V with the full score matrix; exact and simplest, memory
  O(N_q * N_k) per head.
- ``chunked``: queries and keys in blocks with an online (running max / running sum) softmax, the
  algorithm of FlashAttention written with plain matmul + exp; memory O(block * N) for the
  output plus one block_size x key_block_size tile of scores, same result.
- ``flash``: Ascend's fused FlashAttentionScore kernel (only exists on Ascend).
- ``auto``: ``flash`` on Ascend, otherwise ``math`` for small problems and ``chunked`` when the
  score matrix would be large.

Shapes: q (B, heads, N_q, d), k and v (B, heads, N_k, d). `mask` is boolean, True = may attend,
broadcastable to (B, heads, N_q, N_k); a key mask of caption tokens is (B, 1, 1, N_k).
"""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import ops

BACKENDS = ("math", "chunked", "flash", "auto")

# Masked scores get this instead of -inf, so a row whose keys are all masked gives a uniform
# average instead of NaN; exp(_MASK_VALUE - max) is exactly 0 whenever one key is allowed.
_MASK_VALUE = -1e30
# "auto" switches from math to chunked above this many score elements per (batch * head).
_AUTO_CHUNK_THRESHOLD = 4096 * 4096
# Block sizes of the chunked backend. A 512 x 4096 tile is 8 MiB of float32 per (batch * head),
# small next to a 16k-token score matrix (1 GiB); up to 4096 keys the online softmax is skipped
# (one key block), and 512-row query blocks are few enough that their launches do not show:
# on CPU that keeps chunked as fast as math at 4k tokens (chapter 8 measures it).
QUERY_BLOCK_SIZE = 512
KEY_BLOCK_SIZE = 4096


def device_is_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def resolve_backend(backend: str) -> str:
    """Turn "auto" into a concrete backend and reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "flash" if device_is_ascend() else "math"
    if backend == "flash" and not device_is_ascend():
        raise ValueError(
            "attention backend 'flash' needs Ascend's FlashAttentionScore, but the device target "
            f"is {ms.get_context('device_target')!r}; use backend='math' or 'chunked' (or 'auto')"
        )
    return backend


def attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor, mask: ms.Tensor | None = None,
              backend: str = "math", block_size: int = QUERY_BLOCK_SIZE,
              key_block_size: int = KEY_BLOCK_SIZE) -> ms.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two axes, computed by `backend`."""
    if backend == "auto":
        backend = resolve_backend(backend)
        if backend == "math" and q.shape[-2] * k.shape[-2] > _AUTO_CHUNK_THRESHOLD:
            backend = "chunked"
    if backend == "math":
        return math_attention(q, k, v, mask)
    if backend == "chunked":
        return chunked_attention(q, k, v, mask, block_size, key_block_size)
    if backend == "flash":
        return flash_attention(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _masked(scores: ms.Tensor, mask: ms.Tensor | None) -> ms.Tensor:
    if mask is None:
        return scores
    return ops.where(mask, scores, ops.full_like(scores, _MASK_VALUE))


def math_attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor,
                   mask: ms.Tensor | None = None) -> ms.Tensor:
    """Full score matrix; the reference every other backend is tested against."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = ops.matmul(q * scale, k.swapaxes(-1, -2))
    probs = ops.softmax(_masked(scores.astype(ms.float32), mask), axis=-1).astype(v.dtype)
    return ops.matmul(probs, v)


def chunked_attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor, mask: ms.Tensor | None = None,
                      block_size: int = QUERY_BLOCK_SIZE,
                      key_block_size: int = KEY_BLOCK_SIZE) -> ms.Tensor:
    """Online-softmax attention: never holds more than block_size x key_block_size scores.

    Queries are taken `block_size` rows at a time. For each query block a running row maximum
    `m`, normaliser `l` and output `acc` are updated key block by key block; earlier partial
    sums are rescaled by exp(m_old - m_new), which makes the final acc / l equal the full
    softmax. When one key block covers every key (the common case below `key_block_size`
    tokens) the block is a plain softmax: the running statistics only cost time on CPU, where
    each extra elementwise op is a pass over the tile.
    """
    if block_size < 1 or key_block_size < 1:
        raise ValueError("block_size and key_block_size must be positive integers, got "
                         f"{block_size} and {key_block_size}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    # One split per tensor instead of a slice per block: in PyNative every slice is an operator
    # launch, and at 256-row blocks the launches cost more than the matmuls.
    q_blocks = ops.split((q * scale).astype(ms.float32), block_size, axis=-2)
    k_blocks = ops.split(k.astype(ms.float32).swapaxes(-1, -2), key_block_size, axis=-1)
    v_blocks = ops.split(v.astype(ms.float32), key_block_size, axis=-2)
    mask_rows = _split_mask(mask, block_size, len(q_blocks), -2)
    outputs = []
    for q_blk, rows in zip(q_blocks, mask_rows):
        mask_tiles = _split_mask(rows, key_block_size, len(k_blocks), -1)
        if len(k_blocks) == 1:
            scores = _masked(ops.matmul(q_blk, k_blocks[0]), mask_tiles[0])
            outputs.append(ops.matmul(ops.softmax(scores, axis=-1), v_blocks[0]))
            continue
        running_max = running_sum = acc = None
        for k_blk, v_blk, tile_mask in zip(k_blocks, v_blocks, mask_tiles):
            scores = _masked(ops.matmul(q_blk, k_blk), tile_mask)
            blk_max = scores.max(axis=-1, keepdims=True)
            if running_max is None:
                new_max = blk_max
                probs = ops.exp(scores - new_max)
                running_sum = probs.sum(axis=-1, keepdims=True)
                acc = ops.matmul(probs, v_blk)
            else:
                new_max = ops.maximum(running_max, blk_max)
                correction = ops.exp(running_max - new_max)
                probs = ops.exp(scores - new_max)
                running_sum = running_sum * correction + probs.sum(axis=-1, keepdims=True)
                acc = acc * correction + ops.matmul(probs, v_blk)
            running_max = new_max
        outputs.append(acc / running_sum)
    out = outputs[0] if len(outputs) == 1 else ops.cat(outputs, axis=-2)
    return out.astype(v.dtype)


def _split_mask(mask: ms.Tensor | None, size: int, count: int, axis: int
                ) -> list[ms.Tensor | None]:
    """The mask in blocks of `size` along `axis` (-2: query rows, -1: keys); a mask of size 1
    there (shared by all queries, or by all keys) is reused for every block."""
    if mask is None or mask.shape[axis] == 1:
        return [mask] * count
    return list(ops.split(mask, size, axis=axis))


def flash_attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor,
                    mask: ms.Tensor | None = None) -> ms.Tensor:
    """Ascend FlashAttentionScore (BNSD layout). Its attn_mask marks positions to DROP."""
    if not device_is_ascend():
        raise ValueError(
            "flash attention runs only on Ascend (FlashAttentionScore); device target is "
            f"{ms.get_context('device_target')!r}. Use backend='math' or 'chunked'."
        )
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[-2]
    drop = None
    if mask is not None:
        drop = ops.logical_not(mask).astype(ms.uint8)
        drop = ops.broadcast_to(drop, (batch, 1 if drop.shape[1] == 1 else heads, n_q, n_k))
    dtype = q.dtype
    compute = ms.float16 if dtype == ms.float32 else dtype
    out = ops.flash_attention_score(
        q.astype(compute), k.astype(compute), v.astype(compute), heads, attn_mask=drop,
        scalar_value=1.0 / math.sqrt(head_dim), input_layout="BNSD",
    )
    return out.astype(dtype)
