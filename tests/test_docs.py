"""The documentation: the Sphinx build (gallery included), its API pages and its doctests.

The build runs ``sphinx-build -W`` (every warning is an error) on a copy of
``docs/``, ``examples/`` and ``benchmarks/`` (whose ``results/`` the measured
tables are read from) in a temporary folder, so that every gallery example
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
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import skpatchcore

from .conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS, EXAMPLES, BENCHMARKS = ROOT / "docs", ROOT / "examples", ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
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
    shutil.copytree(BENCHMARKS, work / "benchmarks", ignore=shutil.ignore_patterns("__pycache__", "*.tmp"))
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


# --------------------------------------------------------------------------
# Measured tables: read from benchmarks/results/ at build time
# --------------------------------------------------------------------------

# Each page and the results files it renders with ``.. results-table::``.
STUDIES = ("geometry", "scoring", "scoring320")
RESULTS_ON_PAGES = {
    "user_guide/tuning": [f"tuning-{study}" for study in STUDIES] + ["tuning-selection"],
    "user_guide/benchmarks": ["latest", "speed"],
    "user_guide/production": ["ann"],
    "user_guide/gpu": ["gpu"],
    "user_guide/growing": ["scaling"],
    "user_guide/deploy": ["runtime"],
}


def results_extension():
    """docs/_ext/results_table.py, imported by path (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("results_table", DOCS / "_ext" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Characters a page shows differently from the file (markup, HTML escapes, smart quotes).
MARKUP = "`*<>&\"'"


def shown_as_is(cell: str) -> bool:
    return not set(cell) & set(MARKUP) and "--" not in cell and "..." not in cell


def table_cells(path: Path) -> list[str]:
    """The body cells of every table of a results file, as the extension parses them."""
    blocks = results_extension().parse_markdown(path.read_text(encoding="utf-8"))
    return [cell for block in blocks if block[0] == "table" for row in block[2] for cell in row if cell]


@pytest.mark.parametrize("page", sorted(RESULTS_ON_PAGES))
def test_measured_tables_show_the_results_files_or_say_how_to_make_them(built_docs, page):
    text = (built_docs / f"{page}.html").read_text()
    for name in RESULTS_ON_PAGES[page]:
        path = RESULTS / f"{name}.md"
        assert f"benchmarks/results/{name}.md" in text, name
        if not path.is_file():
            assert "Not measured yet" in text, name
            continue
        plain_cells = [cell for cell in table_cells(path) if shown_as_is(cell)]
        assert plain_cells, f"{path} has no table"
        missing = [cell for cell in plain_cells if cell not in text]
        assert not missing, f"{page} does not show these cells of {name}.md: {missing[:5]}"


def test_each_results_file_names_the_command_that_writes_it():
    default_command = results_extension().default_command
    assert default_command("tuning-geometry") == "python benchmarks/tune.py --study geometry"
    assert default_command("tuning-selection") == "python benchmarks/tune.py --select"
    assert default_command("latest") == "python benchmarks/run_benchmarks.py"
    assert default_command("other") == "the benchmark script that writes other.md"


def test_the_anchor_comparison_takes_the_defaults_from_latest_json(built_docs):
    import json

    text = (built_docs / "user_guide" / "tuning.html").read_text()
    anchors = results_extension().read_constants(str(BENCHMARKS / "run_benchmarks.py"), ("ANCHORS",))
    anchors = anchors["ANCHORS"]
    for per_implementation in anchors.values():
        for values in per_implementation.values():
            assert " / ".join(f"{value:.3f}" for value in values) in text
    latest = RESULTS / "latest.json"
    results = json.loads(latest.read_text())["results"] if latest.is_file() else []
    for result in results:
        compared = (result["category"], round(float(result["ratio"]), 6)) in anchors
        if compared and not result.get("settings") and "error" not in result and not result.get("quick"):
            cell = " / ".join(f"{result[metric]:.3f}" for metric in ("image_auroc", "pixel_auroc", "aupro"))
            assert cell in text, (result["category"], result["ratio"])


def test_the_results_directive_renders_tables_and_notes_missing_files(tmp_path):
    """A two-page build with its own results folder: no measured file is needed."""
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed")
    source, results = tmp_path / "source", tmp_path / "results"
    source.mkdir()
    results.mkdir()
    (results / "sample.md").write_text(
        "## A study\n\nMachine: `test box`, **two** cores.\n\n"
        "| setting | value |\n|---|---|\n| `a|b` | 0.123 |\n| plain_word_ | 4 |\n\n"
        "| second | table |\n|---|---|\n| x | 0.987 |\n"
    )
    (source / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        f"extensions = ['results_table']\nresults_dir = {str(results)!r}\n"
    )
    (source / "index.rst").write_text(
        "Results\n=======\n\n.. results-table:: sample\n   :text:\n\n"
        ".. results-table:: sample\n   :tables: 2,3\n\n"
        ".. results-table:: tuning-nothing\n"
    )
    command = [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(source), str(tmp_path / "html")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "html" / "index.html").read_text()
    assert page.count("<table") == 3  # both tables with :text:, then table 2 alone
    assert "a|b" in page and "plain_word_" in page and "0.987" in page
    assert "Machine:" in page and "<strong>two</strong>" in page
    assert "table 3 is not there yet" in page
    assert "benchmarks/results/tuning-nothing.md does not exist yet" in page
    words = re.sub(r"<[^>]+>", "", page)
    assert "python benchmarks/tune.py --study nothing" in words
