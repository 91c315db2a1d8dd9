"""Sphinx configuration of the skpatchcore documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` from the repository
root (``pip install -e ".[docs]"`` first). The gallery scripts in ``examples/``
run during the build; they take the MPDD metal_plate photos when that data set
is found (``SKPATCHCORE_DATA_DIR`` or a ``shared/datasets`` folder above the
working directory) and generated demo images otherwise.
"""

import os
import sys
import warnings

import skpatchcore

sys.path.insert(0, os.path.abspath("_ext"))

project = "skpatchcore"
author = "the skpatchcore developers"
copyright = "the skpatchcore developers, BSD-3-Clause"
version = skpatchcore.__version__
release = skpatchcore.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
    "cli_help",
    "results_table",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb", "auto_examples/*.py"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
default_role = "literal"

# -- API reference -----------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True}
autodoc_typehints = "none"
# numpydoc renders the sections; the class template lists the members itself.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- Measured tables (``.. results-table::``, ``.. anchor-comparison::``) --------
# None reads benchmarks/results/ next to this folder; a missing file shows a
# "not measured yet" note instead of failing the build.
results_dir = None

# -- doctest (sphinx-build -b doctest docs <out>) -----------------------------
doctest_global_setup = "import numpy as np"

# -- Figures drawn at build time (``.. plot::``) -------------------------------
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.dpi": 100, "savefig.bbox": "tight"}

# -- Gallery -------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"/_",
    "within_subsection_order": "gallery_order.ExampleOrder",
    "doc_module": ("skpatchcore",),
    "backreferences_dir": "generated/backreferences",
    "show_api_usage": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "min_reported_time": 0,
    "show_memory": False,
    "matplotlib_animations": False,
    "only_warn_on_example_error": False,
    "abort_on_example_error": True,
    "write_computation_times": True,
}

# Torch and timm announce future changes through warnings that are not ours
# to fix; keep them out of the example outputs.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"timm\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*")

# -- HTML ----------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"skpatchcore {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"auto_examples/index": [], "index": []}
html_static_path = []
html_show_sourcelink = False


# -- Public names missing from api.rst -------------------------------------------
# Modules that are not part of the Python API (the command line has its own page).
_NOT_API_MODULES = {"cli"}


def public_modules():
    """skpatchcore and its public submodules (no leading underscore), imported."""
    import importlib
    import pkgutil

    names = sorted(
        info.name
        for info in pkgutil.iter_modules(skpatchcore.__path__)
        if not info.name.startswith("_") and info.name not in _NOT_API_MODULES and info.name != "utils"
    )
    return [skpatchcore] + [importlib.import_module(f"skpatchcore.{name}") for name in names]


def _write_unlisted_names(path="generated/api_unlisted.inc", page="api.rst"):
    """List the public names that api.rst does not, so that they are documented anyway.

    A name is listed on api.rst when it appears there alone on a line (an
    autosummary entry), and a module when api.rst has an ``automodule`` for it.
    Anything else public, in ``skpatchcore.__all__`` or in a public submodule,
    goes into an "Other public names" section; autosummary picks the template
    (class, function, exception) from the object's kind.
    """
    import re

    with open(page, encoding="utf-8") as stream:
        text = stream.read()
    listed = set(re.findall(r"^\s+~?([A-Za-z_][\w.]*)\s*$", text, flags=re.MULTILINE))
    blocks = []
    for module in public_modules():
        public = getattr(module, "__all__", [])
        names = [name for name in sorted(public) if not name.startswith("__") and name not in listed]
        if module is not skpatchcore and f".. automodule:: {module.__name__}\n" not in text:
            names = sorted(public)
            title = f"``{module.__name__}``"
            blocks.append(
                f"{title}\n{'-' * len(title)}\n\n"
                f".. automodule:: {module.__name__}\n   :no-members:\n   :no-index:\n"
            )
        if names:
            entries = "".join(f"   {name}\n" for name in names)
            directive = ".. autosummary::\n   :toctree: generated/\n\n"
            blocks.append(f".. currentmodule:: {module.__name__}\n\n{directive}{entries}")
    output = ".. Written by conf.py; do not edit.\n"
    if blocks:
        output += "\nOther public names\n==================\n\n" + "\n".join(blocks)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(output)


_write_unlisted_names()


def _generate_unlisted_stubs(app):
    """Write the API pages of the names in generated/api_unlisted.inc.

    autosummary only scans documents for entries; the included file is not one,
    so its stubs are generated here, with the same templates.
    """
    from sphinx.ext.autosummary.generate import generate_autosummary_docs

    generated = os.path.join(app.srcdir, "generated")
    generate_autosummary_docs(
        [os.path.join(generated, "api_unlisted.inc")], output_dir=generated, base_path=app.srcdir, app=app
    )


def _skip_metadata_request_methods(app, what, name, obj, skip, options):
    """Leave out scikit-learn's generated ``set_*_request`` methods (metadata routing).

    scikit-learn adds them to every estimator class with extra method
    parameters; their docstrings point into scikit-learn's own documentation.
    """
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("builder-inited", _generate_unlisted_stubs)
    app.connect("autodoc-skip-member", _skip_metadata_request_methods)
