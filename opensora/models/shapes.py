"""Sizes of STDiT and STDiT2 in closed form: parameters and matmul FLOPs, without building them.

One place for the arithmetic the presets (parameter counts of the XL models), the profiler
(% of matmul peak) and the scaling model (step time and memory on paper) all need. A config is
a model's constructor keywords: a dict, or anything with a `.config` dict (a built model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoid width of the timestep and size embedders
BLOCK_PARTS = ("spatial_attn", "temporal_attn", "cross_attn", "mlp")


def model_config(model: Any) -> Mapping[str, Any]:
    """Constructor keywords of a built model (its `.config`) or a config dict."""
    if hasattr(model, "config") and isinstance(model.config, Mapping):
        return model.config
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"expected an STDiT / STDiT2 model or its config dict, got {model!r}")


# ---------------------------------------------------------------------------------------------
# parameters


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _common_parameters(hidden_size: int, depth: int, in_channels: int,
                       patch_size: Sequence[int], caption_channels: int,
                       model_max_length: int, mlp_ratio: float, pred_sigma: bool,
                       block_extra: int) -> int:
    """Parameters STDiT and STDiT2 share, plus `block_extra` per block."""
    h, patch = hidden_size, math.prod(int(p) for p in patch_size)
    out_channels = in_channels * 2 if pred_sigma else in_channels
    mlp = int(h * mlp_ratio)
    block = (2 * (_linear(h, 3 * h) + _linear(h, h))  # attn, attn_temp
             + _linear(h, h) + _linear(h, 2 * h) + _linear(h, h)  # cross_attn
             + _linear(h, mlp) + _linear(mlp, h) + 6 * h + block_extra)
    return (in_channels * patch * h + h  # x_embedder
            + _linear(FREQUENCY_EMBEDDING_SIZE, h) + _linear(h, h)  # t_embedder
            + _linear(h, 6 * h)  # t_block
            + model_max_length * caption_channels + _linear(caption_channels, h)
            + _linear(h, h)  # y_embedder
            + depth * block
            + _linear(h, patch * out_channels) + 2 * h)  # final_layer


def count_stdit_parameters(input_size: Sequence[int] = (1, 32, 32),
                           in_channels: int = 4, patch_size: Sequence[int] = (1, 2, 2),
                           hidden_size: int = 1152, depth: int = 28, mlp_ratio: float = 4.0,
                           pred_sigma: bool = True, caption_channels: int = 4096,
                           model_max_length: int = 120, **_: Any) -> int:
    """Number of values in an STDiT state dict (buffers included)."""
    grid = [int(s) // int(p) for s, p in zip(input_size, patch_size, strict=True)]
    tables = (grid[1] * grid[2] + grid[0]) * hidden_size
    return tables + _common_parameters(hidden_size, depth, in_channels, patch_size,
                                       caption_channels, model_max_length, mlp_ratio,
                                       pred_sigma, block_extra=0)


def count_stdit2_parameters(in_channels: int = 4, patch_size: Sequence[int] = (1, 2, 2),
                            hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                            mlp_ratio: float = 4.0, pred_sigma: bool = True,
                            caption_channels: int = 4096, model_max_length: int = 120,
                            qk_norm: bool = False, **_: Any) -> int:
    """Number of values in an STDiT2 state dict (buffers included)."""
    h, head_dim = hidden_size, hidden_size // num_heads
    block_extra = 3 * h + (4 * head_dim if qk_norm else 0)  # temporal table, q/k norms x2
    f = FREQUENCY_EMBEDDING_SIZE
    size_embedders = 2 * (f * (h // 3) + (h // 3) + (h // 3) ** 2 + (h // 3)) + 2 * (
        f * h + h + h * h + h)
    return (_common_parameters(h, depth, in_channels, patch_size, caption_channels,
                               model_max_length, mlp_ratio, pred_sigma, block_extra)
            + 3 * h * h + 3 * h  # t_block_temp
            + head_dim // 2  # rope.freqs
            + size_embedders)


def stdit2_buffer_count(hidden_size: int = 1152, num_heads: int = 16,
                        caption_channels: int = 4096, model_max_length: int = 120,
                        **_: Any) -> int:
    """State-dict values of STDiT2 that are not trained (Open-Sora registers them as buffers):
    the null caption `y_embedding` and RoPE's frequency table."""
    return model_max_length * caption_channels + (hidden_size // num_heads) // 2


def count_stdit2_trainable(**config: Any) -> int:
    """Trained values of an STDiT2 (what gradients, AdamW moments and the EMA hold)."""
    return count_stdit2_parameters(**config) - stdit2_buffer_count(**config)


# ---------------------------------------------------------------------------------------------
# FLOPs


def stdit2_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int]:
    """(frames, tokens per frame) after patchifying a (T, H, W) latent (padded up)."""
    if len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (T, H, W), got {tuple(latent_shape)}")
    (t, h, w), (pt, ph, pw) = latent_shape, patch_size
    return math.ceil(t / pt), math.ceil(h / ph) * math.ceil(w / pw)


def stdit2_flops(model: Any, latent_shape: Sequence[int], batch: int = 1,
                 caption_tokens: int | None = None) -> dict[str, int]:
    """Matmul FLOPs of one STDiT2 forward pass, by part (2 FLOPs per multiply-add).

    A (T, H, W) latent gives T' frames of S tokens (N = T' S). Per block and sample:
    spatial attention qkv + proj 8 N D^2 and core 4 T' S^2 D; temporal attention 8 N D^2 and
    4 S T'^2 D; cross-attention q + proj 4 N D^2, kv 4 L D^2 and core 4 N L D (L caption tokens,
    all counted as if unmasked); MLP 4 N D M. Outside the blocks: patch embedding, conditioning
    (timestep, size and caption embedders, t_block, t_block_temp) and the final layer.
    Elementwise work (norms, softmax, modulation, RoPE) is not counted.
    """
    cfg = model_config(model)
    d, depth = int(cfg["hidden_size"]), int(cfg["depth"])
    patch = tuple(int(p) for p in cfg["patch_size"])
    mlp = int(d * cfg.get("mlp_ratio", 4.0))
    c_in = int(cfg["in_channels"])
    c_out = 2 * c_in if cfg.get("pred_sigma", True) else c_in
    caption_tokens = int(cfg["model_max_length"] if caption_tokens is None else caption_tokens)
    c_cap = int(cfg["caption_channels"])
    frames, spatial = stdit2_tokens(latent_shape, patch)
    n = frames * spatial
    patch_vol = math.prod(patch)
    freq = FREQUENCY_EMBEDDING_SIZE
    embed_mlp = 2 * (freq * d + d * d)  # one TimestepEmbedder-sized MLP on one scalar
    d3 = d // 3
    conditioning = (embed_mlp * 2  # timestep (and fps) embedder
                    + 2 * 2 * (freq * d3 + d3 * d3) + 2 * (freq * d3 + d3 * d3)  # hw, ar
                    + embed_mlp  # number of frames
                    + 2 * d * 6 * d + 2 * d * 3 * d  # t_block, t_block_temp
                    + 2 * caption_tokens * (c_cap * d + d * d))  # caption projection
    parts = {
        "patch_embed": 2 * n * c_in * patch_vol * d,
        "conditioning": conditioning,
        "spatial_attn.linear": depth * 2 * n * (3 * d * d + d * d),
        "spatial_attn.core": depth * 4 * frames * spatial * spatial * d,
        "temporal_attn.linear": depth * 2 * n * (3 * d * d + d * d),
        "temporal_attn.core": depth * 4 * spatial * frames * frames * d,
        "cross_attn.linear": depth * (2 * n * 2 * d * d + 2 * caption_tokens * 2 * d * d),
        "cross_attn.core": depth * 4 * n * caption_tokens * d,
        "mlp": depth * 4 * n * d * mlp,
        "final_layer": 2 * n * d * patch_vol * c_out,
    }
    return {name: batch * flops for name, flops in parts.items()}


def stdit2_train_flops(model: Any, latent_shape: Sequence[int], batch: int = 1,
                       recompute: bool = False, caption_tokens: int | None = None
                       ) -> dict[str, int]:
    """Forward + backward FLOPs by part: the backward costs about twice the forward (gradients
    of inputs and of weights); recompute runs the blocks' forward once more."""
    forward = stdit2_flops(model, latent_shape, batch, caption_tokens)
    passes = {name: 3 + (1 if recompute and name.startswith(BLOCK_PARTS) else 0)
              for name in forward}
    return {name: flops * passes[name] for name, flops in forward.items()}
