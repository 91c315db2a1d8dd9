"""The documentation: the Sphinx build (gallery included), its API pages and its doctests.

The build runs ``sphinx-build -W`` (every warning is an error) on a copy of
``docs/`` and ``examples/`` in a temporary folder, so that every gallery example
really runs and the checkout is left untouched. It takes a few minutes on two
cores; the examples use the MPDD photos when ``tests/conftest.py`` finds them
and generated images otherwise.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import skpatchcore

from .conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS, EXAMPLES = ROOT / "docs", ROOT / "examples"
DOC_TOOLS = ("sphinx", "numpydoc", "sphinx_gallery", "pydata_sphinx_theme")
BUILD_TIMEOUT_S = 1200
# What the build itself writes into docs/, never copied from a local build.
GENERATED = ("_build", "generated", "auto_examples", "sg_execution_times.rst", "__pycache__")


def public_submodules() -> list:
    """``skpatchcore.metrics``, ``skpatchcore.datasets`` and any other public submodule.

    The command line (``cli``) has a page of its own; ``utils`` is internal.
    """
    names = [
        info.name
        for info in pkgutil.iter_modules(skpatchcore.__path__)
        if not info.name.startswith("_") and info.name not in ("cli", "utils")
    ]
    assert {"metrics", "datasets"} <= set(names)
    return [importlib.import_module(f"skpatchcore.{name}") for name in sorted(names)]


def public_functions(module) -> list[str]:
    """``__all__`` plus any other public function defined in the module itself."""
    defined_here = [
        name
        for name, obj in inspect.getmembers(module, inspect.isfunction)
        if not name.startswith("_") and obj.__module__ == module.__name__
    ]
    return sorted(set(getattr(module, "__all__", [])) | set(defined_here))


def plotting_examples() -> list[Path]:
    return sorted(path for path in EXAMPLES.glob("plot_*.py") if "plt." in path.read_text())


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    """Build the HTML documentation once; return the build folder."""
    missing = [name for name in DOC_TOOLS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"documentation tools not installed: {missing} (pip install -e '.[docs]')")
    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(DOCS, work / "docs", ignore=shutil.ignore_patterns(*GENERATED))
    shutil.copytree(EXAMPLES, work / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    html = work / "html"
    env = dict(os.environ, SKPATCHCORE_DATA_DIR=str(DATA_DIR), MPLBACKEND="agg")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(html)]
    result = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"sphinx-build -W failed (exit {result.returncode}):\n{output[-8000:]}"
    return html


def test_docs_build_with_warnings_as_errors(built_docs):
    for page in ("index", "api", "auto_examples/index", "user_guide/how_it_works", "user_guide/cli"):
        assert (built_docs / f"{page}.html").is_file(), page


def test_gallery_contains_the_images_each_example_draws(built_docs):
    examples = plotting_examples()
    assert len(examples) >= 5
    for example in examples:
        images = sorted((built_docs / "_images").glob(f"sphx_glr_{example.stem}_*.png"))
        figures = [image for image in images if "thumb" not in image.name]
        assert figures, f"the gallery has no image drawn by {example.name}"
        page = (built_docs / "auto_examples" / f"{example.stem}.html").read_text()
        assert all(image.name in page for image in figures), example.name


def test_user_guide_figures_are_drawn_at_build_time(built_docs):
    page = (built_docs / "user_guide" / "how_it_works.html").read_text()
    for figure in ("coreset_2d", "heatmap_steps"):
        assert f"{figure}.png" in page, figure


def api_pages_text(built_docs: Path) -> str:
    pages = [built_docs / "api.html", *sorted((built_docs / "generated").glob("*.html"))]
    return "\n".join(page.read_text() for page in pages)


def test_api_reference_documents_every_public_name(built_docs):
    text = api_pages_text(built_docs)
    for name in skpatchcore.__all__:
        if name.startswith("__"):
            assert name in text, name
            continue
        page = built_docs / "generated" / f"skpatchcore.{name}.html"
        assert page.is_file(), f"no API page for skpatchcore.{name}"
        assert f'id="skpatchcore.{name}"' in page.read_text(), name
    for module in public_submodules():
        for name in public_functions(module):
            page = built_docs / "generated" / f"{module.__name__}.{name}.html"
            assert page.is_file(), f"no API page for {module.__name__}.{name}"


def test_public_methods_appear_on_their_class_pages(built_docs):
    for name in skpatchcore.__all__:
        obj = getattr(skpatchcore, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        page = (built_docs / "generated" / f"skpatchcore.{name}.html").read_text()
        for method, value in vars(obj).items():
            if callable(value) and not method.startswith("_") and value.__doc__:
                assert f'id="skpatchcore.{name}.{method}"' in page, f"{name}.{method}"


def test_cli_page_shows_the_help_of_every_command(built_docs):
    page = (built_docs / "user_guide" / "cli.html").read_text()
    for text in ("skpatchcore fit", "--ratio", "--image-size", "IMAGES_OR_DIR", "--recursive", "--data"):
        assert text in page, text


def guide_pages() -> list[str]:
    """The hand-written .rst pages (not those a local build may have generated)."""
    pages = [page.relative_to(DOCS) for page in DOCS.rglob("*.rst")]
    return sorted(str(page) for page in pages if not set(page.parts) & set(GENERATED))


@pytest.mark.parametrize("page", guide_pages())
def test_code_in_the_guide_runs_as_doctests(page):
    result = doctest.testfile(
        str(DOCS / page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
        report=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {page}"
