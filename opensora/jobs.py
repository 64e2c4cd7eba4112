"""Run a notebook as a job: parameters in, an executed notebook and its files out.

Every chapter is also a tool. `python -m opensora.jobs notebooks/06_training.ipynb -p steps 2000
-o runs/train` trains for real; the same call with `--ci` runs the small configuration the
tests use. Parameters the notebook does not declare are refused, so a typo cannot silently
run the defaults.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import papermill
import yaml
from nbclient.exceptions import CellTimeoutError
from papermill.exceptions import PapermillExecutionError

from opensora.runtime import project_root


class JobError(RuntimeError):
    """The job could not start (bad parameters) or a cell failed while it ran."""


@dataclass
class JobResult:
    notebook: Path  # the executed copy, with outputs
    output_dir: Path
    seconds: float


@dataclass(frozen=True)
class Parameter:
    """One assignment of a notebook's `parameters` cell."""

    name: str
    default: Any  # the literal value, or its source text when it is not a literal
    comment: str  # the trailing `# ...` on its line: the parameter's documentation


def notebook_parameters(notebook: str | Path) -> list[Parameter]:
    """The parameters cell, read without running it: names, defaults and their comments."""
    nb = _read_notebook(notebook)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            lines = source.splitlines()
            found = []
            for node in ast.parse(source).body:
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, ast.AnnAssign) else [])
                for target in targets:
                    if not isinstance(target, ast.Name):
                        continue
                    try:
                        default = ast.literal_eval(node.value)
                    except (ValueError, SyntaxError, TypeError):
                        default = ast.unparse(node.value)
                    rest = lines[node.end_lineno - 1][node.end_col_offset:]
                    comment = rest.split("#", 1)[1].strip() if "#" in rest else ""
                    found.append(Parameter(target.id, default, comment))
            return found
    raise JobError(f"{notebook}: no code cell tagged 'parameters'")


def declared_parameters(notebook: str | Path) -> dict[str, Any]:
    """Names (and default values where they are literals) assigned in the `parameters` cell."""
    return {p.name: p.default for p in notebook_parameters(notebook)}


def toc_notebooks(root: str | Path) -> list[Path]:
    """The notebooks of the book, in `_toc.yml` order (prose pages left out)."""
    root = Path(root)

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if "file" in node:
                yield node["file"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    return [root / f"{f}.ipynb" for f in walk(toc) if (root / f"{f}.ipynb").is_file()]


def ci_parameters(notebook: str | Path) -> dict[str, Any]:
    """The small configuration the test suite runs (notebook metadata `opensora.ci_parameters`)."""
    return dict(_read_notebook(notebook).get("metadata", {}).get("opensora", {})
                .get("ci_parameters", {}))


def _read_notebook(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"notebook not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise JobError(f"{path}: not a valid notebook ({exc})") from exc


def parse_value(text: str) -> Any:
    """A Python literal (`100`, `'["a", "b"]'`, `None`) or, failing that, the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


_CONTAINERS = (dict, list, type(None))


def parse_parameter(name: str, text: str, default: Any) -> Any:
    """`-p NAME TEXT` read as the type of the parameter's declared default.

    A text parameter stays text (`-p mask_strategy 0` is the string "0", `0,0,0,0,1` is not a
    tuple) unless it spells a dict, list or None, which some text parameters also accept
    (`mask_ratios`); a number must parse as one; a bool is True / False (or 1 / 0).
    """
    if isinstance(default, bool):
        spelled = {"true": True, "1": True, "false": False, "0": False}
        if text.strip().lower() not in spelled:
            raise JobError(f"parameter {name} is a bool (default {default!r}); got {text!r}, "
                           "pass True or False")
        return spelled[text.strip().lower()]
    value = parse_value(text)
    if isinstance(default, str):
        return value if isinstance(value, _CONTAINERS) else text
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"parameter {name} is an int (default {default!r}); got {text!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise JobError(f"parameter {name} is a number (default {default!r}); got {text!r}")
        return float(value)
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise JobError(f"parameter {name} is a {type(default).__name__} (default "
                       f"{default!r}); got {text!r}, pass a Python literal such as [1, 2]")
    return value


def run_notebook(notebook: str | Path, parameters: Mapping[str, Any] | None = None,
                 output_dir: str | Path | None = None, ci: bool = False,
                 timeout: int | None = None, progress: bool = False) -> JobResult:
    """Execute `notebook` with papermill, writing the executed copy into `output_dir`.

    The kernel starts in the book's root folder (`opensora.runtime.project_root`), and
    `output_dir` defaults to the root's `runs/<notebook>`: a job never writes beside the
    notebooks. If the notebook declares an `output_dir` parameter it receives the same folder,
    so files the notebook writes land beside the executed notebook. Raises `JobError` naming the
    failing cell's exception; the executed copy (with the error) is kept for inspection.
    """
    notebook = Path(notebook)
    declared = declared_parameters(notebook)
    params = {**(ci_parameters(notebook) if ci else {}), **(parameters or {})}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise JobError(f"{notebook.name} does not declare parameter(s) {unknown}; "
                       f"it declares {sorted(declared)}")
    root = project_root(notebook.parent)
    output_dir = Path(output_dir).resolve() if output_dir else root / "runs" / notebook.stem
    executed = output_dir / notebook.name
    if executed.resolve() == notebook.resolve():
        raise JobError(f"output folder {output_dir} holds the notebook itself: the executed copy "
                       "would overwrite its source; pass another -o (e.g. runs/...)")
    output_dir.mkdir(parents=True, exist_ok=True)
    if "output_dir" in declared and "output_dir" not in params:
        params["output_dir"] = str(output_dir)
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=params,
                                   kernel_name="python3", progress_bar=progress,
                                   execution_timeout=timeout, cwd=str(root))
    except PapermillExecutionError as exc:
        raise JobError(f"{notebook.name} failed in cell {exc.exec_count}: "
                       f"{exc.ename}: {exc.evalue}\n(executed copy: {executed})") from None
    except CellTimeoutError:
        raise JobError(f"{notebook.name}: a cell ran longer than the {timeout} s timeout; pass a "
                       f"larger --timeout (executed copy so far: {executed})") from None
    return JobResult(executed, output_dir, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opensora.jobs", description="Run a notebook as a papermill job.")
    parser.add_argument("notebook")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="set a parameter (repeatable)")
    parser.add_argument("-o", "--output-dir", help="folder for the executed notebook and files")
    parser.add_argument("--ci", action="store_true", help="start from the notebook's CI parameters")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    parser.add_argument("--list", action="store_true", help="print the declared parameters")
    args = parser.parse_args(argv)
    try:
        if args.list:
            for name, value in declared_parameters(args.notebook).items():
                print(f"{name} = {value!r}")
            return 0
        declared = declared_parameters(args.notebook)
        params = {name: parse_parameter(name, value, declared.get(name))
                  for name, value in args.parameter}
        result = run_notebook(args.notebook, params, args.output_dir, ci=args.ci,
                              timeout=args.timeout, progress=True)
    except JobError as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    print(f"done in {result.seconds:.1f}s: {result.notebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
