"""Order of the gallery examples: from a first fit to finer points."""

import os

_ORDER = (
    "plot_quickstart.py",
    "plot_pipeline_grid_search.py",
    "plot_threshold.py",
    "plot_persistence.py",
    "plot_deploy_onnx.py",
    "plot_compare_settings.py",
)


class ExampleOrder:
    """Sort key for sphinx-gallery's ``within_subsection_order``.

    Known examples come in the order of ``_ORDER``; any other example follows,
    by file name.
    """

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __repr__(self):
        return "ExampleOrder"

    def __call__(self, filename):
        name = os.path.basename(filename)
        rank = _ORDER.index(name) if name in _ORDER else len(_ORDER)
        return rank, name
