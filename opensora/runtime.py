"""Configure the process once, and say where a job's relative paths point.

Importing `opensora` changes nothing; the command-line tools, the notebooks' setup cells and the
test suite call `configure()` explicitly, so a library user keeps control of MindSpore.
"""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms

BOOK_MARKER = "_toc.yml"  # the file that marks the book's (the repository's) root folder

_configured = False


def configure() -> None:
    """Set MindSpore's runtime and the log levels of the libraries around it (idempotent).

    - On CPU, PyNative otherwise busy-waits a whole core for every kernel launch; blocking launch
      halves the step time on a 2-core machine.
    - transformers announces at import that PyTorch is missing. The port uses only its tokenizer
      classes, which need no PyTorch, so that advisory is noise on every page that builds a text
      encoder. Advisories only: transformers' warnings and errors still show.
    """
    global _configured
    if _configured:
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if ms.get_context("device_target") == "CPU":
        ms.runtime.launch_blocking()
    _configured = True


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above `start` (default: the working directory) that holds the
    book's `_toc.yml`; the working directory itself outside a checkout of the book.

    jupyter-book runs a notebook inside its own folder (`notebooks/`, `book/`), papermill and
    `opensora.jobs` wherever they were started; the root is the same folder for all of them.
    """
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / BOOK_MARKER).is_file():
            return folder
    return here


def project_path(path: str | os.PathLike) -> Path:
    """`path` as a notebook parameter means it: absolute as given, relative to the project root
    (so `runs/x` is the repository's `runs/x`, never `notebooks/runs/x`)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path
