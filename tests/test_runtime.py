"""Runtime setup: explicit and idempotent; relative job paths mean the book's root folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opensora import runtime

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_package_configures_nothing() -> None:
    code = ("import os, opensora, opensora.models.stdit2, opensora.pipeline\n"
            "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))\n"
            "from opensora import runtime; print(runtime._configured)")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["None", "False"]


def test_configure_is_idempotent_and_quiets_only_transformers_advisories() -> None:
    runtime.configure()
    runtime.configure()
    assert runtime._configured
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"


def test_tokenizer_loads_without_the_pytorch_advisory() -> None:
    code = ("from opensora.runtime import configure; configure()\n"
            "from opensora.models.text_encoder import load_tokenizer\n"
            "from opensora.presets import DATA_SAMPLES\n"
            "print(len(load_tokenizer(DATA_SAMPLES / 'tokenizer')))")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert "PyTorch was not found" not in run.stdout + run.stderr
    assert int(run.stdout.split()[-1]) > 10


def test_project_path_resolves_against_the_book_root(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where jupyter-book starts a chapter's kernel
    assert runtime.project_root() == tmp_path.resolve()
    assert runtime.project_path("runs/x") == tmp_path.resolve() / "runs" / "x"
    assert runtime.project_path(tmp_path / "abs") == tmp_path / "abs"
    assert runtime.project_root(ROOT / "notebooks") == ROOT


def test_outside_a_book_paths_stay_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert runtime.project_path("out") == tmp_path.resolve() / "out"
