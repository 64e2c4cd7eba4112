"""Build the book from the executed notebooks and look at it in a real browser.

Headless Chromium (Debian's package, which `make test` installs) opens every page: each chapter
must show figures that loaded (non-zero natural size) and no error output; the search page must
find a word. Screenshots go to _build/browser-test/ for a person to look at.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import opensora
from opensora.jobs import toc_notebooks

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "_build" / "browser-test"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def built_html(executed_book) -> Path:
    failed = {k: v for k, v in executed_book.results.items() if not hasattr(v, "notebook")}
    assert not failed, f"notebooks failed, see test_notebooks: {sorted(failed)}"
    jb = Path(sys.executable).parent / "jupyter-book"
    run = subprocess.run([str(jb), "build", str(executed_book.root), "--builder", "html", "-W",
                          "--keep-going"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return executed_book.root / "_build" / "html"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def chapter_pages(built_html: Path) -> list[Path]:
    """The built page of every notebook in _toc.yml (chapters and book/ notebooks)."""
    root = built_html.parent.parent
    return [built_html / nb.relative_to(root).with_suffix(".html") for nb in toc_notebooks(root)]


@pytest.mark.notebook  # builds the executed book
def test_every_page_builds(built_html: Path) -> None:
    assert (built_html / "index.html").is_file()
    for page in chapter_pages(built_html):
        assert page.is_file(), page


def test_api_reference_covers_every_module() -> None:

    documented = (ROOT / "book" / "api.md").read_text()
    modules = [m.name for m in pkgutil.walk_packages(opensora.__path__, "opensora.")
               if not m.ispkg or m.name == "opensora.parallel"]
    internal = {"opensora.parallel.comm", "opensora.parallel.context", "opensora.parallel.data",
                "opensora.parallel.optimizer", "opensora.parallel.rank_zero"}  # re-exported
    missing = [m for m in modules if m not in internal and f"automodule:: {m}\n" not in documented]
    assert not missing, f"book/api.md lacks {missing}"


@pytest.mark.notebook  # builds the executed book
def test_chapters_render_figures_without_errors(built_html: Path, browser) -> None:
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    chapters = chapter_pages(built_html)
    assert chapters
    for chapter in chapters:
        page.goto(chapter.as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate(
            "Array.from(document.querySelectorAll('.cell_output img'))"
            ".map(i => [i.naturalWidth, i.naturalHeight])")
        assert sizes, f"{chapter.name}: no figure in the outputs"
        assert all(w > 0 and h > 0 for w, h in sizes), f"{chapter.name}: broken image {sizes}"
        errors = page.evaluate(
            "document.querySelectorAll('.output.traceback, .output.error, .ansi-red-fg').length")
        text = page.inner_text("main")
        assert errors == 0 and "Traceback (most recent call last)" not in text, chapter.name
        page.screenshot(path=str(SCREENSHOTS / f"{chapter.stem}.png"), full_page=True)
    page.close()


@pytest.mark.notebook  # builds the executed book
def test_search_finds_a_word(built_html: Path, browser) -> None:
    page = browser.new_page()
    page.goto((built_html / "search.html").as_uri() + "?q=papermill")
    page.wait_for_selector("ul.search li", timeout=20000)
    results = page.locator("ul.search li").count()
    assert results >= 1
    page.close()
