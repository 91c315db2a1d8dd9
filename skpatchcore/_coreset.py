"""Where skpatchcore up to 0.1 defined :class:`GreedyCoresetSampler`.

The coreset now lives in :mod:`skpatchcore.coreset`. This module stays so that
models pickled by those versions (``joblib.dump``), which name
``skpatchcore._coreset.GreedyCoresetSampler``, still load.
"""

from .coreset import GreedyCoresetSampler

__all__ = ["GreedyCoresetSampler"]
