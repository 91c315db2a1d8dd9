"""skpatchcore: PatchCore industrial anomaly detection as scikit-learn estimators."""

from ._backbones import BackboneError, known_backbones
from ._coreset import GreedyCoresetSampler
from ._detector import PatchCoreDetector
from ._features import PatchFeatureTransformer
from ._persistence import ModelFileError, load, save
from ._pipeline import PatchCorePipeline, make_patchcore
from ._version import __version__
from .utils._images import ImageReadError, SkippedImagesWarning
from .utils._pickling import ModelVersionWarning

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
    "known_backbones",
    "load",
    "make_patchcore",
    "save",
]
