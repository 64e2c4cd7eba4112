"""opensora.parallel: sharding, optimizer partition, launcher, and the equivalence proof.

The slow tests run real msrun jobs with 2 CPU workers and show that W workers with batch B
each end with the same parameters as one process with batch W*B, with and without the
sharded optimizer state.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from numerics import assert_f32_close
from parallel_demo import TinyMLP, train_demo

from opensora.parallel import (
    ParallelInfo,
    ShardedOptimizer,
    gather_step_times,
    gradient_reducer,
    init_parallel,
    launched_by_msrun,
    partition_parameters,
    rank_zero_only,
    shard_batch,
    shard_indices,
    shard_plan,
)
from opensora.parallel import context as parallel_context
from opensora.parallel.launch import LaunchError, _last_error, launch
from opensora.parallel.launch import main as launch_main

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "tests" / "parallel_demo.py")  # a worker script, only the tests use it


# ---------------------------------------------------------------- sharding


def test_shard_indices_partitions_evenly_and_drops_the_tail() -> None:
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shards, [])) == list(range(9))
    assert shard_indices(10, 1, 3, drop_remainder=False) == [1, 4, 7]
    assert shard_indices(10, 0, 3, drop_remainder=False) == [0, 3, 6, 9]
    assert shard_indices(["a", "b", "c", "d"], 1, 2) == ["b", "d"]


def test_shards_of_consecutive_batches_rebuild_the_global_batch() -> None:
    world, per_rank = 2, 3
    for step in range(4):
        global_batch = list(range(step * world * per_rank, (step + 1) * world * per_rank))
        parts = [shard_batch(global_batch, r, world) for r in range(world)]
        assert all(len(p) == per_rank for p in parts)
        assert sorted(sum(map(list, parts), [])) == global_batch


def test_shard_batch_rejects_uneven_batches_and_bad_ranks() -> None:
    with pytest.raises(ValueError, match="multiple of the number of workers"):
        shard_batch([1, 2, 3], 0, 2)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard_indices(4, 2, 2)


def test_shard_plan_slices_every_step() -> None:
    @dataclasses.dataclass(frozen=True)
    class Spec:
        epoch: int
        indices: tuple[int, ...]

    plan = [Spec(0, (5, 1, 7, 2)), Spec(1, (0, 3, 4, 6))]
    assert shard_plan(plan, 1, 2) == [Spec(0, (1, 2)), Spec(1, (3, 6))]


# ---------------------------------------------------------------- optimizer partition


def test_partition_balances_sizes_and_is_deterministic() -> None:
    sizes = [4096, 1024, 512, 64, 64, 8]
    owner = partition_parameters(sizes, 2)
    assert owner == partition_parameters(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert load == [4096, 1672]  # the big matrix alone; everything else on rank 1
    assert partition_parameters([3, 3, 3, 3], 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot shard 2 parameters over 3 ranks"):
        partition_parameters([1, 2], 3)


def test_sharded_optimizer_alone_equals_the_plain_optimizer() -> None:
    """World size 1: the wrapper must be exactly the optimizer it wraps."""
    results = []
    for sharded in (False, True):
        res = train_demo(ParallelInfo(), steps=3, global_batch=4, optimizer_parallel=sharded)
        results.append(res)
    for name, value in results[0].params.items():
        np.testing.assert_array_equal(value, results[1].params[name])
    assert results[0].state_elements == results[1].state_elements == 2 * sum(
        v.size for v in results[0].params.values())


def test_sharded_optimizer_holds_state_for_owned_parameters_only() -> None:
    net = TinyMLP()
    params = net.trainable_params()
    info = ParallelInfo(rank=1, world_size=2, optimizer_parallel=True)
    opt = ShardedOptimizer(params, lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-3), info)
    owned = [params[i] for i in opt.owned]
    assert opt.owner == partition_parameters([p.size for p in params], 2)
    assert opt.state_size() == 2 * sum(p.size for p in owned)
    assert opt.state_size() < 2 * sum(p.size for p in params)


def test_sharded_state_round_trips_through_the_unsharded_names() -> None:
    net = TinyMLP()
    params = net.trainable_params()
    make = lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-3)  # noqa: E731
    alone = ShardedOptimizer(params, make, ParallelInfo(0, 1, True))
    plain = nn.AdamWeightDecay(params, learning_rate=1e-3)
    plain_names = {p.name for p in plain.get_parameters()} - {p.name for p in params}
    rng = np.random.default_rng(0)
    state = alone.gather_state()
    full = {n: (rng.standard_normal(state[n].shape) * 10).astype(state[n].dtype)
            for n in plain_names}
    alone.load_state(full)
    assert set(alone.gather_state()) == plain_names
    for name, value in alone.gather_state().items():
        np.testing.assert_array_equal(value.reshape(-1), full[name].reshape(-1))
    # rank 1 of 2 takes only the moments of the parameters it owns
    second = ShardedOptimizer(params, make, ParallelInfo(1, 2, True))
    second.load_state(full)
    inner = {p.name: p.asnumpy() for p in second.inner.get_parameters()}
    for i in second.owned:
        key = f"adam_m.{params[i].name}"
        np.testing.assert_array_equal(inner[key], full[key].reshape(inner[key].shape))
    assert not any(f"adam_m.{params[i].name}" in inner
                   for i in range(len(params)) if i not in second.owned)
    with pytest.raises(KeyError, match="optimizer state lacks"):
        second.load_state({})


# ---------------------------------------------------------------- context and helpers


def test_msrun_detection_reads_the_environment() -> None:
    env = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2", "MS_SCHED_HOST": "127.0.0.1",
           "MS_SCHED_PORT": "8118"}
    assert launched_by_msrun(env)
    assert launched_by_msrun({**env, "MS_ROLE": "MS_SCHED"})
    assert not launched_by_msrun({k: v for k, v in env.items() if k != "MS_SCHED_PORT"})
    assert not launched_by_msrun({})


def test_single_process_init_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in parallel_context.MSRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(parallel_context, "_STATE", {})
    info = init_parallel(optimizer_parallel=True)
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert init_parallel() is info  # a second call returns the first result
    assert ms.get_auto_parallel_context("parallel_mode") == "stand_alone"
    np.testing.assert_allclose(gather_step_times(0.25, info), [0.25])
    assert rank_zero_only(lambda: "written")() == "written"
    grads = (ms.Tensor(np.ones(3, np.float32)),)
    assert gradient_reducer(TinyMLP().trainable_params(), info)(grads)[0].shape == (3,)


def test_rank_zero_only_skips_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_context, "_STATE", {"info": ParallelInfo(1, 2)})
    calls = []
    assert rank_zero_only(calls.append)("x") is None
    assert calls == []


def test_native_optimizer_parallel_needs_the_sharding_flag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel_context, "_STATE", {})
    with pytest.raises(ValueError, match="needs optimizer_parallel=True"):
        init_parallel(native_optimizer_parallel=True)


# ---------------------------------------------------------------- launcher (fast paths)


def test_launcher_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="nothing to run"):
        launch([], workers=2)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        launch(["x.py"], workers=0)
    assert launch_main(["--workers", "2"]) == 2  # no "--": usage, exit code 2


def test_last_error_finds_the_exception_line() -> None:
    log = "ok\nTraceback (most recent call last):\n  File x\nValueError: bad shape\nmore\n"
    assert _last_error(log) == "ValueError: bad shape"
    assert _last_error("all fine\n") is None


# ---------------------------------------------------------------- msrun jobs (slow)

STEPS, GLOBAL_BATCH = 4, 8


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("dp") / "two.npz"
    lines: list[str] = []
    launch([DEMO, "--steps", str(STEPS), "--global-batch",
            str(GLOBAL_BATCH), "--variants", "plain,sharded", "--out", str(out)],
           workers=2, timeout=60, emit=lines.append)
    assert any(ln.startswith("[rank 1] [sharded]") for ln in lines), lines
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "sharded"])
def test_two_workers_equal_one_process_with_the_global_batch(
        two_worker_run: dict[str, np.ndarray], variant: str) -> None:
    single = train_demo(ParallelInfo(), STEPS, GLOBAL_BATCH)
    assert int(two_worker_run["world_size"]) == 2
    # gradients summed in another order, then 4 Adam steps, which divide by sqrt(v): ~1e3
    # float32 roundings of each tensor's magnitude
    for name, value in single.params.items():
        assert_f32_close(two_worker_run[f"{variant}/param/{name}"], value, 1024,
                         err_msg=f"{variant} {name}")
    np.testing.assert_allclose(two_worker_run[f"{variant}/losses"], single.losses, rtol=1e-5)
    # gathered from both ranks if sharded; the all-reduce sums half-batch gradients in another
    # order, so an element that nearly cancels differs by float32 rounding of the largest terms
    for name, value in single.optimizer_state.items():
        assert_f32_close(two_worker_run[f"{variant}/state/{name}"].reshape(-1), value.reshape(-1),
                         1024, err_msg=name)
    # the parameters did move: equality is not that of two untouched copies
    start = TinyMLP().trainable_params()
    assert not np.allclose(single.params["fc1.weight"], start[0].asnumpy())
    assert two_worker_run[f"{variant}/step_times"].shape == (STEPS, 2)


@pytest.mark.slow
def test_optimizer_parallel_splits_the_state(two_worker_run: dict[str, np.ndarray]) -> None:
    full = 2 * sum(v.size for k, v in two_worker_run.items() if k.startswith("plain/param/"))
    assert int(two_worker_run["plain/state_elements"]) == full
    assert int(two_worker_run["sharded/state_elements"]) < full  # rank 0's share


@pytest.mark.slow
def test_launcher_names_the_rank_that_raised(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "opensora.parallel.launch", "--workers", "2", "--timeout", "60",
         "--log-dir", str(tmp_path), "--", DEMO, "--steps", "2",
         "--fail-on-rank", "1", "--out", str(tmp_path / "never.npz")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "worker rank(s) [1] failed" in proc.stderr
    assert "deliberate failure on rank 1" in proc.stderr
    assert "[rank 1] RuntimeError: deliberate failure" in proc.stdout
    assert not (tmp_path / "never.npz").exists()


@pytest.mark.slow
def test_launcher_times_out_a_hung_job_and_names_the_ranks(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match=r"timed out after 3 s; rank\(s\) \[") as info:
        launch([DEMO, "--steps", "2", "--hang-on-rank", "1",
                "--out", str(tmp_path / "never.npz")], workers=2, timeout=3,
               log_dir=tmp_path, emit=lambda line: None)
    assert info.value.returncode == 124
    assert 1 in info.value.ranks
