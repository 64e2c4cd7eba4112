"""Every notebook in the book runs headless under papermill with its CI parameters.

Later chapters join by being listed in _toc.yml; nothing here names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opensora.jobs import run_notebook

ROOT = Path(__file__).resolve().parent.parent


def toc_notebooks() -> list[Path]:
    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                yield node["file"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ROOT / f"{f}.ipynb" for f in walk(toc) if (ROOT / f"{f}.ipynb").is_file()]
    return files


NOTEBOOKS = toc_notebooks()


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
def test_notebook_runs_with_ci_parameters(notebook: Path, tmp_path: Path) -> None:
    result = run_notebook(notebook, output_dir=tmp_path, ci=True, timeout=600)
    executed = json.loads(result.notebook.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
