"""Profiling tools: attention FLOPs and memory in closed form, the timer drops its warm-up calls,
the memory meter sees a 200 MB allocation and not a 1 MB one, and the MindSpore profiler wrapper
returns the operators of a small cell without a warning of its own."""

from __future__ import annotations

import time

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from opensora import profiling

# ---------------------------------------------------------------------------------------------
# FLOP counts


def test_attention_flops_by_hand() -> None:
    # q (2, 4) k (3, 4): QK^T has 2*3 entries of 4 multiply-adds; PV (2, 3)@(3, 4) has 2*4
    # entries of 3 multiply-adds: (24 + 24) multiply-adds = 96 FLOPs per head
    assert profiling.attention_flops(2, 3, head_dim=4) == 96
    assert profiling.attention_flops(2, 3, head_dim=4, heads=5, batch=2) == 96 * 10
    assert profiling.attention_flops(7, head_dim=1) == 4 * 49


def test_attention_memory_model_rejects_unknown_backends() -> None:
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


def test_profile_operators_returns_the_operators_of_a_cell(tmp_path, capfd) -> None:
    cell = _MatmulCell()
    x = ms.Tensor(np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32))
    rows = profiling.profile_operators(cell, x, steps=2, top=None, output_dir=tmp_path)
    assert "[WARNING]" not in capfd.readouterr().err  # the schedule has its warmup step
    by_type = {row["op_type"]: row for row in rows}
    assert any("MatMul" in name for name in by_type), by_type
    assert by_type["ReLU"]["calls"] == 2  # the warmup call ran unrecorded
    with pytest.raises(ValueError, match="warmup"):
        profiling.profile_operators(cell, x, warmup=0)
    assert rows == sorted(rows, key=lambda r: r["total_ms"], reverse=True)
    assert abs(sum(row["percent"] for row in rows) - 100.0) < 1e-6
    assert profiling.read_operator_table(tmp_path) == rows  # the raw profile was kept
    text = profiling.format_table(rows, ["op_type", "calls", "total_ms"])
    assert text.splitlines()[0].split() == ["op_type", "calls", "total_ms"]
    assert "ReLU" in text


def test_read_operator_table_explains_an_empty_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="cpu_op_type_info"):
        profiling.read_operator_table(tmp_path)
