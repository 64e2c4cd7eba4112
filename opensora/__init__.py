"""Open-Sora 1.0/1.1 on MindSpore.

Importing the package has no side effects: call `opensora.runtime.configure()` once to set up
MindSpore's runtime (the command-line tools, the notebooks and the tests do).
"""

from __future__ import annotations

__version__ = "0.1.0"
