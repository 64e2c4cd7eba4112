"""The job runner: parameters in, executed notebook and files out, clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from opensora import jobs


def _notebook(path: Path, body: str, ci: dict | None = None) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("n = 2\nword = 'hi'\noutput_dir = 'runs/x'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if ci:
        nb.metadata["opensora"] = {"ci_parameters": ci}
    nbformat.write(nb, path)
    return path


WRITE = ("from pathlib import Path\n"
         "Path(output_dir, 'result.txt').write_text(word * n)\n"
         "print('wrote', n)")


def test_declared_parameters_and_values(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "pass", ci={"n": 1})
    assert jobs.declared_parameters(path) == {"n": 2, "word": "hi", "output_dir": "runs/x"}
    assert jobs.ci_parameters(path) == {"n": 1}
    assert jobs.parse_value("3") == 3 and jobs.parse_value("[1, 2]") == [1, 2]
    assert jobs.parse_value("tiny") == "tiny"


@pytest.mark.parametrize(("text", "default", "expected"), [
    ("0", "", "0"),  # a mask strategy: text, never the integer 0
    ("0,0,0,0,1", "", "0,0,0,0,1"),  # ... nor a tuple
    ("None", "default", None), ('{"identity": 1.0}', "default", {"identity": 1.0}),
    ("16", 8, 16), ("1e-3", 3e-4, 1e-3), ("2", 0.5, 2.0), ("false", True, False),
    ("[1, 2]", [4], [1, 2]), ("{'a': 1}", None, {"a": 1}), ("runs/x", None, "runs/x"),
])
def test_parameters_take_the_declared_type(text: str, default: object, expected: object) -> None:
    value = jobs.parse_parameter("p", text, default)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("text", "default", "message"), [
    ("abc", 16, "parameter p is an int .default 16.; got 'abc'"),
    ("1.5", 16, "is an int"), ("True", 16, "is an int"), ("fast", 0.5, "is a number"),
    ("yes", False, "is a bool .* pass True or False"), ("3", [1], "is a list"),
])
def test_mistyped_parameters_are_refused(text: str, default: object, message: str) -> None:
    with pytest.raises(jobs.JobError, match=message):
        jobs.parse_parameter("p", text, default)


def test_cli_types_parameters_and_reports_them(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    path = _notebook(tmp_path / "nb.ipynb", WRITE)
    assert jobs.main([str(path), "-o", str(tmp_path / "out"), "-p", "n", "x"]) == 1
    assert "parameter n is an int (default 2); got 'x'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran
    assert jobs.main([str(path), "-o", str(tmp_path / "out"), "-p", "word", "7"]) == 0
    assert (tmp_path / "out" / "result.txt").read_text() == "77"  # "7" * 2, a string


def test_timeout_is_a_job_error(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "import time\ntime.sleep(30)")
    with pytest.raises(jobs.JobError, match="longer than the 2 s timeout; pass a larger"):
        jobs.run_notebook(path, output_dir=tmp_path / "out", timeout=2)


def test_run_writes_into_output_dir(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", WRITE, ci={"n": 1})
    result = jobs.run_notebook(path, {"word": "ab"}, tmp_path / "out", ci=True)
    assert (tmp_path / "out" / "result.txt").read_text() == "ab"
    executed = json.loads(result.notebook.read_text())
    assert any("wrote 1" in "".join(o.get("text", "")) for c in executed["cells"]
               for o in c.get("outputs", []))


def test_undeclared_parameter_is_refused(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "pass")
    with pytest.raises(jobs.JobError, match=r"does not declare parameter\(s\) \['nn'\]"):
        jobs.run_notebook(path, {"nn": 3}, tmp_path / "out")


def test_failure_names_the_error_and_keeps_the_executed_copy(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "raise ValueError('bad input ' + word)")
    with pytest.raises(jobs.JobError, match="ValueError: bad input hi"):
        jobs.run_notebook(path, output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "nb.ipynb").is_file()


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _notebook(tmp_path / "good.ipynb", WRITE)
    assert jobs.main([str(good), "-p", "n", "3", "-o", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "result.txt").read_text() == "hihihi"
    bad = _notebook(tmp_path / "bad.ipynb", "1/0")
    assert jobs.main([str(bad), "-o", str(tmp_path / "b")]) == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert jobs.main([str(tmp_path / "none.ipynb")]) == 1


def test_default_output_goes_to_the_book_roots_runs(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "notebooks").mkdir()
    path = _notebook(tmp_path / "notebooks" / "nb.ipynb",
                     WRITE + "\nimport os\nprint('cwd', os.getcwd())")
    monkeypatch.chdir(tmp_path / "notebooks")
    result = jobs.run_notebook(path)
    assert result.output_dir == tmp_path.resolve() / "runs" / "nb"
    assert (result.output_dir / "result.txt").read_text() == "hihi"
    assert sorted(p.name for p in (tmp_path / "notebooks").iterdir()) == ["nb.ipynb"]
    cells = json.loads(result.notebook.read_text())["cells"]
    printed = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    assert f"cwd {tmp_path.resolve()}" in printed  # the kernel starts in the book's root


def test_output_dir_holding_the_notebook_is_refused(tmp_path: Path) -> None:
    path = _notebook(tmp_path / "nb.ipynb", "1/0")
    before = path.read_text()
    with pytest.raises(jobs.JobError, match="would overwrite its source"):
        jobs.run_notebook(path, output_dir=tmp_path)
    assert path.read_text() == before
