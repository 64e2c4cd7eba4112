"""Every notebook in the book runs headless under papermill with its CI parameters.

Later chapters join by being listed in _toc.yml; nothing here names them. The notebooks are
executed once per session by the `executed_book` fixture (conftest.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opensora.jobs import toc_notebooks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = toc_notebooks(ROOT)

# Library noise a reader must never meet on a page: transformers' missing-PyTorch advisory,
# MindSpore's glog lines ([WARNING] ME(...), [ERROR] KERNEL(...)), Python warnings raised inside
# libraries, and the kernel's own messages.
NOISE = re.compile(r"PyTorch was not found|\[(WARNING|ERROR|CRITICAL)\]|\b\w*Warning: |"
                   r"Kernel (died|restarting)|kernel_meta")
# Warnings the project raises on purpose, in the chapters that show them.
INTENDED: dict[str, re.Pattern] = {}


def noise_in(executed: dict, chapter: str) -> list[str]:
    """'cell N (first source line): output line' for every noisy stream or error line."""
    allowed = INTENDED.get(chapter)
    found = []
    for index, cell in enumerate(executed["cells"]):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text = "".join(output.get("text", ""))
            elif output.get("output_type") == "error":
                text = "\n".join(output.get("traceback", []))
            else:
                text = "".join(output.get("data", {}).get("text/plain", ""))
            for line in text.splitlines():
                if NOISE.search(line) and not (allowed and allowed.search(line)):
                    first = "".join(cell.get("source", "")).strip().splitlines()[:1]
                    found.append(f"cell {index} ({first[0][:60] if first else ''}): {line[:200]}")
    return found


def test_noise_scanner_names_the_cell() -> None:
    cell = {"source": "tok = load()\n", "outputs": [
        {"output_type": "stream", "name": "stderr",
         "text": "[transformers] PyTorch was not found. Models won't be available\n"},
        {"output_type": "stream", "name": "stdout", "text": "loaded 3 rows\n"}]}
    warned = {"source": "x", "outputs": [{"output_type": "stream", "name": "stderr", "text":
              "/x/site-packages/lib.py:3: UserWarning: deprecated\n[WARNING] ME(1):x\n"}]}
    found = noise_in({"cells": [{"source": "", "outputs": []}, cell, warned]}, "any")
    assert found[0].startswith("cell 1 (tok = load()): [transformers] PyTorch was not found")
    assert len(found) == 3


def test_toc_lists_notebooks() -> None:
    assert any(p.name == "00_data.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(notebook: Path) -> None:
    nb = json.loads(notebook.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell"
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs"


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_ci_parameters(notebook: Path, executed_book) -> None:
    result = executed_book.result(notebook.stem)  # raises the cell's error if it failed
    executed = json.loads(result.notebook.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in executed["cells"] for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "every chapter shows at least one figure"


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_page_shows_no_library_noise(notebook: Path, executed_book) -> None:
    executed = json.loads(executed_book.result(notebook.stem).notebook.read_text())
    found = noise_in(executed, notebook.stem)
    assert not found, "library noise on the page:\n" + "\n".join(found)


@pytest.mark.notebook
def test_jobs_write_nothing_beside_the_notebooks(executed_book) -> None:
    """Every chapter ran (in the book's copy); its book/ and notebooks/ hold only sources."""
    assert executed_book.results
    for folder in ("book", "notebooks"):
        sources = {p for p in (q.relative_to(ROOT / folder) for q in (ROOT / folder).rglob("*"))
                   if not any(part == "runs" or part.startswith(".") for part in p.parts)}
        now = {p.relative_to(executed_book.root / folder)
               for p in (executed_book.root / folder).rglob("*")}
        assert not now - sources, f"written inside {folder}/: {sorted(map(str, now - sources))}"
