"""Every notebook in the book runs headless under papermill with its CI parameters.

Later chapters join by being listed in _toc.yml; nothing here names them. The notebooks are
executed once per session by the `executed_book` fixture (conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opensora.jobs import toc_notebooks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = toc_notebooks(ROOT)


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
