"""Run a Python program on N workers with msrun, stream their logs, fail loudly.

    python -m opensora.parallel.launch --workers 2 [--timeout 600] [--log-dir D] \\
        -- -m opensora.train --latent-folder C/latents --text-folder C/t5 --output-dir runs/dp

Everything after `--` is what you would type after `python`. msrun (MindSpore's launcher)
starts the scheduler and the workers and already stops all workers when one exits with an
error; this wrapper adds what a notebook or CI needs: the workers' logs on our stdout with a
`[rank r]` prefix, a wall-clock timeout (a hung collective otherwise waits forever), and an
error that names the failing rank and its last traceback line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# MindSpore's C++ logging (glog format), e.g. "[WARNING] DISTRIBUTED(1234,7f...,python):..."
NATIVE_LOG = re.compile(r"^\[(INFO|WARNING|DEBUG)\] [A-Z_]+\(\d+")


class LaunchError(RuntimeError):
    """A worker failed or the job timed out; `ranks` names the culprits."""

    def __init__(self, message: str, ranks: list[int], log_dir: Path, returncode: int):
        super().__init__(message)
        self.ranks = ranks
        self.log_dir = log_dir
        self.returncode = returncode


@dataclass
class LaunchResult:
    log_dir: Path
    wall_s: float
    logs: dict[int, str] = field(default_factory=dict)  # rank -> full worker log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_msrun() -> str:
    """msrun next to this interpreter (a venv), else on PATH."""
    local = Path(sys.executable).with_name("msrun")
    found = str(local) if local.exists() else shutil.which("msrun")
    if not found:
        raise FileNotFoundError("msrun not found next to the Python interpreter or on PATH; "
                                "it is installed with the mindspore package")
    return found


def worker_log(log_dir: Path, rank: int) -> Path:
    return log_dir / f"worker_{rank}.log"


def _last_error(text: str) -> str | None:
    """The exception line that ends the last Python traceback in a log, if any."""
    if "Traceback (most recent call last)" not in text:
        return None
    tail = text[text.rindex("Traceback (most recent call last)"):].splitlines()
    errors = [ln for ln in tail if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", ln)]
    return (errors[-1] if errors else tail[-1]).strip()


class _LogFollower(threading.Thread):
    """Print new lines of each worker log as they appear, prefixed with the rank."""

    def __init__(self, log_dir: Path, workers: int, emit: Callable[[str], None],
                 native_logs: bool):
        super().__init__(daemon=True)
        self.paths = [worker_log(log_dir, r) for r in range(workers)]
        self.emit, self.native_logs = emit, native_logs
        self.offsets = [0] * workers
        self.partial = [""] * workers
        self.stop = threading.Event()

    def poll(self) -> None:
        for rank, path in enumerate(self.paths):
            if not path.exists():
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offsets[rank])
                chunk = f.read()
                self.offsets[rank] = f.tell()
            lines = (self.partial[rank] + chunk).split("\n")
            self.partial[rank] = lines.pop()
            for line in lines:
                if self.native_logs or not NATIVE_LOG.match(line):
                    self.emit(f"[rank {rank}] {line}")

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.poll()
        self.poll()
        for rank, rest in enumerate(self.partial):
            if rest and (self.native_logs or not NATIVE_LOG.match(rest)):
                self.emit(f"[rank {rank}] {rest}")


def _worker_failed(log_dir: Path) -> bool:
    path = log_dir / "msrun.log"
    return path.exists() and WORKER_FAILED in path.read_text(errors="replace")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _worker_rank(pid: int) -> int | None:
    try:
        env = dict(kv.split("=", 1) for kv in
                   Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                   if "=" in kv)
    except OSError:
        return None
    if env.get("MS_ROLE") == "MS_WORKER" and "RANK_ID" in env:
        return int(env["RANK_ID"])
    return None


def _stop(proc: subprocess.Popen) -> list[int]:
    """Stop msrun and everything it started; return the ranks that were still running."""
    tree = _descendants(proc.pid)
    running = sorted({r for r in map(_worker_rank, tree) if r is not None})
    try:
        proc.send_signal(signal.SIGINT)  # msrun's handler kills its workers and scheduler
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    return running


WORKER_FAILED = "exit with exception"  # msrun's log line when a worker fails
FAILURE_GRACE_S = 5.0


def _wait(proc: subprocess.Popen, msrun_log: Path, deadline: float) -> bool:
    """Wait for msrun; True if the deadline passed. Once msrun reports a failed worker it
    kills the others, but its scheduler then waits out the cluster timeout for the dead
    nodes: after a short grace period we stop it ourselves."""
    failed_at = None
    while proc.poll() is None:
        now = time.perf_counter()
        if now >= deadline:
            return True
        if failed_at is None and WORKER_FAILED in msrun_log.read_text(errors="replace"):
            failed_at = now
        if failed_at is not None and now - failed_at > FAILURE_GRACE_S:
            _stop(proc)
            return False
        time.sleep(0.5)
    return False


def launch(python_args: Sequence[str], workers: int = 2, timeout: float = 600.0,
           log_dir: str | os.PathLike | None = None, master_port: int | None = None,
           env: dict[str, str] | None = None, emit: Callable[[str], None] | None = None,
           native_logs: bool = False) -> LaunchResult:
    """Run `python *python_args` on `workers` msrun workers; block until all finish.

    Raises LaunchError naming the rank(s) if a worker fails or the job outlives `timeout`
    seconds (then every process is killed). `emit` receives each prefixed log line
    (default: print). MindSpore's native INFO/WARNING lines are hidden unless `native_logs`.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not python_args:
        raise ValueError("nothing to run: pass the program, e.g. ['train.py', '--steps', '5'] "
                         "or ['-m', 'opensora.train', '--latent-folder', ...]")
    emit = emit or (lambda line: print(line, flush=True))
    log_path = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="msrun_"))
    log_path.mkdir(parents=True, exist_ok=True)
    for rank in range(workers):  # stale logs would be mistaken for this run's
        worker_log(log_path, rank).unlink(missing_ok=True)
    run_env = dict(os.environ if env is None else env)
    # msrun starts "python" from PATH: make it this interpreter.
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                      run_env.get("PATH", "")])
    run_env.setdefault("GLOG_v", "3" if not native_logs else "2")
    run_env["PYTHONUNBUFFERED"] = "1"
    cmd = [find_msrun(), f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={master_port or free_port()}", f"--log_dir={log_path}",
           "--join=True", f"--cluster_time_out={int(max(30, timeout))}",
           f"--tail_worker_log={workers}",  # msrun tails nothing; we follow the logs ourselves
           "python", *python_args]
    start = time.perf_counter()
    with open(log_path / "msrun.log", "w") as msrun_out:
        proc = subprocess.Popen(cmd, env=run_env, stdout=msrun_out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    follower = _LogFollower(log_path, workers, emit, native_logs)
    follower.start()
    timed_out, still_running = False, []
    try:
        timed_out = _wait(proc, log_path / "msrun.log", start + timeout)
        if timed_out:
            still_running = _stop(proc)
    except BaseException:  # e.g. KeyboardInterrupt in a notebook: leave nothing behind
        _stop(proc)
        raise
    finally:
        follower.stop.set()
        follower.join()
    wall = time.perf_counter() - start
    logs = {r: worker_log(log_path, r).read_text(errors="replace")
            if worker_log(log_path, r).exists() else "" for r in range(workers)}
    if timed_out:
        ranks = still_running or list(range(workers))
        raise LaunchError(
            f"timed out after {timeout:.0f} s; rank(s) {ranks} still running (killed). "
            f"Logs: {log_path}", ranks, log_path, 124)
    if proc.returncode != 0 or _worker_failed(log_path):
        failed = {r: err for r, text in logs.items() if (err := _last_error(text))}
        if failed:
            detail = "; ".join(f"rank {r}: {err}" for r, err in sorted(failed.items()))
            message = f"worker rank(s) {sorted(failed)} failed: {detail}. Logs: {log_path}"
        else:
            tail = (log_path / "msrun.log").read_text(errors="replace").strip().splitlines()[-5:]
            message = (f"msrun exited with code {proc.returncode} and no worker traceback; "
                       f"msrun said: {' | '.join(tail)}. Logs: {log_path}")
        raise LaunchError(message, sorted(failed), log_path, proc.returncode or 1)
    return LaunchResult(log_path, wall, logs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m opensora.parallel.launch --workers N [--timeout S] "
              "[--log-dir D] -- <python args...>", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m opensora.parallel.launch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole job")
    parser.add_argument("--log-dir", default=None, help="msrun log folder (default: a temp dir)")
    parser.add_argument("--master-port", type=int, default=None)
    parser.add_argument("--native-logs", action="store_true",
                        help="also show MindSpore's C++ INFO/WARNING lines")
    args = parser.parse_args(argv[:split])
    try:
        result = launch(argv[split + 1:], args.workers, args.timeout, args.log_dir,
                        args.master_port, native_logs=args.native_logs)
    except LaunchError as exc:
        print(f"launch failed: {exc}", file=sys.stderr, flush=True)
        return 1 if exc.returncode != 124 else 124
    print(f"all {args.workers} workers finished in {result.wall_s:.1f} s; logs in "
          f"{result.log_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
