"""Closed-form sizes: parameter counts equal the real state dicts (the reference checkpoints and
the built presets), and FLOP counts equal the matmuls the model really runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import nn

import opensora.models.layers as layers
from opensora import profiling
from opensora.checkpoint import read_state_dict
from opensora.models import shapes
from opensora.models.stdit2 import STDiT2
from opensora.parallel.scaling import STDiT2Shape
from opensora.presets import build_model, count_model_parameters, get_preset

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = dict(input_sq_size=16, in_channels=4, patch_size=(1, 2, 2), hidden_size=24, depth=2,
            num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0, pred_sigma=True,
            caption_channels=8, model_max_length=5, qk_norm=True, attn_backend="math")


def _values(state: dict) -> int:
    return sum(int(np.prod(np.shape(v))) for v in state.values())


# ---------------------------------------------------------------------------------------------
# parameters


def test_stdit_count_equals_the_reference_checkpoint_and_the_xl_preset() -> None:
    folder = REFERENCE / "stdit_tiny"
    config = json.loads((folder / "config.json").read_text())
    assert shapes.count_stdit_parameters(**config) == _values(read_state_dict(folder))
    xl = count_model_parameters("STDiT-XL/2")
    assert 700e6 < xl < 800e6, xl  # 761.3M with the 16x64x64 position tables


def test_stdit2_count_equals_the_reference_checkpoint_and_the_built_presets() -> None:
    folder = REFERENCE / "stdit2_tiny"
    config = json.loads((folder / "config.json").read_text())
    assert shapes.count_stdit2_parameters(**config) == _values(read_state_dict(folder))
    tiny = build_model("tiny", attn_backend="math")
    assert count_model_parameters("tiny") == sum(
        int(np.prod(p.shape)) for _, p in tiny.parameters_and_names())
    xl = count_model_parameters("STDiT2-XL/2")
    assert 700e6 < xl < 800e6, xl  # 768.3M: PixArt-XL blocks + temporal attention


def test_trainable_count_is_what_the_optimizer_holds() -> None:
    model = STDiT2(**TINY)
    trainable = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    assert shapes.count_stdit2_trainable(**TINY) == trainable
    frozen = _values({p.name: p for p in model.get_parameters() if not p.requires_grad})
    assert shapes.stdit2_buffer_count(**TINY) == frozen


def test_the_scaling_model_counts_through_the_same_formulas() -> None:
    shape = STDiT2Shape(hidden_size=24, depth=2, num_heads=2, mlp_ratio=2.0, caption_channels=8,
                        text_tokens=5, qk_norm=True)
    assert shape.parameters() == shapes.count_stdit2_trainable(**TINY)
    assert shape.forward_flops(3, 32, 48) == sum(shapes.stdit2_flops(TINY, (3, 4, 6)).values())


# ---------------------------------------------------------------------------------------------
# FLOPs


def _count_model_matmuls(monkeypatch: pytest.MonkeyPatch, model: nn.Cell,
                         inputs: dict) -> dict[str, int]:
    """Run the model in PyNative with every nn.Dense and attention call counted from the
    shapes it actually sees; attention is keyed by (N_q, N_k)."""
    counts: dict = {"dense": 0}
    dense_construct = nn.Dense.construct
    attention = layers.attention

    def counting_dense(self, x):
        rows = int(np.prod(x.shape[:-1]))
        counts["dense"] += 2 * rows * self.in_channels * self.out_channels
        return dense_construct(self, x)

    def counting_attention(q, k, v, *args, **kwargs):
        batch, heads, n_q, dim = q.shape
        key = (n_q, k.shape[-2])
        counts[key] = counts.get(key, 0) + 4 * batch * heads * n_q * k.shape[-2] * dim
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(nn.Dense, "construct", counting_dense)
    monkeypatch.setattr(layers, "attention", counting_attention)
    model(**inputs)
    return counts


def test_stdit2_flops_match_the_matmuls_the_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    latent = (3, 4, 6)  # T'=3 frames of S=2*3=6 tokens; 5 caption tokens: all lengths differ
    batch = 2
    model = STDiT2(**TINY)
    counted = _count_model_matmuls(monkeypatch, model,
                                   profiling.stdit2_step_inputs(TINY, latent, batch))
    flops = shapes.stdit2_flops(TINY, latent, batch)
    assert counted[(6, 6)] == flops["spatial_attn.core"]
    assert counted[(3, 3)] == flops["temporal_attn.core"]
    assert counted[(18, 5)] == flops["cross_attn.core"]
    dense_parts = sum(v for k, v in flops.items() if not k.endswith(".core"))
    assert counted["dense"] == dense_parts - flops["patch_embed"]
    # the patch embedding is one (N, C*pt*ph*pw) @ (C*pt*ph*pw, D) matmul per sample
    assert flops["patch_embed"] == batch * 2 * 18 * (4 * 4) * 24
    # a model, a config dict and its .config give the same count
    assert shapes.stdit2_flops(model, latent, batch) == flops


def test_train_flops_and_recompute() -> None:
    latent = (4, 8, 8)
    forward = shapes.stdit2_flops(get_preset("tiny").model, latent)
    plain = shapes.stdit2_train_flops(get_preset("tiny").model, latent)
    recompute = shapes.stdit2_train_flops(get_preset("tiny").model, latent, recompute=True)
    assert plain == {k: 3 * v for k, v in forward.items()}
    blocks = sum(v for k, v in forward.items() if k.startswith(shapes.BLOCK_PARTS))
    assert sum(recompute.values()) - sum(plain.values()) == blocks
    assert recompute["patch_embed"] == plain["patch_embed"]


def test_spatial_over_temporal_cost_is_tokens_per_frame_over_frames() -> None:
    for frames in (16, 64):
        latent = profiling.video_latent_shape(frames, 512, 512)
        assert latent == (frames, 64, 64)
        flops = shapes.stdit2_flops(get_preset("STDiT2-XL/2").model, latent)
        t, s = shapes.stdit2_tokens(latent, (1, 2, 2))
        assert (t, s) == (frames, 1024)
        assert flops["spatial_attn.core"] * t == flops["temporal_attn.core"] * s
        assert flops["spatial_attn.linear"] == flops["temporal_attn.linear"]


def test_flop_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        shapes.stdit2_flops(TINY, (8, 8))
    with pytest.raises(TypeError, match="config dict"):
        shapes.stdit2_flops("tiny", (1, 8, 8))
