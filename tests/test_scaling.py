"""opensora.parallel.scaling: the closed forms against the real model and against hand counts."""

from __future__ import annotations

import pytest

from opensora.models.stdit2 import STDiT2
from opensora.parallel.scaling import (
    PUBLISHED,
    Hardware,
    STDiT2Shape,
    TrainSetup,
    allreduce_seconds,
    calibrate_mfu,
    memory_per_device,
    scaling_table,
    step_time,
)


@pytest.mark.parametrize("qk_norm,mlp_ratio", [(True, 4.0), (False, 2.0)])
def test_parameter_count_matches_the_model(qk_norm: bool, mlp_ratio: float) -> None:
    cfg = dict(hidden_size=48, depth=2, num_heads=4, caption_channels=32, model_max_length=8,
               qk_norm=qk_norm, mlp_ratio=mlp_ratio)
    net = STDiT2(**cfg)
    shape = STDiT2Shape(hidden_size=48, depth=2, num_heads=4, caption_channels=32,
                        text_tokens=8, qk_norm=qk_norm, mlp_ratio=mlp_ratio)
    assert shape.parameters() == sum(p.size for p in net.trainable_params())


def test_xl_model_size_and_token_counts() -> None:
    xl = STDiT2Shape()
    assert 7.0e8 < xl.parameters() < 8.0e8  # STDiT2-XL/2 is a ~0.7B model
    assert xl.tokens(16, 512, 512) == (16, 1024)  # VAE /8 then patch 2x2
    assert xl.tokens(64, 512, 512) == (64, 1024)


def test_forward_flops_scale_with_the_batch_and_the_clip() -> None:
    """The counts themselves are checked against real matmuls in test_shapes.py."""
    m = STDiT2Shape()
    assert m.forward_flops(16, 512, 512, batch=3) == 3 * m.forward_flops(16, 512, 512)
    assert 3.9 < m.forward_flops(64, 512, 512) / m.forward_flops(16, 512, 512) < 5.0


def test_optimizer_parallel_divides_only_the_optimizer_state() -> None:
    m = STDiT2Shape()
    one = memory_per_device(m, TrainSetup(devices=8))
    sharded = memory_per_device(m, TrainSetup(devices=8, optimizer_parallel=True))
    assert sharded.optimizer_state == pytest.approx(one.optimizer_state / 8)
    assert (sharded.weights, sharded.gradients, sharded.ema, sharded.activations) == (
        one.weights, one.gradients, one.ema, one.activations)
    assert one.optimizer_state == 8 * m.parameters()  # two fp32 moments


def test_recompute_keeps_block_inputs_plus_one_block() -> None:
    m = STDiT2Shape()
    full = memory_per_device(m, TrainSetup(recompute=False))
    rec = memory_per_device(m, TrainSetup(recompute=True))
    block = m.block_activation_elements(16, 512, 512) * 2
    assert full.activations == pytest.approx(m.depth * block)
    assert rec.activations == pytest.approx(m.depth * 16 * 1024 * 1152 * 2 + block)
    assert rec.activations < full.activations / 10
    no_flash = memory_per_device(m, TrainSetup(recompute=False, flash_attention=False))
    probs = m.num_heads * (16 * 1024**2 + 1024 * 16**2 + 16 * 1024 * 200)
    assert no_flash.activations - full.activations == pytest.approx(m.depth * probs * 2)


def test_ring_allreduce_volume() -> None:
    hw = Hardware(intra_node_gbs=10.0, inter_node_gbs=1.0, devices_per_node=8)
    assert allreduce_seconds(1e9, 1, hw) == 0.0
    assert allreduce_seconds(1e9, 2, hw) == pytest.approx(0.1)  # 2 * 1/2 * 1 GB / 10 GB/s
    assert allreduce_seconds(1e9, 8, hw) == pytest.approx(2 * 7 / 8 / 10)
    assert allreduce_seconds(1e9, 16, hw) == pytest.approx(2 * 15 / 16)  # crosses nodes


def test_recompute_costs_one_extra_forward() -> None:
    m, hw = STDiT2Shape(), Hardware()
    a = step_time(m, TrainSetup(recompute=False), hw, mfu=0.2).compute
    b = step_time(m, TrainSetup(recompute=True), hw, mfu=0.2).compute
    assert b / a == pytest.approx(4 / 3)


def test_calibration_reproduces_the_published_single_npu_step() -> None:
    m, hw = STDiT2Shape(), Hardware()
    one_npu = PUBLISHED[0]
    setup = TrainSetup(frames=16, devices=1)
    mfu = calibrate_mfu(m, setup, hw, one_npu.seconds_per_step)
    assert 0.0 < mfu < 1.0
    assert step_time(m, setup, hw, mfu).total == pytest.approx(one_npu.seconds_per_step)
    with pytest.raises(ValueError, match="below the non-compute time"):
        calibrate_mfu(m, setup, hw, 1e-4)


def test_frame_scaling_agrees_with_the_published_8_npu_ratio() -> None:
    """Published 8-NPU runs: 2.00 s at 16 frames, 8.30 s at 64. The model's ratio must be
    within 10% of that (the absolute time depends on the software version's MFU)."""
    m, hw = STDiT2Shape(), Hardware()
    t16 = step_time(m, TrainSetup(frames=16, devices=8), hw, 0.15).total
    t64 = step_time(m, TrainSetup(frames=64, devices=8), hw, 0.15).total
    assert t64 / t16 == pytest.approx(8.30 / 2.00, rel=0.1)


def test_scaling_table_covers_the_grid_and_flags_memory() -> None:
    m, hw = STDiT2Shape(), Hardware()
    rows = scaling_table(m, hw, mfu=0.15, devices=(1, 8, 64))
    assert len(rows) == 3 * 2 * 2 * 2
    by = {(r.devices, r.frames, r.optimizer_parallel, r.recompute): r for r in rows}
    assert not by[(1, 64, False, False)].fits  # 64 frames without recompute: > 64 GB
    assert by[(8, 64, True, True)].fits
    assert by[(64, 16, True, True)].memory_gb["optimizer_state"] < by[
        (1, 16, True, True)].memory_gb["optimizer_state"]
    assert by[(64, 16, False, True)].samples_per_s > 40 * by[(1, 16, False, True)].samples_per_s
    total = by[(8, 16, False, True)].memory_gb
    assert total["total"] == pytest.approx(sum(v for k, v in total.items() if k != "total"))
