"""skpatchcore: PatchCore industrial anomaly detection as scikit-learn estimators.

The names below are imported on first use (PEP 562), so that ``import
skpatchcore.runtime`` (the torch-free ONNX runtime) and the image reader of
``skpatchcore.utils._images`` never load torch. ``from skpatchcore import
make_patchcore`` works as usual and loads what that name needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .utils._errors import ModelFileError
from .utils._images import ImageReadError, SkippedImagesWarning
from .utils._pickling import ModelVersionWarning

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from ._backbones import BackboneError, known_backbones
    from ._coreset import GreedyCoresetSampler
    from ._detector import PatchCoreDetector
    from ._export import export_onnx
    from ._features import PatchFeatureTransformer
    from ._persistence import load, save
    from ._pipeline import PatchCorePipeline, make_patchcore

# Public name -> the private module that defines it (each imports torch).
_LAZY = {
    "BackboneError": "._backbones",
    "known_backbones": "._backbones",
    "GreedyCoresetSampler": "._coreset",
    "PatchCoreDetector": "._detector",
    "PatchFeatureTransformer": "._features",
    "load": "._persistence",
    "save": "._persistence",
    "PatchCorePipeline": "._pipeline",
    "make_patchcore": "._pipeline",
    "export_onnx": "._export",
}

__all__ = [
    "BackboneError",
    "GreedyCoresetSampler",
    "ImageReadError",
    "ModelFileError",
    "ModelVersionWarning",
    "PatchCoreDetector",
    "PatchCorePipeline",
    "PatchFeatureTransformer",
    "SkippedImagesWarning",
    "__version__",
    "export_onnx",
    "known_backbones",
    "load",
    "make_patchcore",
    "save",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
