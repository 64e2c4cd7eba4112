"""STDiT: the diffusion transformer of Open-Sora 1.0 (and what STDiT2 shares with it).

A PixArt-alpha transformer made spatial-temporal: every block runs spatial self-attention within
each frame, temporal self-attention across frames, cross-attention to the T5 caption and an MLP,
modulated by adaLN-single from the timestep. Positions are fixed sin-cos tables (`pos_embed`,
`pos_embed_temporal`), saved in the checkpoint as buffers; the temporal table is added to the
tokens once, before the first block's temporal attention.

Constructor keywords, `construct` arguments and parameter names mirror Open-Sora v1.0.0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, XavierUniform, Zero, initializer

from opensora.checkpoint import load_checkpoint, read_state_dict, resolve_weights_file
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
    T2IFinalLayer,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    sincos_1d,
    t2i_modulate,
    t_mask_select,
)
from opensora.models.ops import expand_to


class STDiTBlock(nn.Cell):
    """Open-Sora 1.0 block. Its temporal branch has no modulation of its own: it reuses the
    spatial gate (`gate_msa`), as the original does."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, attn_backend: str = "math",
                 block_size: int = QUERY_BLOCK_SIZE) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = LayerNorm(hidden_size, eps=1e-6, affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True,
                              attn_backend=attn_backend, block_size=block_size)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads,
                                                  attn_backend=attn_backend,
                                                  block_size=block_size)
        self.norm2 = LayerNorm(hidden_size, eps=1e-6, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.scale_shift_table = Parameter(
            Tensor(np.random.randn(6, hidden_size).astype(np.float32) / hidden_size**0.5),
            name="scale_shift_table")
        self.attn_temp = Attention(hidden_size, num_heads, qkv_bias=True,
                                   attn_backend=attn_backend, block_size=block_size)

    def construct(self, x: Tensor, y: Tensor, t: Tensor, mask: Tensor | None = None,
                  tpe: Tensor | None = None, x_mask: Tensor | None = None,
                  t0: Tensor | None = None, num_t: int = 1, num_s: int = 1) -> Tensor:
        batch, _, channels = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.chunk(
            self.scale_shift_table[None] + t.reshape(batch, 6, -1), 6, axis=1)
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        shift_msa0 = scale_msa0 = gate_msa0 = shift_mlp0 = scale_mlp0 = gate_mlp0 = None
        if x_mask is not None:
            shift_msa0, scale_msa0, gate_msa0, shift_mlp0, scale_mlp0, gate_mlp0 = ops.chunk(
                self.scale_shift_table[None] + t0.reshape(batch, 6, -1), 6, axis=1)
            x_m_zero = t2i_modulate(self.norm1(x), shift_msa0, scale_msa0)
            x_m = t_mask_select(x_mask, x_m, x_m_zero, num_t, num_s)

        # spatial branch
        x_s = self.attn(x_m.reshape(batch * num_t, num_s, channels))
        x_s = x_s.reshape(batch, num_t * num_s, channels)
        if x_mask is not None:
            x_s = t_mask_select(x_mask, expand_to(gate_msa, x_s.shape) * x_s,
                              expand_to(gate_msa0, x_s.shape) * x_s, num_t, num_s)
        else:
            x_s = expand_to(gate_msa, x_s.shape) * x_s
        x = x + self.drop_path(x_s)

        # temporal branch (unnormalised input, spatial gate)
        x_t = x.reshape(batch, num_t, num_s, channels).transpose(0, 2, 1, 3)
        x_t = x_t.reshape(batch * num_s, num_t, channels)
        if tpe is not None:
            x_t = x_t + tpe
        x_t = self.attn_temp(x_t)
        x_t = x_t.reshape(batch, num_s, num_t, channels).transpose(0, 2, 1, 3)
        x_t = x_t.reshape(batch, num_t * num_s, channels)
        x = x + self.drop_path(expand_to(gate_msa, x_t.shape) * x_t)

        # cross attention
        x = x + self.cross_attn(x, y, mask)

        # mlp
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        if x_mask is not None:
            x_m_zero = t2i_modulate(self.norm2(x), shift_mlp0, scale_mlp0)
            x_m = t_mask_select(x_mask, x_m, x_m_zero, num_t, num_s)
        x_mlp = self.mlp(x_m)
        if x_mask is not None:
            x_mlp = t_mask_select(x_mask, expand_to(gate_mlp, x_mlp.shape) * x_mlp,
                                  expand_to(gate_mlp0, x_mlp.shape) * x_mlp, num_t, num_s)
        else:
            x_mlp = expand_to(gate_mlp, x_mlp.shape) * x_mlp
        return x + self.drop_path(x_mlp)


class STDiT(nn.Cell):
    """Open-Sora 1.0's STDiT (keywords as `STDiT(...)` in v1.0.0).

    `input_size` (T, H, W) of the latent fixes the saved position tables; other sizes divisible
    by the patch also work (their tables are computed on the fly with the same formula).
    Extra MindSpore keywords: `attn_backend`, `attn_block_size`, `enable_recompute` (see STDiT2).
    """

    def __init__(self, input_size: Sequence[int] = (1, 32, 32), in_channels: int = 4,
                 patch_size: Sequence[int] = (1, 2, 2), hidden_size: int = 1152, depth: int = 28,
                 num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 pred_sigma: bool = True, drop_path: float = 0.0,
                 no_temporal_pos_emb: bool = False, caption_channels: int = 4096,
                 model_max_length: int = 120, space_scale: float = 1.0, time_scale: float = 1.0,
                 freeze: str | None = None, enable_flashattn: bool = False,
                 attn_backend: str = "auto", attn_block_size: int = QUERY_BLOCK_SIZE,
                 enable_recompute: bool = False, **unused: Any) -> None:
        super().__init__()
        reject_unknown_keywords(unused)
        if enable_flashattn and device_is_ascend():
            attn_backend = "flash"  # a training-time switch in saved configs: honoured on Ascend
        attn_backend = resolve_backend(attn_backend)
        self.input_size = tuple(int(s) for s in input_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.in_channels = in_channels
        self.pred_sigma = pred_sigma
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.depth = depth
        self.space_scale = space_scale
        self.time_scale = time_scale
        self.no_temporal_pos_emb = no_temporal_pos_emb
        self.attn_backend = attn_backend
        self.num_temporal = self.input_size[0] // self.patch_size[0]
        self.grid_hw = (self.input_size[1] // self.patch_size[1],
                        self.input_size[2] // self.patch_size[2])
        self.num_spatial = self.grid_hw[0] * self.grid_hw[1]
        self.config = dict(
            input_size=list(self.input_size), in_channels=in_channels,
            patch_size=list(self.patch_size), hidden_size=hidden_size, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            pred_sigma=pred_sigma, drop_path=drop_path, no_temporal_pos_emb=no_temporal_pos_emb,
            caption_channels=caption_channels, model_max_length=model_max_length,
            space_scale=space_scale, time_scale=time_scale, freeze=freeze, model_type="STDiT",
        )

        # non-trainable tables that Open-Sora saves as buffers
        spatial = get_2d_sincos_pos_embed(hidden_size, self.grid_hw, scale=space_scale)
        temporal = get_1d_sincos_pos_embed(hidden_size, self.num_temporal, scale=time_scale)
        self.pos_embed = Parameter(Tensor(spatial[None].astype(np.float32)), name="pos_embed",
                                   requires_grad=False)
        self.pos_embed_temporal = Parameter(Tensor(temporal[None].astype(np.float32)),
                                            name="pos_embed_temporal", requires_grad=False)
        self.dynamic_pos_embed = PositionEmbedding2D(hidden_size)

        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.SequentialCell([nn.SiLU(), nn.Dense(hidden_size, 6 * hidden_size)])
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob,
                                          token_num=model_max_length)
        rates = np.linspace(0, drop_path, depth)
        self.blocks = nn.CellList([
            STDiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, drop_path=float(rates[i]),
                       attn_backend=attn_backend, block_size=attn_block_size)
            for i in range(depth)
        ])
        self.final_layer = T2IFinalLayer(hidden_size, int(np.prod(self.patch_size)),
                                         self.out_channels)
        init_dit_weights(self, temporal_blocks=True)
        if freeze is not None:
            freeze_parameters(self, freeze)
        if enable_recompute:
            for block in self.blocks:
                block.recompute()

    def construct(self, x: Tensor, timestep: Tensor, y: Tensor, mask: Tensor | None = None,
                  x_mask: Tensor | None = None) -> Tensor:
        """x (B, C, T, H, W); timestep (B,); y (B, 1, N_tok, C_cap); mask (B, N_tok);
        x_mask (B, T) True = frame to generate. Returns (B, C_out, T, H, W)."""
        batch = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        x = x.astype(dtype)
        y = y.astype(dtype)
        _, _, t_in, h_in, w_in = x.shape
        pt, ph, pw = self.patch_size
        num_t = (t_in + (-t_in) % pt) // pt
        num_h, num_w = (h_in + (-h_in) % ph) // ph, (w_in + (-w_in) % pw) // pw
        num_s = num_h * num_w

        x = self.x_embedder(x)
        x = (x.reshape(batch, num_t, num_s, -1) + self._spatial_table(num_h, num_w)[:, None])
        x = x.reshape(batch, num_t * num_s, -1)

        t = self.t_embedder(timestep)
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(ops.zeros_like(timestep))
            t0_mlp = self.t_block(t0)
            x_mask = x_mask.astype(ms.bool_)

        y = self.y_embedder(y, self.training).reshape(batch, -1, self.hidden_size)
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            if mask.shape[0] != batch:
                mask = ops.tile(mask, (batch // mask.shape[0], 1))

        tpe = self._temporal_table(num_t).astype(x.dtype)
        for index, block in enumerate(self.blocks):
            x = block(x, y, t_mlp, mask, tpe if index == 0 else None, x_mask, t0_mlp,
                      num_t, num_s)

        x = self.final_layer(x, t, x_mask, t0, num_t, num_s)
        x = unpatchify_tokens(x, self.patch_size, self.out_channels, (num_t, num_h, num_w),
                       (t_in, h_in, w_in))
        return x.astype(ms.float32)

    def _spatial_table(self, num_h: int, num_w: int) -> Tensor:
        if (num_h, num_w) == self.grid_hw:
            return self.pos_embed
        return self.dynamic_pos_embed(num_h, num_w, self.space_scale, None)

    def _temporal_table(self, num_t: int) -> Tensor:
        if num_t == self.num_temporal:
            return self.pos_embed_temporal
        return sincos_1d(num_t, self.hidden_size, self.time_scale)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> STDiT:
        """Load `OpenSora-v1-*.pth` (or a folder with config.json + weights), strictly.

        A bare file carries no config: shapes are read off its tensors (input_size from the
        position tables); `num_heads` (16 in the published models) can be overridden.
        """
        return load_pretrained(cls, path, infer_stdit_config, overrides)


# --------------------------------------------------------------------------------------------
# shared by STDiT and STDiT2


def unpatchify_tokens(x: Tensor, patch_size: tuple[int, int, int], out_channels: int,
               grid: tuple[int, int, int], size: tuple[int, int, int]) -> Tensor:
    """``(B, T'*H'*W', pt*ph*pw*C_out)`` tokens -> (B, C_out, T, H, W), cropping any padding."""
    num_t, num_h, num_w = grid
    pt, ph, pw = patch_size
    batch = x.shape[0]
    x = x.reshape(batch, num_t, num_h, num_w, pt, ph, pw, out_channels)
    x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    x = x.reshape(batch, out_channels, num_t * pt, num_h * ph, num_w * pw)
    t_in, h_in, w_in = size
    if (t_in, h_in, w_in) != (num_t * pt, num_h * ph, num_w * pw):
        x = x[:, :, :t_in, :h_in, :w_in]
    return x


_IGNORABLE_KEYWORDS = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
    "enable_layernorm_kernel", "enable_sequence_parallelism", "_name_or_path", "qk_norm_legacy",
    "from_pretrained", "type",
}


def reject_unknown_keywords(unused: dict[str, Any]) -> None:
    """Accept config.json bookkeeping keys; refuse keywords the model does not know."""
    unknown = sorted(set(unused) - _IGNORABLE_KEYWORDS)
    if unknown:
        raise TypeError(f"unknown STDiT keyword(s) {unknown}; check the config against "
                        "Open-Sora's STDiT / STDiT2 arguments")
    if unused.get("qk_norm_legacy") is False:
        raise ValueError("qk_norm_legacy=False (qk-norm before RoPE) is a later Open-Sora "
                         "variant; this model implements v1.1.0 (RoPE, then qk-norm)")


def freeze_parameters(model: nn.Cell, freeze: str) -> None:
    """Open-Sora's `freeze`: 'not_temporal' trains only attn_temp, 'text' freezes cross_attn."""
    if freeze not in ("not_temporal", "text"):
        raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {freeze!r}")
    for name, param in model.parameters_and_names():
        if (freeze == "not_temporal" and "attn_temp" not in name) or (
                freeze == "text" and "cross_attn" in name):
            param.requires_grad = False


def _set(param: Parameter, init: Any) -> None:
    param.set_data(initializer(init, param.shape, param.dtype))


def init_dit_weights(model: nn.Cell, temporal_blocks: bool = True) -> None:
    """Open-Sora's initialisation: xavier-uniform linears with zero bias, N(0, 0.02) for the
    timestep and caption MLPs, and zeros for every branch output that should start as identity
    (cross-attention and temporal-attention projections, the final linear)."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, nn.Dense):
            _set(cell.weight, XavierUniform())
            if cell.bias is not None:
                _set(cell.bias, Zero())
    small = [model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1],
             model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2]
    if hasattr(model, "t_block_temp"):
        small.append(model.t_block_temp[1])
    for dense in small:
        _set(dense.weight, Normal(0.02))
    zeroed = [block.cross_attn.proj for block in model.blocks] + [model.final_layer.linear]
    if temporal_blocks:
        zeroed += [block.attn_temp.proj for block in model.blocks]
    for dense in zeroed:
        _set(dense.weight, Zero())
        _set(dense.bias, Zero())


def infer_stdit_config(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """Shape keywords of an STDiT read off its tensors (the .pth files have no config)."""
    proj = state["x_embedder.proj.weight"]
    hidden, in_channels = int(proj.shape[0]), int(proj.shape[1])
    patch = [int(p) for p in proj.shape[2:]]
    side = math.isqrt(int(state["pos_embed"].shape[1]))
    frames = int(state["pos_embed_temporal"].shape[1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = int(state["final_layer.linear.weight"].shape[0]) // int(np.prod(patch))
    null = state["y_embedder.y_embedding"]
    return dict(
        input_size=[frames * patch[0], side * patch[1], side * patch[2]],
        in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        pred_sigma=out == 2 * in_channels,
        mlp_ratio=int(state["blocks.0.mlp.fc1.weight"].shape[0]) / hidden,
        caption_channels=int(null.shape[1]), model_max_length=int(null.shape[0]),
    )


def load_pretrained(cls: type, path: str | os.PathLike,
                    infer_config: Callable[[dict[str, np.ndarray]], dict[str, Any]],
                    overrides: dict[str, Any]) -> Any:
    """Build `cls` from a folder's config.json (or from the tensor shapes) and load strictly."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{cls.__name__} checkpoint not found: {path} (pass a model "
                                "folder with config.json + weights, or a weights file)")
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        state = read_state_dict(resolve_weights_file(path))
    else:
        state = read_state_dict(path)
        config = infer_config(state)
    config.update(overrides)
    model = cls(**config)
    load_checkpoint(model, state, strict=True)
    return model
