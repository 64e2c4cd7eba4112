"""STDiT2: the diffusion transformer of Open-Sora 1.1.

Each block does spatial self-attention inside every frame, temporal self-attention across frames
at every spatial position (with RoPE over the frame index), cross-attention to the caption, and an
MLP; adaLN-single modulation comes from the timestep through `t_block` (spatial, MLP) and
`t_block_temp` (temporal), plus micro-conditions: resolution and aspect ratio (spatial), number
of frames and fps (temporal). Frames with `x_mask` False are conditioning frames and see
timestep 0 (the `t0` branches).

Constructor keywords, `construct` arguments and parameter names mirror Open-Sora v1.1.0's
`STDiT2Config` / `STDiT2.forward` / `state_dict()`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from opensora.models.attention import QUERY_BLOCK_SIZE, device_is_ascend, resolve_backend
from opensora.models.layers import (
    Attention,
    CaptionEmbedder,
    DropPath,
    LayerNorm,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    t2i_modulate,
    t_mask_select,
)
from opensora.models.ops import expand_to
from opensora.models.stdit import (
    freeze_parameters,
    init_dit_weights,
    load_pretrained,
    reject_unknown_keywords,
    unpatchify_tokens,
)


class STDiT2Block(nn.Cell):
    """One spatial-temporal block; see the module docstring for the order of its branches."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, qk_norm: bool = False, attn_backend: str = "math",
                 block_size: int = QUERY_BLOCK_SIZE) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        # spatial branch
        self.norm1 = LayerNorm(hidden_size, eps=1e-6, affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm,
                              attn_backend=attn_backend, block_size=block_size)
        self.scale_shift_table = Parameter(
            Tensor(np.random.randn(6, hidden_size).astype(np.float32) / hidden_size**0.5),
            name="scale_shift_table")
        # cross attention
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads,
                                                  attn_backend=attn_backend,
                                                  block_size=block_size)
        # mlp branch
        self.norm2 = LayerNorm(hidden_size, eps=1e-6, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        # temporal branch
        self.norm_temp = LayerNorm(hidden_size, eps=1e-6, affine=False)
        self.attn_temp = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm,
                                   attn_backend=attn_backend, block_size=block_size)
        self.scale_shift_table_temporal = Parameter(
            Tensor(np.random.randn(3, hidden_size).astype(np.float32) / hidden_size**0.5),
            name="scale_shift_table_temporal")

    def _gated(self, x_mask: Tensor | None, gate: Tensor, gate0: Tensor | None, branch: Tensor,
               num_t: int, num_s: int) -> Tensor:
        if x_mask is None:
            return expand_to(gate, branch.shape) * branch
        return t_mask_select(x_mask, expand_to(gate, branch.shape) * branch,
                             expand_to(gate0, branch.shape) * branch, num_t, num_s)

    def _modulated(self, normed: Tensor, x_mask: Tensor | None, shift: Tensor, scale: Tensor,
                   shift0: Tensor | None, scale0: Tensor | None, num_t: int,
                   num_s: int) -> Tensor:
        out = t2i_modulate(normed, shift, scale)
        if x_mask is None:
            return out
        return t_mask_select(x_mask, out, t2i_modulate(normed, shift0, scale0), num_t, num_s)

    def construct(self, x: Tensor, y: Tensor, t: Tensor, t_tmp: Tensor,
                  mask: Tensor | None = None, x_mask: Tensor | None = None,
                  t0: Tensor | None = None, t0_tmp: Tensor | None = None,
                  num_t: int = 1, num_s: int = 1,
                  rope: tuple[Tensor, ...] | None = None) -> Tensor:
        batch, _, channels = x.shape
        mods = ops.chunk(self.scale_shift_table[None] + t.reshape(batch, 6, -1), 6, axis=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        shift_tmp, scale_tmp, gate_tmp = ops.chunk(
            self.scale_shift_table_temporal[None] + t_tmp.reshape(batch, 3, -1), 3, axis=1)
        shift_msa0 = scale_msa0 = gate_msa0 = shift_mlp0 = scale_mlp0 = gate_mlp0 = None
        shift_tmp0 = scale_tmp0 = gate_tmp0 = None
        if x_mask is not None:
            mods0 = ops.chunk(self.scale_shift_table[None] + t0.reshape(batch, 6, -1), 6, axis=1)
            shift_msa0, scale_msa0, gate_msa0, shift_mlp0, scale_mlp0, gate_mlp0 = mods0
            shift_tmp0, scale_tmp0, gate_tmp0 = ops.chunk(
                self.scale_shift_table_temporal[None] + t0_tmp.reshape(batch, 3, -1), 3, axis=1)

        # spatial attention: frames are independent sequences of num_s tokens
        x_m = self._modulated(self.norm1(x), x_mask, shift_msa, scale_msa, shift_msa0,
                              scale_msa0, num_t, num_s)
        x_s = self.attn(x_m.reshape(batch * num_t, num_s, channels))
        x_s = x_s.reshape(batch, num_t * num_s, channels)
        x = x + self.drop_path(self._gated(x_mask, gate_msa, gate_msa0, x_s, num_t, num_s))

        # temporal attention: every spatial position is a sequence of num_t tokens
        x_m = self._modulated(self.norm_temp(x), x_mask, shift_tmp, scale_tmp, shift_tmp0,
                              scale_tmp0, num_t, num_s)
        x_t = x_m.reshape(batch, num_t, num_s, channels).transpose(0, 2, 1, 3)
        x_t = self.attn_temp(x_t.reshape(batch * num_s, num_t, channels), rope)
        x_t = x_t.reshape(batch, num_s, num_t, channels).transpose(0, 2, 1, 3)
        x_t = x_t.reshape(batch, num_t * num_s, channels)
        x = x + self.drop_path(self._gated(x_mask, gate_tmp, gate_tmp0, x_t, num_t, num_s))

        # cross attention to the caption (no modulation)
        x = x + self.cross_attn(x, y, mask)

        # mlp
        x_m = self._modulated(self.norm2(x), x_mask, shift_mlp, scale_mlp, shift_mlp0,
                              scale_mlp0, num_t, num_s)
        x_mlp = self.mlp(x_m)
        return x + self.drop_path(self._gated(x_mask, gate_mlp, gate_mlp0, x_mlp, num_t, num_s))


class STDiT2(nn.Cell):
    """Open-Sora 1.1's STDiT2 (keywords as `STDiT2Config`).

    Extra MindSpore keywords: `attn_backend` ("auto", "math", "chunked", "flash"; "auto" is flash
    on Ascend, math elsewhere), `attn_block_size` (chunked backend) and `enable_recompute`
    (recompute each block in the backward pass instead of storing its activations).
    `enable_flash_attn=True` (Open-Sora's switch) selects `attn_backend="flash"` on Ascend only.
    """

    def __init__(self, input_size: Sequence[int | None] = (None, None, None),
                 input_sq_size: int = 32, in_channels: int = 4,
                 patch_size: Sequence[int] = (1, 2, 2), hidden_size: int = 1152, depth: int = 28,
                 num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 pred_sigma: bool = True, drop_path: float = 0.0,
                 no_temporal_pos_emb: bool = False, caption_channels: int = 4096,
                 model_max_length: int = 120, freeze: str | None = None, qk_norm: bool = False,
                 enable_flash_attn: bool = False, enable_layernorm_kernel: bool = False,
                 attn_backend: str = "auto", attn_block_size: int = QUERY_BLOCK_SIZE,
                 enable_recompute: bool = False, **unused: Any) -> None:
        super().__init__()
        if hidden_size % 3:
            raise ValueError(f"STDiT2 needs hidden_size divisible by 3, got {hidden_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        reject_unknown_keywords(unused)
        if enable_flash_attn and device_is_ascend():
            attn_backend = "flash"  # a training-time switch in saved configs: honoured on Ascend
        attn_backend = resolve_backend(attn_backend)
        self.input_size = tuple(input_size)
        self.input_sq_size = input_sq_size
        self.in_channels = in_channels
        self.pred_sigma = pred_sigma
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.attn_backend = attn_backend
        self.config = dict(
            input_size=list(input_size), input_sq_size=input_sq_size, in_channels=in_channels,
            patch_size=list(self.patch_size), hidden_size=hidden_size, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            pred_sigma=pred_sigma, drop_path=drop_path, no_temporal_pos_emb=no_temporal_pos_emb,
            caption_channels=caption_channels, model_max_length=model_max_length, freeze=freeze,
            qk_norm=qk_norm, model_type="STDiT2",
        )

        self.pos_embed = PositionEmbedding2D(hidden_size)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.SequentialCell([nn.SiLU(), nn.Dense(hidden_size, 6 * hidden_size)])
        self.t_block_temp = nn.SequentialCell([nn.SiLU(), nn.Dense(hidden_size, 3 * hidden_size)])
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob,
                                          token_num=model_max_length)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        rates = np.linspace(0, drop_path, depth)
        self.blocks = nn.CellList([
            STDiT2Block(hidden_size, num_heads, mlp_ratio=mlp_ratio, drop_path=float(rates[i]),
                        qk_norm=qk_norm, attn_backend=attn_backend, block_size=attn_block_size)
            for i in range(depth)
        ])
        self.final_layer = T2IFinalLayer(hidden_size, int(np.prod(self.patch_size)),
                                         self.out_channels)
        self.csize_embedder = SizeEmbedder(hidden_size // 3)
        self.ar_embedder = SizeEmbedder(hidden_size // 3)
        self.fl_embedder = SizeEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)

        init_dit_weights(self, temporal_blocks=True)
        if freeze is not None:
            freeze_parameters(self, freeze)
        if enable_recompute:
            for block in self.blocks:
                block.recompute()

    # ---------------------------------------------------------------------------------------

    def get_dynamic_size(self, x: Tensor) -> tuple[int, int, int]:
        """Token grid (T, H, W) after padding the latent up to a multiple of the patch."""
        _, _, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        return (t + (-t) % pt) // pt, (h + (-h) % ph) // ph, (w + (-w) % pw) // pw

    def construct(self, x: Tensor, timestep: Tensor, y: Tensor, mask: Tensor | None = None,
                  x_mask: Tensor | None = None, num_frames: Tensor | None = None,
                  height: Tensor | None = None, width: Tensor | None = None,
                  ar: Tensor | None = None, fps: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W) latent; timestep (B,); y (B, 1, N_tok, C_cap) caption features;
        mask (B, N_tok) valid tokens; x_mask (B, T) True = frame to generate; num_frames,
        height, width, ar, fps (B,) micro-conditions of the original video. Returns
        (B, C_out, T, H, W)."""
        if num_frames is None or height is None or width is None or ar is None or fps is None:
            raise ValueError("STDiT2 needs the micro-conditions num_frames, height, width, ar "
                             "and fps (each a (B,) tensor), as Open-Sora 1.1 passes them")
        batch = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        x = x.astype(dtype)
        y = y.astype(dtype)

        # micro-conditions: resolution + aspect ratio condition the spatial modulation,
        # number of frames + fps the temporal one
        hw = ops.stack([height, width], axis=1).astype(dtype)
        csize = self.csize_embedder(hw, batch)
        ar_emb = self.ar_embedder(ar.astype(dtype)[:, None], batch)
        data_info = ops.cat([csize, ar_emb], axis=1)
        fl = self.fl_embedder(num_frames.astype(dtype)[:, None], batch)
        fl = fl + self.fps_embedder(fps.astype(dtype)[:, None], batch)

        # positions: sin-cos over the patch grid, stretched to `base_size` and scaled by the
        # resolution relative to input_sq_size
        _, _, t_in, h_in, w_in = x.shape
        num_t, num_h, num_w = self.get_dynamic_size(x)
        num_s = num_h * num_w
        resolution = ops.sqrt(height[0].astype(ms.float32) * width[0].astype(ms.float32))
        scale = resolution / self.input_sq_size
        base_size = round(num_s**0.5)
        pos_emb = self.pos_embed(num_h, num_w, scale, base_size).astype(dtype)

        x = self.x_embedder(x)  # (B, T*S, C)
        x = x.reshape(batch, num_t, num_s, -1) + pos_emb[:, None]
        x = x.reshape(batch, num_t * num_s, -1)

        # adaLN-single inputs
        t = self.t_embedder(timestep)
        t_spc_mlp = self.t_block(t + data_info)
        t_tmp_mlp = self.t_block_temp(t + fl)
        t0_spc = t0_spc_mlp = t0_tmp_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(ops.zeros_like(timestep))
            t0_spc = t0 + data_info
            t0_spc_mlp = self.t_block(t0_spc)
            t0_tmp_mlp = self.t_block_temp(t0 + fl)
            x_mask = x_mask.astype(ms.bool_)

        # caption tokens (B, N_tok, C) and their mask
        y = self.y_embedder(y, self.training)
        y = y.reshape(batch, -1, self.hidden_size)
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            if mask.shape[0] != batch:
                mask = ops.tile(mask, (batch // mask.shape[0], 1))

        rope = (*self.rope.cos_sin(num_t, x.dtype), self.rope.rotation)
        for block in self.blocks:
            x = block(x, y, t_spc_mlp, t_tmp_mlp, mask, x_mask, t0_spc_mlp, t0_tmp_mlp,
                      num_t, num_s, rope)

        x = self.final_layer(x, t, x_mask, t0_spc, num_t, num_s)
        x = self.unpatchify(x, num_t, num_h, num_w, t_in, h_in, w_in)
        return x.astype(ms.float32)

    def unpatchify(self, x: Tensor, num_t: int, num_h: int, num_w: int, t_in: int, h_in: int,
                   w_in: int) -> Tensor:
        """``(B, T'*H'*W', pt*ph*pw*C_out)`` tokens -> (B, C_out, T, H, W), cropping any padding."""
        return unpatchify_tokens(x, self.patch_size, self.out_channels, (num_t, num_h, num_w),
                          (t_in, h_in, w_in))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> STDiT2:
        """Load an `hpcai-tech/OpenSora-STDiT-v2-stage3` folder (config.json + model.safetensors)
        or a bare weights file (shapes inferred from the tensors), strictly."""
        return load_pretrained(cls, path, infer_stdit2_config, overrides)


def infer_stdit2_config(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """Shape keywords of an STDiT2 read off its tensors (for a weights file without config)."""
    proj = state["x_embedder.proj.weight"]
    hidden, in_channels = int(proj.shape[0]), int(proj.shape[1])
    patch = [int(p) for p in proj.shape[2:]]
    head_dim = 2 * int(state["rope.freqs"].shape[0])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = int(state["final_layer.linear.weight"].shape[0]) // int(np.prod(patch))
    null = state["y_embedder.y_embedding"]
    return dict(
        in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        num_heads=hidden // head_dim, pred_sigma=out == 2 * in_channels,
        mlp_ratio=int(state["blocks.0.mlp.fc1.weight"].shape[0]) / hidden,
        caption_channels=int(null.shape[1]), model_max_length=int(null.shape[0]),
        qk_norm="blocks.0.attn.q_norm.weight" in state,
    )
