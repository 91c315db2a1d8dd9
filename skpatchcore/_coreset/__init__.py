"""The greedy coreset: which patch vectors enter the memory bank.

- :mod:`._sampler`: :class:`GreedyCoresetSampler`, the estimator.
- :mod:`._plain`: the plain greedy loop, the definition the engine must equal.
- :mod:`._exact`, :mod:`._bounds`, :mod:`._running`, :mod:`._nearest`: the
  accelerated exact engine (batches of matrix products with proven error
  bounds), its bounds, its running distances and the start of a selection
  continued from a bank; :mod:`._tuning` holds its tuned constants.
- :mod:`._selection`: one selection as the sampler runs it;
  :mod:`._stream`: merge and reduce, for training sets too large to select
  from at once.

skpatchcore 0.1 defined the estimator in a module of this name: its pickles
name ``skpatchcore._coreset.GreedyCoresetSampler``, which still resolves here.
"""

from ._sampler import GreedyCoresetSampler

__all__ = ["GreedyCoresetSampler"]
