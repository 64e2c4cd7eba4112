"""Open-Sora 1.0/1.1 on MindSpore.

Importing the package configures MindSpore's runtime once: on CPU, PyNative otherwise spins a
whole core waiting for kernels, and blocking launch halves step time on a 2-core machine.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _configure_runtime() -> None:
    import mindspore as ms

    if ms.get_context("device_target") == "CPU":
        ms.runtime.launch_blocking()


_configure_runtime()
