"""Chapter 8's targets for the chunked attention backend, measured in one run against `math`:

- memory: at 16k tokens chunked adds at most a quarter of math's peak memory (or runs where math
  runs out), each measured in a fresh process (`profiling.peak_memory`);
- time: at 4k tokens chunked takes at most 1.3x math's median time.

One (batch, head) of head_dim 64, float32, the backends' default block sizes. Prints a table
and one line per target with the ratio; exits non-zero when a target is missed.

    .venv/bin/python tests/benchmarks/bench_attention.py
"""

from __future__ import annotations

import argparse
import sys

from opensora import profiling
from opensora.models.attention import KEY_BLOCK_SIZE, QUERY_BLOCK_SIZE, attention
from opensora.runtime import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-tokens", type=int, default=16384)
    parser.add_argument("--time-tokens", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    configure()

    print(f"blocks: {QUERY_BLOCK_SIZE} queries x {KEY_BLOCK_SIZE} keys")
    peaks = {b: profiling.peak_memory(profiling.attention_workload, backend=b,
                                      seq_len=args.memory_tokens) for b in ("math", "chunked")}
    q, k, v = profiling.attention_inputs(args.time_tokens)
    times = {}
    for backend in ("math", "chunked", "math"):  # math twice: drift between the runs shows
        timing = profiling.time_call(attention, q, k, v, backend=backend, warmup=1,
                                     repeat=args.repeat)
        times.setdefault(backend, []).append(timing.median_s)
    rows = [{"backend": b, f"peak_MiB@{args.memory_tokens}": peaks[b].peak_mib,
             f"median_ms@{args.time_tokens}": 1e3 * min(times[b]),
             "note": peaks[b].error or ""} for b in ("math", "chunked")]
    print(profiling.format_table(rows))

    ok = True
    if peaks["math"].ok and peaks["chunked"].ok:
        ratio = peaks["chunked"].peak_bytes / peaks["math"].peak_bytes
        ok &= ratio <= 0.25
        print(f"memory chunked/math at {args.memory_tokens}: {ratio:.3f} (target <= 0.25)")
    else:
        ok &= peaks["chunked"].ok
        print(f"memory: math {'ran' if peaks['math'].ok else 'failed'}, chunked "
              f"{'ran' if peaks['chunked'].ok else 'failed'}")
    ratio = min(times["chunked"]) / min(times["math"])
    ok &= ratio <= 1.3
    print(f"time chunked/math at {args.time_tokens}: {ratio:.2f} (target <= 1.3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
