"""The running distances of the greedy loop, each known to an interval until needed exactly."""

from __future__ import annotations

import numpy as np

from ..utils._bf16 import UNIT_ROUNDOFF as _UNIT_ROUNDOFF
from . import _tuning as tuning
from ._bounds import pair_distances, torch_product
from ._plain import mean_start_distances


class Running:
    """The running distances, each known to an interval until its exact value is needed.

    The plain loop keeps, for every point, ``m`` = the minimum of its start
    distance (the mean distance to the start points) and its distances to the
    selected centres, each an exact float32 value. Only a point that may be
    among the farthest (the next batch, and ``tau``) needs ``m`` exactly; the
    candidates' bound only needs an upper end. So a contribution is first known
    to an interval, from products the loop makes anyway: the start distances
    from one small product (:meth:`bounds`), a centre's distance from the
    candidates' own bound (:meth:`Bound.intervals`). Its exact value is worked
    out, with the plain loop's arithmetic, only when its point must be exact
    (:meth:`settle`) and only if the interval says it may still be the minimum.

    ``min_dist`` holds ``m`` where ``exact`` and an upper end elsewhere, ``lo`` a
    lower end (``m`` where exact). ``base`` is the minimum of the contributions
    already worked out exactly; the others wait in a log of (point, centre,
    lower end), or, for the start distance, in ``start_pending`` with its lower
    end ``start_lo``. ``m`` is the minimum of ``base`` and the waiting values:
    pairs left out of the log were proven to be no lower than ``m`` was then.
    """

    def __init__(self, points, starts, min_dist=None):
        """Exact start distances ``min_dist`` if given; else call :meth:`bound`."""
        self.points, self.starts = points, starts
        n_points = len(points)
        self.min_dist, self.lo = min_dist, None if min_dist is None else min_dist.copy()
        self.base = None if min_dist is None else min_dist.copy()
        self.exact = np.ones(n_points, dtype=bool)
        self.start_pending = np.zeros(n_points, dtype=bool)
        self.start_lo = None
        self.n_inexact = 0
        self._log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._log_size = 0

    def bound(self, rows, sq_norms, scale, gamma, slack, floor) -> None:
        """Start from intervals (no exact start distance yet); see :meth:`bounds`."""
        self.start_lo, self.min_dist = self.bounds(rows, sq_norms, self.starts, scale, gamma, slack, floor)
        self.lo = self.start_lo.copy()
        self.base = np.full(len(self.exact), np.inf, dtype=np.float32)
        self.start_pending[:] = True
        self.exact[:] = False
        self.n_inexact = len(self.exact)

    @staticmethod
    def bounds(rows, sq_norms, starts, scale, gamma, slack, floor):
        """Float32 ``lo <= m <= hi`` around each point's start distance ``m``, as the plain loop computes it.

        ``rows`` (:class:`Rows`) are [x, sqrt(gamma) |x|, |x|^2] in the centred (and scaled)
        units of the bound (see :func:`candidates`). One product gives, for
        each point x and start c, the ends
        ``(|x|^2 - 2 <x, c> + |c|^2 +- (2 gamma + 8 u) (|x| + |c|)^2) (1 +- slack)^2 +- floor``
        of the squared distance. ``2 gamma (|x| + |c|)^2`` covers, four times
        over, the float32 rounding of that product and of the squared norms
        (together below (2 d + 4) u (|x| + |c|)^2, and 2 gamma >= 8 (d + 2) u),
        and ``8 u (|x| + |c|)^2`` that of the centring (which moves a distance
        by at most u (|x| + |c|)); ``slack`` and ``floor`` cover the plain
        loop's own float32 distance, as in the bound. The ends'
        square roots and their means over the k starts (one product with
        float32 weights) are float32 sums of positive numbers, within
        2 (k + 2) u (relative); the ends are then rounded outwards.
        """
        k, n_dims = len(starts), rows.n_dims
        u = _UNIT_ROUNDOFF
        rows.set_last(sq_norms)
        centres = rows.take(starts).astype(np.float64)
        norms_sq = sq_norms[starts].astype(np.float64)
        norms = np.sqrt(norms_sq)
        spread = 2.0 * gamma + 8.0 * u  # times (|x| + |c|)^2: the margin
        # (d + 2, 2k) columns: the upper ends for the k starts, then the lower ones.
        right = np.empty((n_dims + 2, 2 * k))
        constant = np.empty(2 * k)
        for side, sign in ((0, 1.0), (1, -1.0)):
            factor = (1.0 + sign * slack) ** 2
            columns = slice(side * k, (side + 1) * k)
            right[:n_dims, columns] = -2.0 * factor * centres[:, :n_dims].T
            right[n_dims, columns] = sign * factor * 2.0 * spread * norms / np.sqrt(gamma)
            right[n_dims + 1, columns] = factor * (1.0 + sign * spread)
            constant[columns] = factor * (1.0 + sign * spread) * norms_sq + sign * floor
        # In torch as the bound's product (NumPy's BLAS threads, left spinning after
        # a product, slowed torch's next products by half), tuning.CHUNK_POINTS rows at a
        # time, so the 2k values per row never all exist at once.
        right, constant = right.astype(np.float32), constant.astype(np.float32)
        margin = 2 * (k + 2) * u
        # The means, times (1 +- margin) / scale, as one more small product: columns
        # of weights (1 + margin) / (scale k) for the upper ends, (1 - margin) / (scale k)
        # for the lower ones (each rounded to float32: u more, within the margin).
        weights = np.zeros((2 * k, 2), dtype=np.float32)
        weights[:k, 0] = (1.0 + margin) / (scale * k)
        weights[k:, 1] = (1.0 - margin) / (scale * k)
        n_points, chunk = rows.n_points, min(tuning.CHUNK_POINTS, rows.block_rows)
        ends = np.empty((n_points, 2), dtype=np.float32)
        squared = np.empty((min(n_points, chunk), 2 * k), dtype=np.float32)
        for start in range(0, n_points, chunk):
            stop = min(start + chunk, n_points)
            part = squared[: stop - start]
            torch_product(rows.block(start, stop), right, out=part)
            part += constant
            np.maximum(part, 0.0, out=part)
            torch_product(np.sqrt(part, out=part), weights, out=ends[start:stop])
        hi, lo = ends.T
        return np.nextafter(lo, np.float32(-np.inf)).clip(0.0), np.nextafter(hi, np.float32(np.inf))

    def settle(self, rows: np.ndarray) -> None:
        """Make the running distances of ``rows`` (inexact ones, each once) exact."""
        if not len(rows):
            return
        hi, base = self.min_dist, self.base
        # A waiting value whose lower end is above the upper end of m cannot be m.
        pending = rows[self.start_pending[rows]]
        if len(pending):
            alive = pending[self.start_lo[pending] <= hi[pending]]
            if len(alive):
                start = mean_start_distances(self.points[alive], self.points[self.starts])
                base[alive] = np.minimum(base[alive], start)
            self.start_pending[pending] = False
        if self._log:
            points, centres, lows, alive = self._merged_log()
            listed = np.zeros(len(hi), dtype=bool)
            listed[rows] = True
            listed = listed[points]
            now = listed & alive
            if now.any():
                np.minimum.at(base, points[now], pair_distances(self.points, points[now], centres[now]))
            keep = ~listed & alive  # dead entries go too
            self._log = [(points[keep], centres[keep], lows[keep])] if keep.any() else []
            self._log_size = int(np.count_nonzero(keep))
        hi[rows] = self.lo[rows] = base[rows]
        self.exact[rows] = True
        self.n_inexact -= len(rows)

    def _merged_log(self):
        """The log as one set of arrays, and which entries may still be a minimum.

        An entry whose lower end is above its point's upper end cannot be the
        point's minimum (one equal to it can: the test is not strict).
        """
        points, centres, lows = (np.concatenate(parts) for parts in zip(*self._log))
        return points, centres, lows, lows <= self.min_dist[points]

    def settle_farthest(self, width: int):
        """Make exact every point that may be among the ``width + 1`` farthest.

        Returns a cutoff at most the (``width + 1``)-th largest value: afterwards
        every point at or above it is exact, and the ``width + 1`` farthest are
        among them (None where all points were settled).
        """
        n_points = len(self.exact)
        if width + 1 >= n_points:
            self.settle(np.flatnonzero(~self.exact))
            return None
        # The (width + 1)-th largest lower end is at most the (width + 1)-th largest
        # exact value; a point whose upper end is below it cannot reach that far.
        lower = np.where(self.exact, self.min_dist, self.lo) if self.n_inexact else self.min_dist
        cutoff = np.partition(lower, n_points - width - 1)[n_points - width - 1]
        if self.n_inexact:
            self.settle(np.flatnonzero(~self.exact & (self.min_dist >= cutoff)))
        return cutoff

    def lower_exact(self, distances) -> None:
        """Lower every point's value with exact ``distances`` (one per point)."""
        # A distance below the lower end is the new value, exactly.
        self.exact |= distances < self.lo
        for values in (self.base, self.min_dist, self.lo):
            np.minimum(values, distances, out=values)
        self.n_inexact = len(self.exact) - int(np.count_nonzero(self.exact))

    def lower_pairs(self, rows, centres, lows, highs) -> None:
        """Lower ``rows`` with distances to ``centres`` known to ``[lows, highs]`` (rows may repeat)."""
        useful = lows < self.min_dist[rows]  # else no lower than m: left out
        if not useful.all():
            rows, centres, lows, highs = rows[useful], centres[useful], lows[useful], highs[useful]
        if not len(rows):
            return
        np.minimum.at(self.min_dist, rows, highs)
        np.minimum.at(self.lo, rows, lows)
        self.exact[rows] = False
        self.n_inexact = len(self.exact) - int(np.count_nonzero(self.exact))
        if rows.base is not None and len(rows) < len(rows.base):
            rows, centres = rows.copy(), centres.copy()  # a slice would keep all of its array
        self._log.append((rows, centres, lows))
        self._log_size += len(rows)
        limit = tuning.LOG_POINTS * len(self.exact) + tuning.PAIR_CHUNK
        if self._log_size > limit:
            # Drop the entries that can no longer be a minimum; if that is not enough
            # (where intervals stay wide: far outliers make the bound's margin large),
            # work out the waiting distances rather than keep them.
            points, centres, lows, alive = self._merged_log()
            self._log = [(points[alive], centres[alive], lows[alive])]
            self._log_size = int(np.count_nonzero(alive))
            if self._log_size > limit // 2:
                logged = np.zeros(len(self.exact), dtype=bool)
                logged[self._log[0][0]] = True
                self.settle(np.flatnonzero(logged & ~self.exact))
