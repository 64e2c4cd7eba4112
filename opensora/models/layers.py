"""Building blocks shared by STDiT (Open-Sora 1.0) and STDiT2 (1.1).

Attribute names equal the PyTorch module names of Open-Sora's `opensora/models/layers/blocks.py`
(and timm's `Mlp`), so `parameters_and_names()` yields Open-Sora's state-dict keys and published
checkpoints load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero, initializer

from opensora.models.attention import QUERY_BLOCK_SIZE, attention
from opensora.models.ops import expand_to, gelu_tanh

# --------------------------------------------------------------------------------------------
# normalisation and small helpers


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis whose parameters are called `weight`/`bias` like torch's.

    `affine=False` (Open-Sora's norm1/norm2/norm_temp/norm_final) has no parameters at all.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.affine = affine
        if affine:
            self.weight = Parameter(initializer("ones", (hidden_size,), ms.float32), name="weight")
            self.bias = Parameter(initializer("zeros", (hidden_size,), ms.float32), name="bias")
        else:
            self.ones = Tensor(np.ones(hidden_size, np.float32))
            self.zeros = Tensor(np.zeros(hidden_size, np.float32))
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x: Tensor) -> Tensor:
        gamma, beta = (self.weight, self.bias) if self.affine else (self.ones, self.zeros)
        return self.norm(x, gamma.astype(x.dtype), beta.astype(x.dtype))[0]


class RMSNorm(nn.Cell):
    """LlamaRMSNorm (= T5LayerNorm): x / rms(x) * weight, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = Parameter(initializer("ones", (hidden_size,), ms.float32), name="weight")
        self.eps = eps

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.astype(ms.float32)
        variance = ops.square(x32).mean(axis=-1, keep_dims=True)
        normed = (x32 * expand_to(ops.rsqrt(variance + self.eps), x32.shape)).astype(dtype)
        return expand_to(self.weight.astype(dtype), normed.shape) * normed


class Mlp(nn.Cell):
    """timm's Mlp (fc1 -> GELU(tanh) -> fc2) with its parameter names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Dense(in_features, hidden_features)
        self.fc2 = nn.Dense(hidden_features, out_features or in_features)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class DropPath(nn.Cell):
    """Stochastic depth: drop a sample's whole residual branch with probability `rate`."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def construct(self, x: Tensor) -> Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * ops.floor(keep + ops.rand(shape, dtype=x.dtype)) / keep


def t2i_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """PixArt's adaLN-single modulation: shift/scale are (B, 1, C), shared by all tokens."""
    return x * expand_to(1 + scale, x.shape) + expand_to(shift, x.shape)


def t_mask_select(x_mask: Tensor, x: Tensor, masked_x: Tensor, num_t: int, num_s: int) -> Tensor:
    """Per frame, take `x` where x_mask is True (generated) and `masked_x` (t0 branch) elsewhere."""
    batch, _, channels = x.shape
    x = x.reshape(batch, num_t, num_s, channels)
    masked_x = masked_x.reshape(batch, num_t, num_s, channels)
    picked = ops.where(x_mask.astype(ms.bool_)[:, :, None, None], x, masked_x)
    return picked.reshape(batch, num_t * num_s, channels)


# --------------------------------------------------------------------------------------------
# patch embedding


class PatchEmbed3D(nn.Cell):
    """Video (B, C, T, H, W) to tokens (B, T' H' W', D): a Conv3d whose stride equals its kernel.

    Because the patches do not overlap, the convolution is computed as patchify + one matmul,
    which is exact and much faster on CPU than a Conv3d kernel. The weight keeps the Conv3d layout
    (D, C, pt, ph, pw) of `x_embedder.proj.weight`. Inputs not divisible by the patch are
    zero-padded at the end, as Open-Sora does.
    """

    def __init__(self, patch_size: Sequence[int] = (2, 4, 4), in_chans: int = 3,
                 embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = _Conv3dWeights(in_chans, embed_dim, self.patch_size)

    def construct(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        batch, chans, t, h, w = x.shape
        pad_t, pad_h, pad_w = (-t) % pt, (-h) % ph, (-w) % pw
        if pad_t or pad_h or pad_w:
            x = ops.pad(x, (0, pad_w, 0, pad_h, 0, pad_t))
            t, h, w = t + pad_t, h + pad_h, w + pad_w
        nt, nh, nw = t // pt, h // ph, w // pw
        x = x.reshape(batch, chans, nt, pt, nh, ph, nw, pw)
        x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, nt * nh * nw, chans * pt * ph * pw)
        weight = self.proj.weight.reshape(self.embed_dim, -1).astype(x.dtype)
        return ops.matmul(x, weight.T) + self.proj.bias.astype(x.dtype)


class _Conv3dWeights(nn.Cell):
    """Holds `proj.weight`/`proj.bias` with Conv3d shapes (initialised like nn.Linear)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        fan_in = in_chans * int(np.prod(patch_size))
        bound = math.sqrt(6.0 / (fan_in + embed_dim))  # xavier_uniform on the flattened weight
        weight = np.random.uniform(-bound, bound, (embed_dim, in_chans, *patch_size))
        self.weight = Parameter(Tensor(weight.astype(np.float32)), name="weight")
        self.bias = Parameter(initializer(Zero(), (embed_dim,), ms.float32), name="bias")


# --------------------------------------------------------------------------------------------
# rotary position embedding


class RotaryEmbedding(nn.Cell):
    """RoPE as `rotary_embedding_torch.RotaryEmbedding(dim)` (Open-Sora 1.1's `rope`).

    `freqs` (dim/2,) is a saved, non-trainable parameter (`rope.freqs` in the checkpoint).
    Channel pairs (0,1), (2,3), ... are rotated by angle position * freqs[pair]: the interleaved
    convention, not the half-split one of GPT-NeoX.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {dim}")
        freqs = 1.0 / theta ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / dim)
        self.freqs = Parameter(Tensor(freqs.astype(np.float32)), name="freqs", requires_grad=False)
        self.dim = dim
        self.rotation = Tensor(pair_rotation(dim))  # a constant, not part of the checkpoint

    def cos_sin(self, seq_len: int, dtype: ms.dtype = ms.float32) -> tuple[Tensor, Tensor]:
        """cos and sin tables (seq_len, dim), each frequency repeated for its channel pair."""
        positions = ops.arange(seq_len, dtype=ms.float32)
        angles = positions[:, None] * self.freqs[None, :]
        angles = ops.stack([angles, angles], axis=-1).reshape(seq_len, self.dim)
        return ops.cos(angles).astype(dtype), ops.sin(angles).astype(dtype)

    def construct(self, x: Tensor) -> Tensor:
        """Rotate queries or keys (..., seq, dim) by their position along axis -2."""
        cos, sin = self.cos_sin(x.shape[-2], x.dtype)
        return apply_rotary(x, cos, sin, self.rotation)


def rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a 90 degree turn of every pair."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    return ops.stack([-second, first], axis=-1).reshape(x.shape)


def pair_rotation(dim: int) -> np.ndarray:
    """The (dim, dim) matrix R with x @ R == rotate_pairs(x).

    Models rotate with this matmul: on CPU it is ~5x faster than the reshape + stack of
    `rotate_pairs`, and exact (each output is one input times +-1)."""
    rotation = np.zeros((dim, dim), np.float32)
    rotation[1::2, 0::2] = -np.eye(dim // 2, dtype=np.float32)
    rotation[0::2, 1::2] = np.eye(dim // 2, dtype=np.float32)
    return rotation


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rotation: Tensor | None = None) -> Tensor:
    """x * cos + rotate_pairs(x) * sin; `rotation` (from `pair_rotation`) does the turn as a
    matmul."""
    turned = rotate_pairs(x) if rotation is None else ops.matmul(x, rotation.astype(x.dtype))
    return x * expand_to(cos, x.shape) + turned * expand_to(sin, x.shape)


# --------------------------------------------------------------------------------------------
# attention layers


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
    batch, seq, channels = x.shape
    return x.reshape(batch, seq, num_heads, channels // num_heads).transpose(0, 2, 1, 3)


class Attention(nn.Cell):
    """Multi-head self-attention with optional qk-norm (RMSNorm per head) and RoPE.

    RoPE is applied to q and k BEFORE qk-norm, as Open-Sora 1.1.0 does (later Open-Sora calls this
    order `qk_norm_legacy`). The rotation tables are passed in (`rope=(cos, sin, rotation)`) so
    the single `rope` module of STDiT2 is shared by all blocks without being registered in each.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_norm: bool = False, attn_backend: str = "math",
                 block_size: int = QUERY_BLOCK_SIZE) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Dense(dim, dim * 3, has_bias=qkv_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Dense(dim, dim)
        self.attn_backend = attn_backend
        self.block_size = block_size

    def qkv_heads(self, x: Tensor, rope: tuple[Tensor, ...] | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, heads, N, head_dim), after RoPE and qk-norm (useful for inspection)."""
        batch, seq, channels = x.shape
        # split before moving the head axis: under graph mode, indexing a transposed qkv tensor
        # compiles to StridedSlice copies that cost more than the qkv matmul itself
        q, k, v = ops.split(self.qkv(x), channels, axis=-1)
        q, k, v = (split_heads(q, self.num_heads), split_heads(k, self.num_heads),
                   split_heads(v, self.num_heads))
        if rope is not None:
            q = apply_rotary(q, *rope)
            k = apply_rotary(k, *rope)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return q, k, v

    def construct(self, x: Tensor, rope: tuple[Tensor, ...] | None = None) -> Tensor:
        batch, seq, channels = x.shape
        q, k, v = self.qkv_heads(x, rope)
        out = attention(q, k, v, None, self.attn_backend, self.block_size)
        out = out.transpose(0, 2, 1, 3).reshape(batch, seq, channels)
        return self.proj(out)


class MultiHeadCrossAttention(nn.Cell):
    """Video tokens (queries) attend to caption tokens (keys/values).

    Open-Sora packs all captions into one sequence and uses xformers' block-diagonal mask built
    from the valid token counts; that equals per-sample attention with a boolean key mask
    (B, N_tokens), which is what this layer takes (`mask` True/1 = real token).
    """

    def __init__(self, d_model: int, num_heads: int, attn_backend: str = "math",
                 block_size: int = QUERY_BLOCK_SIZE) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} must be divisible by num_heads {num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Dense(d_model, d_model)
        self.kv_linear = nn.Dense(d_model, d_model * 2)
        self.proj = nn.Dense(d_model, d_model)
        self.attn_backend = attn_backend
        self.block_size = block_size

    def construct(self, x: Tensor, cond: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, seq, channels = x.shape
        n_tok = cond.shape[1]
        q = self.q_linear(x).reshape(batch, seq, self.num_heads, self.head_dim)
        q = q.transpose(0, 2, 1, 3)
        k, v = ops.split(self.kv_linear(cond), channels, axis=-1)
        kv = (split_heads(k, self.num_heads), split_heads(v, self.num_heads))
        key_mask = None
        if mask is not None:
            key_mask = mask.astype(ms.bool_).reshape(batch, 1, 1, n_tok)
        out = attention(q, kv[0], kv[1], key_mask, self.attn_backend, self.block_size)
        out = out.transpose(0, 2, 1, 3).reshape(batch, seq, channels)
        return self.proj(out)


# --------------------------------------------------------------------------------------------
# final layers


class T2IFinalLayer(nn.Cell):
    """PixArt's final layer (used by STDiT and STDiT2): adaLN-single shift/scale, then linear.

    With `x_mask`, the t0 branch re-normalises the already modulated tokens before its own
    shift/scale: that is what Open-Sora computes (it reassigns `x` first), kept for parity.
    """

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, eps=1e-6, affine=False)
        self.linear = nn.Dense(hidden_size, num_patch * out_channels)
        self.scale_shift_table = Parameter(
            Tensor(np.random.randn(2, hidden_size).astype(np.float32) / hidden_size**0.5),
            name="scale_shift_table")
        self.out_channels = out_channels

    def construct(self, x: Tensor, t: Tensor, x_mask: Tensor | None = None,
                  t0: Tensor | None = None, num_t: int = 1, num_s: int = 1) -> Tensor:
        shift, scale = ops.chunk(self.scale_shift_table[None] + t[:, None], 2, axis=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = ops.chunk(self.scale_shift_table[None] + t0[:, None], 2, axis=1)
            x_zero = t2i_modulate(self.norm_final(x), shift0, scale0)
            x = t_mask_select(x_mask, x, x_zero, num_t, num_s)
        return self.linear(x)


# --------------------------------------------------------------------------------------------
# embedders for timesteps, sizes and captions


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0) -> np.ndarray:
    half = dim // 2
    return np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half).astype(
        np.float32)


class TimestepEmbedder(nn.Cell):
    """Scalar timestep -> sinusoid (cos first, then sin) -> MLP (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.SequentialCell([
            nn.Dense(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Dense(hidden_size, hidden_size),
        ])
        self.frequency_embedding_size = frequency_embedding_size
        self.freqs = Tensor(timestep_frequencies(frequency_embedding_size))

    def timestep_embedding(self, t: Tensor) -> Tensor:
        args = t.astype(ms.float32)[:, None] * self.freqs[None]
        embedding = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
        if self.frequency_embedding_size % 2:
            embedding = ops.cat([embedding, ops.zeros_like(embedding[:, :1])], axis=-1)
        return embedding

    def construct(self, t: Tensor) -> Tensor:
        return self.mlp(self.timestep_embedding(t))


class SizeEmbedder(TimestepEmbedder):
    """Embeds each of `dims` scalars (height & width, aspect ratio, frames, fps) like a timestep
    and concatenates them: (B, dims) -> (B, dims * hidden)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__(hidden_size, frequency_embedding_size)
        self.outdim = hidden_size

    def construct(self, s: Tensor, bs: int) -> Tensor:
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != bs:
            if bs % s.shape[0]:
                raise ValueError(f"size condition batch {s.shape[0]} does not divide batch {bs}")
            s = ops.tile(s, (bs // s.shape[0], 1))
        batch, dims = s.shape
        emb = self.mlp(self.timestep_embedding(s.reshape(-1)))
        return emb.reshape(batch, dims * self.outdim)


class CaptionEmbedder(nn.Cell):
    """Projects T5 token features to the model width; in training, whole captions are replaced
    with probability `uncond_prob` by the learned null caption `y_embedding` (classifier-free
    guidance dropout)."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float,
                 token_num: int = 120) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        null = np.random.randn(token_num, in_channels).astype(np.float32) / in_channels**0.5
        # A buffer in Open-Sora (saved in the state dict, not trained).
        self.y_embedding = Parameter(Tensor(null), name="y_embedding", requires_grad=False)
        self.uncond_prob = float(uncond_prob)

    def token_drop(self, caption: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop_ids = ops.rand((caption.shape[0],)) < self.uncond_prob
        else:
            drop_ids = force_drop_ids == 1
        null = self.y_embedding.astype(caption.dtype)[None, None]
        return ops.where(drop_ids[:, None, None, None], null, caption)

    def construct(self, caption: Tensor, train: bool = False,
                  force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


# --------------------------------------------------------------------------------------------
# sin-cos position embeddings


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin(pos * w_i), cos(pos * w_i)], w_i = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_1d_sincos_pos_embed(embed_dim: int, length: int, scale: float = 1.0) -> np.ndarray:
    """Temporal embedding of STDiT 1.0: frame index / scale."""
    return get_1d_sincos_pos_embed_from_grid(embed_dim, np.arange(length) / scale)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], scale: float = 1.0,
                            base_size: int | None = None) -> np.ndarray:
    """(H*W, D) for an H x W patch grid, rows first.

    The first D/2 channels encode the column (x) coordinate, the last D/2 the row. Coordinates are
    divided by `scale` and, with `base_size`, stretched to span `base_size` patches whatever the
    grid size, so a model trained at one resolution sees familiar positions at another.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    grid_h_size, grid_w_size = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = np.arange(grid_h_size, dtype=np.float32) / scale
    grid_w = np.arange(grid_w_size, dtype=np.float32) / scale
    if base_size is not None:
        grid_h *= base_size / grid_h_size
        grid_w *= base_size / grid_w_size
    cols, rows = np.meshgrid(grid_w, grid_h)  # each (H, W)
    emb_x = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)
    emb_y = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)
    return np.concatenate([emb_x, emb_y], axis=1)


class PositionEmbedding2D(nn.Cell):
    """STDiT2's spatial embedding, computed in the graph for any H x W (dynamic resolution).

    `scale` may be a Tensor (it is sqrt(height * width) / input_sq_size of the batch's first
    sample), which is why this is written with ops and not numpy.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"PositionEmbedding2D needs dim divisible by 4, got {dim}")
        self.dim = dim
        half = dim // 2
        inv_freq = 1.0 / 10000 ** (np.arange(0, half, 2, dtype=np.float32) / half)
        self.inv_freq = Tensor(inv_freq.astype(np.float32))

    def _sin_cos(self, coords: Tensor) -> Tensor:
        out = coords[:, None] * self.inv_freq[None]
        return ops.cat([ops.sin(out), ops.cos(out)], axis=-1)

    def construct(self, h: int, w: int, scale: Tensor | float = 1.0,
                  base_size: int | None = None) -> Tensor:
        rows = ops.arange(h, dtype=ms.float32) / scale
        cols = ops.arange(w, dtype=ms.float32) / scale
        if base_size is not None:
            rows = rows * (base_size / h)
            cols = cols * (base_size / w)
        cols_grid = ops.tile(cols[None, :], (h, 1)).reshape(-1)
        rows_grid = ops.tile(rows[:, None], (1, w)).reshape(-1)
        return ops.cat([self._sin_cos(cols_grid), self._sin_cos(rows_grid)], axis=-1)[None]


def sincos_1d(length: int, dim: int, scale: float = 1.0) -> Tensor:
    """`get_1d_sincos_pos_embed` written with ops (for a frame count known only at trace time):
    (1, length, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = (ops.arange(length, dtype=ms.float32) / scale)[:, None] * Tensor(
        omega.astype(np.float32))[None]
    return ops.cat([ops.sin(angles), ops.cos(angles)], axis=-1)[None]
