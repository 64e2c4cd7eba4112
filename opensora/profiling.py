"""Measuring what attention and a training step cost: wall time, peak memory, FLOPs, and which
operators the time goes to.

- `time_call`: warm-up calls first (first calls compile graphs and initialise kernels), then the
  median of repeated calls, which shrugs off a busy neighbour better than the mean.
- `peak_memory`: the resident-memory high-water mark a call adds, measured in a fresh spawned
  process. A fresh process is needed because MindSpore keeps freed device memory in its pool
  (on CPU too), so a second call of the same size in the same process shows no growth.
- `attention_flops`: the FLOPs of one attention call in closed form (the model's are counted in
  `opensora.models.shapes`), so shapes far too large to run (512 x 512 video) can be compared.
- `profile_operators`: runs a callable under `mindspore.profiler.profile` and returns the
  operator types that took the most time, parsed from the CSV files the profiler writes.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from opensora.models.attention import KEY_BLOCK_SIZE, QUERY_BLOCK_SIZE, attention
from opensora.models.stdit2 import STDiT2
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import get_preset
from opensora.runtime import configure

# ---------------------------------------------------------------------------------------------
# timing


def synchronize() -> None:
    """Wait for queued kernels. On CPU `import opensora` already makes launches blocking (and
    `mindspore.runtime.synchronize` rejects the CPU device), so there is nothing to wait for."""
    if ms.get_context("device_target") != "CPU":
        ms.runtime.synchronize()


@dataclass(frozen=True)
class TimingStats:
    """Wall-clock seconds of the timed calls (warm-up calls excluded)."""

    times_s: tuple[float, ...]
    warmup: int

    @property
    def repeat(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def max_s(self) -> float:
        return max(self.times_s)

    @property
    def stdev_s(self) -> float:
        return statistics.stdev(self.times_s) if len(self.times_s) > 1 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median_s, "mean_s": self.mean_s, "min_s": self.min_s,
                "max_s": self.max_s, "stdev_s": self.stdev_s, "repeat": self.repeat,
                "warmup": self.warmup}

    def __str__(self) -> str:
        return (f"median {self.median_s * 1e3:.2f} ms (min {self.min_s * 1e3:.2f}, "
                f"max {self.max_s * 1e3:.2f}, n={self.repeat}, warm-up {self.warmup})")


def time_call(fn: Callable[..., Any], *args: Any, warmup: int = 1, repeat: int = 5,
              **kwargs: Any) -> TimingStats:
    """Call `fn(*args, **kwargs)` `warmup` times untimed, then `repeat` times timed."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1 to have something to report, got {repeat}")
    for _ in range(warmup):
        fn(*args, **kwargs)
        synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args, **kwargs)
        synchronize()
        times.append(time.perf_counter() - start)
    return TimingStats(tuple(times), warmup)


# ---------------------------------------------------------------------------------------------
# peak memory in a fresh process

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MEMORY_METHODS = ("auto", "reset", "baseline")


@dataclass(frozen=True)
class MemoryStats:
    """Resident memory a call added on top of its setup, measured in a spawned process.

    method "reset": one child runs the setup, resets the kernel's high-water mark
    (`/proc/self/clear_refs` <- 5), calls, and reads VmHWM - VmRSS(before the call).
    method "baseline": two children run the same setup, only one of them the call; the
    difference of their lifetime peaks (VmHWM, or ru_maxrss without /proc) is the call's.
    Both count resident pages, so resolution is one page (4 KiB) plus allocator noise of
    the order of a MiB; memory the call touches but frees back below the previous peak
    (possible with "baseline") is not seen. On Ascend / GPU the tensors live in device memory,
    which RSS does not see: `device_peak_bytes` is then MindSpore's pool peak for the call
    (`mindspore.runtime.max_memory_allocated`, which reads 0 on CPU). `error` is set when the
    call failed or its process was killed (e.g. out of memory); the byte counts are then None.
    """

    peak_bytes: int | None
    baseline_rss_bytes: int | None
    peak_rss_bytes: int | None
    method: str
    call_s: float | None = None  # one cold call, including first-call overheads
    error: str | None = None
    device_peak_bytes: int | None = None  # accelerator memory pool peak (Ascend / GPU only)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def __str__(self) -> str:
        if not self.ok:
            return f"failed ({self.error})"
        return f"peak +{self.peak_mib:.1f} MiB over {self.baseline_rss_bytes / 2**20:.0f} MiB " \
               f"({self.method})"


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _lifetime_peak_bytes() -> int:
    """This process's resident high-water mark: VmHWM, else ru_maxrss (KiB on Linux, bytes on
    macOS)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _reset_peak() -> bool:
    """Make VmHWM restart from the current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_bytes("VmHWM"), _proc_status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64 * PAGE_BYTES


def _memory_child(conn: Any, workload: Callable[..., Callable[[], Any]],
                  params: dict[str, Any], mode: str) -> None:
    """Runs in the spawned process: setup, then (mode) measure the call, report through conn."""
    try:
        configure()  # a spawned process starts as MindSpore's default, like a fresh CLI
        call = workload(**params)
        if mode == "setup-only":
            conn.send({"peak_rss": _lifetime_peak_bytes(), "baseline_rss": None})
            return
        if mode == "reset" and not _reset_peak():
            conn.send({"error": "cannot reset the peak (no writable /proc/self/clear_refs)"})
            return
        on_device = ms.get_context("device_target") != "CPU"
        if on_device:
            ms.runtime.reset_peak_memory_stats()
        before = _proc_status_bytes("VmRSS") if mode == "reset" else None
        start = time.perf_counter()
        call()
        synchronize()
        elapsed = time.perf_counter() - start
        conn.send({"peak_rss": _lifetime_peak_bytes(), "baseline_rss": before,
                   "call_s": elapsed,
                   "device_peak": ms.runtime.max_memory_allocated() if on_device else None})
    except BaseException as exc:  # report anything (MemoryError included) to the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=5)})
    finally:
        conn.close()


def _run_child(workload: Callable[..., Callable[[], Any]], params: dict[str, Any], mode: str,
               timeout_s: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_memory_child, args=(child_conn, workload, params, mode))
    process.start()
    child_conn.close()
    try:
        if parent_conn.poll(timeout_s):
            try:
                return parent_conn.recv()
            except EOFError:
                pass
        else:
            process.kill()
            return {"error": f"timed out after {timeout_s:.0f} s"}
        process.join(30)
        code = process.exitcode
        why = " (killed: out of memory?)" if code == -9 else ""
        return {"error": f"child process died with exit code {code}{why}"}
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
        parent_conn.close()


def _check_workload(workload: Any) -> None:
    if not callable(workload):
        raise TypeError(f"workload must be a callable returning the call to measure, "
                        f"got {type(workload).__name__}")
    module = getattr(workload, "__module__", None)
    qualname = getattr(workload, "__qualname__", "")
    if module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(
            f"workload {qualname or workload!r} must be a module-level function of an importable "
            "module: it is sent by name to a fresh process. Use one of opensora.profiling's "
            "*_workload functions or put yours in a module.")


def peak_memory(workload: Callable[..., Callable[[], Any]], method: str = "auto",
                timeout_s: float = 600.0, **params: Any) -> MemoryStats:
    """Peak resident memory that `workload(**params)()` adds over `workload(**params)`.

    `workload` is the setup: it builds inputs (and warms kernels up on small shapes) and returns
    the zero-argument call to measure. It runs in a spawned process, so it must be importable by
    name (see `attention_workload`, `train_step_workload`, `allocation_workload`).
    """
    if method not in MEMORY_METHODS:
        raise ValueError(f"method must be one of {MEMORY_METHODS}, got {method!r}")
    _check_workload(workload)
    if method in ("auto", "reset"):
        result = _run_child(workload, params, "reset", timeout_s)
        cannot_reset = "cannot reset" in result.get("error", "")
        if not (cannot_reset and method == "auto"):
            return _memory_stats(result, "reset")
    measured = _run_child(workload, params, "call", timeout_s)
    if "error" in measured:
        return _memory_stats(measured, "baseline")
    baseline = _run_child(workload, params, "setup-only", timeout_s)
    if "error" in baseline:
        return _memory_stats({"error": "baseline (setup only): " + baseline["error"]},
                             "baseline")
    measured["baseline_rss"] = baseline["peak_rss"]
    return _memory_stats(measured, "baseline")


def _memory_stats(result: Mapping[str, Any], method: str) -> MemoryStats:
    if "error" in result:
        return MemoryStats(None, None, None, method, error=result["error"])
    before, peak = result["baseline_rss"], result["peak_rss"]
    return MemoryStats(max(0, peak - before), before, peak, method, result.get("call_s"),
                       device_peak_bytes=result.get("device_peak"))


# --- workloads: module-level so that a spawned process can import them by name


def allocation_workload(nbytes: int) -> Callable[[], Any]:
    """A call that writes a numpy buffer of `nbytes` (calibrates the memory meter)."""
    def call() -> int:
        buffer = np.ones(int(nbytes), dtype=np.uint8)
        return int(buffer[:: max(1, PAGE_BYTES)].sum())
    return call


def attention_inputs(seq_len: int, heads: int = 1, head_dim: int = 64, batch: int = 1,
                     dtype: str = "float32", seed: int = 0) -> tuple[ms.Tensor, ...]:
    """Random q, k, v of shape (batch, heads, seq_len, head_dim)."""
    rng = np.random.default_rng(seed)
    shape = (batch, heads, seq_len, head_dim)
    return tuple(ms.Tensor(rng.standard_normal(shape).astype(np.float32)).astype(_ms_dtype(dtype))
                 for _ in range(3))


def attention_workload(backend: str, seq_len: int, heads: int = 1, head_dim: int = 64,
                       batch: int = 1, block_size: int = QUERY_BLOCK_SIZE, dtype: str = "float32",
                       warmup_len: int = 64, key_block_size: int | None = None
                       ) -> Callable[[], Any]:
    """q, k, v built and the backend's kernels warmed up on `warmup_len` tokens; returns the
    full-size attention call."""
    blocks = {"block_size": block_size, "key_block_size": key_block_size or KEY_BLOCK_SIZE}
    small = attention_inputs(min(warmup_len, seq_len), heads, head_dim, batch, dtype, seed=1)
    attention(*small, backend=backend, **blocks).asnumpy()
    q, k, v = attention_inputs(seq_len, heads, head_dim, batch, dtype)
    return lambda: attention(q, k, v, backend=backend, **blocks)


def vae_encode_workload(vae_path: str, num_frames: int, height: int, width: int,
                        micro_batch_size: int | None = None, decode: bool = True
                        ) -> Callable[[], Any]:
    """A `VideoAutoencoderKL` from a diffusers folder and a random clip, warmed up on one frame;
    returns encode (and decode) of the whole clip in micro-batches of `micro_batch_size`."""
    vae = VideoAutoencoderKL.from_pretrained(vae_path, micro_batch_size=micro_batch_size)
    rng = np.random.default_rng(0)

    def clip(frames: int) -> ms.Tensor:
        return ms.Tensor(rng.uniform(-1, 1, (1, 3, frames, height, width)).astype(np.float32))

    def call(x: ms.Tensor) -> Any:
        z = vae.encode(x, sample_posterior=False)
        return vae.decode(z) if decode else z

    call(clip(1)).asnumpy()
    x = clip(num_frames)
    return lambda: call(x)


def _ms_dtype(name: str) -> ms.Type:
    table = {"float32": ms.float32, "fp32": ms.float32, "float16": ms.float16,
             "fp16": ms.float16, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(table)}")
    return table[name]


def stdit2_step_inputs(model_config: Mapping[str, Any], latent_shape: Sequence[int],
                       batch: int = 1, seed: int = 0) -> dict[str, ms.Tensor]:
    """Random keyword inputs of `STDiT2.construct` for a (T, H, W) latent (micro-conditions as
    for an 8x VAE; they only condition the model and cost the same whatever their values)."""
    frames, height, width = (int(s) for s in latent_shape)
    rng = np.random.default_rng(seed)
    n_tok, c_cap = model_config["model_max_length"], model_config["caption_channels"]
    return {
        "x": ms.Tensor(rng.standard_normal(
            (batch, model_config["in_channels"], frames, height, width)).astype(np.float32)),
        "timestep": ms.Tensor(rng.integers(0, 1000, batch).astype(np.float32)),
        "y": ms.Tensor(rng.standard_normal((batch, 1, n_tok, c_cap)).astype(np.float32)),
        "mask": ms.Tensor(np.ones((batch, n_tok), np.int32)),
        "num_frames": ms.Tensor(np.full(batch, frames, np.float32)),
        "height": ms.Tensor(np.full(batch, height * 8, np.float32)),
        "width": ms.Tensor(np.full(batch, width * 8, np.float32)),
        "ar": ms.Tensor(np.full(batch, height / width, np.float32)),
        "fps": ms.Tensor(np.full(batch, 8.0, np.float32)),
    }


_STEP_INPUTS = ("x", "timestep", "y", "mask", "num_frames", "height", "width", "ar", "fps")


def make_forward(model: Any, inputs: Mapping[str, ms.Tensor], graph: bool = False
                 ) -> Callable[[], Any]:
    """The model's forward pass on `stdit2_step_inputs` as a zero-argument call; `graph`
    compiles it with `mindspore.jit`."""
    def forward(x, timestep, y, mask, num_frames, height, width, ar, fps):
        return model(x, timestep, y, mask, None, num_frames, height, width, ar, fps)

    run = ms.jit(forward) if graph else forward
    values = [inputs[name] for name in _STEP_INPUTS]
    return lambda: run(*values)


def make_train_step(model: Any, inputs: Mapping[str, ms.Tensor], graph: bool = False
                    ) -> Callable[[], Any]:
    """Loss = mean squared model output; returns a call computing the loss and the gradients
    of every trainable weight (the memory and time of a training step, without an optimizer).
    `inputs` are `stdit2_step_inputs`; `graph` compiles the step with `mindspore.jit`."""
    params = model.trainable_params()

    def loss_fn(x, timestep, y, mask, num_frames, height, width, ar, fps):
        out = model(x, timestep, y, mask, None, num_frames, height, width, ar, fps)
        return (out * out).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    if graph:
        grad_fn = ms.jit(grad_fn)
    values = [inputs[name] for name in _STEP_INPUTS]
    return lambda: grad_fn(*values)


def train_step_workload(preset: str = "tiny", latent_shape: Sequence[int] = (16, 16, 16),
                        recompute: bool = False, graph: bool = False,
                        attn_backend: str = "math", batch: int = 1) -> Callable[[], Any]:
    """A freshly initialised preset model (dropout off) and its gradient step, warmed up on a
    one-frame latent; returns the full-size step."""
    config = dict(get_preset(preset).model, class_dropout_prob=0.0)
    model_cls = _model_class(get_preset(preset).model_type)
    model = model_cls(**config, attn_backend=attn_backend, enable_recompute=recompute)
    model.set_train(True)
    frames, height, width = latent_shape
    if not graph:  # a graph would be compiled for the small shape only
        make_train_step(model, stdit2_step_inputs(config, (1, height, width), batch))()
    return make_train_step(model, stdit2_step_inputs(config, latent_shape, batch), graph)


def _model_class(model_type: str) -> type:
    if model_type != "STDiT2":
        raise ValueError(f"train_step_workload builds STDiT2 presets, not {model_type!r}")

    return STDiT2


# ---------------------------------------------------------------------------------------------
# FLOP counts


def attention_flops(seq_q: int, seq_k: int | None = None, head_dim: int = 64, heads: int = 1,
                    batch: int = 1) -> int:
    """Q K^T plus P V: 2 matmuls of 2 * N_q * N_k * d FLOPs per head (softmax not counted)."""
    seq_k = seq_q if seq_k is None else seq_k
    return 4 * batch * heads * seq_q * seq_k * head_dim


def attention_memory_bytes(backend: str, seq_q: int, seq_k: int | None = None, heads: int = 1,
                           batch: int = 1, block_size: int = QUERY_BLOCK_SIZE, itemsize: int = 4,
                           key_block_size: int | None = None) -> int:
    """Size of the largest intermediate, the score matrix: all of it for `math`, one
    block_size x key_block_size tile per (batch, head) for `chunked` (the model, not a
    measurement)."""
    seq_k = seq_q if seq_k is None else seq_k
    key_block_size = key_block_size or KEY_BLOCK_SIZE
    if backend == "math":
        return batch * heads * seq_q * seq_k * itemsize
    if backend == "chunked":
        return batch * heads * min(block_size, seq_q) * min(key_block_size, seq_k) * itemsize
    raise ValueError(f"no memory model for backend {backend!r}; use 'math' or 'chunked'")


def video_latent_shape(num_frames: int, height: int, width: int, spatial_factor: int = 8,
                       temporal_factor: int = 1) -> tuple[int, int, int]:
    """(T, H, W) of the latent of a video: Open-Sora 1.0/1.1 use the per-frame SD VAE (8x in
    space, none in time)."""
    return (math.ceil(num_frames / temporal_factor), math.ceil(height / spatial_factor),
            math.ceil(width / spatial_factor))


# ---------------------------------------------------------------------------------------------
# MindSpore profiler


def _profiler_activities() -> list[Any]:
    target = ms.get_context("device_target")
    extra = {"Ascend": [ProfilerActivity.NPU], "GPU": [ProfilerActivity.GPU]}.get(target, [])
    return [ProfilerActivity.CPU, *extra]


# Column names of the per-operator-type tables: Ascend's op_statistic.csv (msprof, microseconds)
# and the CPU profiler's cpu_op_type_info_<rank>.csv (milliseconds). Percentages are recomputed
# over all files found, so several ranks' tables add up.
_ASCEND_COLUMNS = {"op_type": "OP Type", "calls": "Count", "total": "Total Time(us)"}
_CPU_COLUMNS = {"op_type": "op_type", "calls": "type_occurrences", "total": "total_compute_time"}


def read_operator_table(profile_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Operator types with calls, total and average milliseconds and % of operator time, from
    what `mindspore.profiler` wrote under `profile_dir`, slowest first."""
    root = Path(profile_dir)
    ascend = sorted(root.rglob("op_statistic*.csv"))
    cpu = sorted(root.rglob("cpu_op_type_info_*.csv"))
    if ascend:
        files, columns, to_ms = ascend, _ASCEND_COLUMNS, 1e-3
    elif cpu:
        files, columns, to_ms = cpu, _CPU_COLUMNS, 1.0
    else:
        raise FileNotFoundError(
            f"no operator statistics (op_statistic*.csv or cpu_op_type_info_*.csv) under "
            f"{root}; did the profiled call run any operator, and did the profiler finish?")
    totals: dict[str, dict[str, float]] = {}
    for path in files:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                name = row[columns["op_type"]]
                entry = totals.setdefault(name, {"calls": 0, "total_ms": 0.0})
                entry["calls"] += int(float(row[columns["calls"]]))
                entry["total_ms"] += float(row[columns["total"]]) * to_ms
    grand_total = sum(e["total_ms"] for e in totals.values()) or 1.0
    table = [{"op_type": name, "calls": int(e["calls"]), "total_ms": e["total_ms"],
              "avg_ms": e["total_ms"] / max(1, e["calls"]),
              "percent": 100.0 * e["total_ms"] / grand_total}
             for name, e in totals.items()]
    return sorted(table, key=lambda r: r["total_ms"], reverse=True)


def profile_operators(fn: Callable[..., Any], *args: Any, steps: int = 1, warmup: int = 1,
                      top: int | None = 10, output_dir: str | os.PathLike | None = None,
                      **kwargs: Any) -> list[dict[str, Any]]:
    """Run `fn(*args, **kwargs)` `warmup` + `steps` times under `mindspore.profiler.profile`,
    recording only the last `steps` (the profiler's own warmup phase covers compilation and
    first-call costs); return the `top` operator types by total time.

    The raw profile is kept in `output_dir` when given (for MindStudio Insight / the trace view
    `trace_view.json`), else written to a temporary folder that is removed afterwards.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1 (a profile without warmup times "
                         f"compilation and first-call costs), got steps={steps}, warmup={warmup}")
    keep = output_dir is not None
    folder = Path(output_dir) if keep else Path(tempfile.mkdtemp(prefix="ms_profile_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with profile(activities=_profiler_activities(),
                     schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1,
                                       skip_first=0),
                     on_trace_ready=tensorboard_trace_handler(str(folder))) as prof:
            for _ in range(warmup + steps):
                fn(*args, **kwargs)
                synchronize()
                prof.step()
        table = read_operator_table(folder)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return table if top is None else table[:top]


# ---------------------------------------------------------------------------------------------
# tables


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 float_format: str = "{:.3g}") -> str:
    """A plain-text table of dicts (one per row), columns in the order given or first seen."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return "" if value is None else str(value)

    body = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(line[i]) for line in body)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(value.rjust(w) for value, w in zip(line, widths)) for line in body]
    return "\n".join(lines)
