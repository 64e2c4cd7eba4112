"""Profiling tools: FLOP counts agree with the matmuls the model really runs, the timer drops its
warm-up calls, the memory meter sees a 200 MB allocation and not a 1 MB one, and the MindSpore
profiler wrapper returns the operators of a small cell."""

from __future__ import annotations

import time

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import opensora.models.layers as layers
from opensora import profiling
from opensora.models.stdit2 import STDiT2

TINY = dict(input_sq_size=16, in_channels=4, patch_size=(1, 2, 2), hidden_size=24, depth=2,
            num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.0, pred_sigma=True,
            caption_channels=8, model_max_length=5, qk_norm=True, attn_backend="math")


# ---------------------------------------------------------------------------------------------
# FLOP counts


def test_attention_flops_by_hand() -> None:
    # q (2, 4) k (3, 4): QK^T has 2*3 entries of 4 multiply-adds; PV (2, 3)@(3, 4) has 2*4
    # entries of 3 multiply-adds: (24 + 24) multiply-adds = 96 FLOPs per head
    assert profiling.attention_flops(2, 3, head_dim=4) == 96
    assert profiling.attention_flops(2, 3, head_dim=4, heads=5, batch=2) == 96 * 10
    assert profiling.attention_flops(7, head_dim=1) == 4 * 49


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
    flops = profiling.stdit2_flops(TINY, latent, batch)
    assert counted[(6, 6)] == flops["spatial_attn.core"]
    assert counted[(3, 3)] == flops["temporal_attn.core"]
    assert counted[(18, 5)] == flops["cross_attn.core"]
    dense_parts = sum(v for k, v in flops.items() if not k.endswith(".core"))
    assert counted["dense"] == dense_parts - flops["patch_embed"]
    # the patch embedding is one (N, C*pt*ph*pw) @ (C*pt*ph*pw, D) matmul per sample
    assert flops["patch_embed"] == batch * 2 * 18 * (4 * 4) * 24
    # a model, a config dict and its .config give the same count
    assert profiling.stdit2_flops(model, latent, batch) == flops


def test_train_flops_and_recompute() -> None:
    latent = (4, 8, 8)
    forward = profiling.stdit2_flops("tiny", latent)
    plain = profiling.stdit2_train_flops("tiny", latent)
    recompute = profiling.stdit2_train_flops("tiny", latent, recompute=True)
    assert plain == {k: 3 * v for k, v in forward.items()}
    blocks = sum(v for k, v in forward.items() if k.startswith(profiling.BLOCK_PARTS))
    assert sum(recompute.values()) - sum(plain.values()) == blocks
    assert recompute["patch_embed"] == plain["patch_embed"]


def test_spatial_over_temporal_cost_is_tokens_per_frame_over_frames() -> None:
    for frames in (16, 64):
        latent = profiling.video_latent_shape(frames, 512, 512)
        assert latent == (frames, 64, 64)
        flops = profiling.stdit2_flops("STDiT2-XL/2", latent)
        t, s = profiling.stdit2_tokens(latent, (1, 2, 2))
        assert (t, s) == (frames, 1024)
        assert flops["spatial_attn.core"] * t == flops["temporal_attn.core"] * s
        assert flops["spatial_attn.linear"] == flops["temporal_attn.linear"]


def test_flop_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        profiling.stdit2_flops("tiny", (8, 8))
    with pytest.raises(KeyError, match="unknown preset"):
        profiling.stdit2_flops("no-such-preset", (1, 8, 8))
    with pytest.raises(ValueError, match="backend"):
        profiling.attention_memory_bytes("flash", 16)


def test_attention_memory_model() -> None:
    assert profiling.attention_memory_bytes("math", 1024, heads=2) == 2 * 1024 * 1024 * 4
    # one 128-row query block against all 1024 keys (below the 4096-key block)
    assert profiling.attention_memory_bytes("chunked", 1024, heads=2, block_size=128) == \
        2 * 128 * 1024 * 4
    assert profiling.attention_memory_bytes("chunked", 1024, heads=2, block_size=128,
                                            key_block_size=256) == 2 * 128 * 256 * 4


# ---------------------------------------------------------------------------------------------
# timing


def test_time_call_excludes_warmup_and_reports_median() -> None:
    calls = []

    def fn(delay: float) -> None:
        time.sleep(0.3 if not calls else delay)  # only the first call is slow
        calls.append(1)

    stats = profiling.time_call(fn, 0.01, warmup=1, repeat=5)
    assert len(calls) == 6 and stats.repeat == 5 and stats.warmup == 1
    assert 0.01 <= stats.min_s <= stats.median_s <= stats.max_s < 0.3
    assert stats.median_s == sorted(stats.times_s)[2]
    assert stats.as_dict()["median_s"] == stats.median_s
    cold = profiling.time_call(lambda: (calls.clear(), fn(0.0)), warmup=0, repeat=1)
    assert cold.median_s >= 0.3
    with pytest.raises(ValueError, match="repeat"):
        profiling.time_call(fn, 0.0, repeat=0)


# ---------------------------------------------------------------------------------------------
# peak memory


@pytest.mark.slow
def test_peak_memory_sees_a_large_allocation_and_not_a_small_one() -> None:
    large = profiling.peak_memory(profiling.allocation_workload, nbytes=200_000_000)
    small = profiling.peak_memory(profiling.allocation_workload, nbytes=1_000_000)
    assert large.ok and small.ok, (large.error, small.error)
    assert large.method == "reset"
    assert 195e6 <= large.peak_bytes <= 215e6, large
    assert small.peak_bytes <= 8e6, small
    assert large.peak_rss_bytes - large.baseline_rss_bytes == large.peak_bytes


@pytest.mark.slow
def test_peak_memory_baseline_method_and_failures() -> None:
    large = profiling.peak_memory(profiling.allocation_workload, method="baseline",
                                  nbytes=200_000_000)
    assert large.ok and large.method == "baseline"
    assert 190e6 <= large.peak_bytes <= 215e6, large
    failed = profiling.peak_memory(profiling.allocation_workload, nbytes=-1)
    assert not failed.ok and "ValueError" in failed.error and failed.peak_bytes is None
    assert "failed" in str(failed)


def test_peak_memory_rejects_what_cannot_be_sent_to_a_child() -> None:
    with pytest.raises(ValueError, match="module-level"):
        profiling.peak_memory(lambda: (lambda: None))
    with pytest.raises(ValueError, match="method"):
        profiling.peak_memory(profiling.allocation_workload, method="guess", nbytes=1)


# ---------------------------------------------------------------------------------------------
# the MindSpore profiler


class _MatmulCell(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Dense(64, 64)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return ops.relu(self.dense(x))


def test_profile_operators_returns_the_operators_of_a_cell(tmp_path) -> None:
    cell = _MatmulCell()
    x = ms.Tensor(np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32))
    rows = profiling.profile_operators(cell, x, steps=2, top=None, output_dir=tmp_path)
    by_type = {row["op_type"]: row for row in rows}
    assert any("MatMul" in name for name in by_type), by_type
    assert by_type["ReLU"]["calls"] == 2
    assert rows == sorted(rows, key=lambda r: r["total_ms"], reverse=True)
    assert abs(sum(row["percent"] for row in rows) - 100.0) < 1e-6
    assert profiling.read_operator_table(tmp_path) == rows  # the raw profile was kept
    text = profiling.format_table(rows, ["op_type", "calls", "total_ms"])
    assert text.splitlines()[0].split() == ["op_type", "calls", "total_ms"]
    assert "ReLU" in text


def test_read_operator_table_explains_an_empty_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="cpu_op_type_info"):
        profiling.read_operator_table(tmp_path)
