"""The greedy coreset: which patch vectors enter the memory bank.

- :mod:`._sampler`: :class:`GreedyCoresetSampler`, the estimator.
- :mod:`._plain`: the plain greedy loop, the definition the engine must equal.
- :mod:`._exact`, :mod:`._bounds`, :mod:`._running`: the accelerated exact
  engine (batches of matrix products with proven error bounds), its bounds
  and its running distances; :mod:`._tuning` holds its tuned constants.
"""

from ._sampler import GreedyCoresetSampler

__all__ = ["GreedyCoresetSampler"]
