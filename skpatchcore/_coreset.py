"""GreedyCoresetSampler: PatchCore's greedy (k-center) coreset of the patch features."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from .utils._bf16 import BF16_UNIT as _BF16_UNIT
from .utils._bf16 import UNIT_ROUNDOFF as _UNIT_ROUNDOFF
from .utils._bf16 import bf16_bits_as_float32
from .utils._bf16 import bf16_hardware as _bf16_hardware
from .utils._buffers import empty_buffer
from .utils._device import as_tensor, cpu_float32, float32_precision, resolve_device
from .utils._pickling import VersionedPickleMixin
from .utils._validation import check_labels, check_patch_features

# Smallest safety margins of the batched bound (see _candidates); both grow with
# the dimension d. SLACK is relative to a point's running distance; GAMMA,
# relative to (|x| + |y|)^2, covers float32 rounding of the bound, at most
# 1.25 (d + 2) u (1 + gamma) of that scale (u = 2^-24): gamma is
# max(_GAMMA, 4 (d + 2) u), which for d = 128 leaves 2.6 times that.
_SLACK = 1e-4
_GAMMA = 5e-5
# The farthest _BATCH_WIDTH points form a batch, out of which the next picks are
# found. Bound rows are made for up to _BLOCK_ROWS picks at a time (all of a
# batch's, as _BATCH_WIDTH <= _BLOCK_ROWS), against as many points at a time as
# fill _PRODUCT_FLOATS (4096 for a full block); the start bounds take
# _CHUNK_POINTS points at a time. So the products read the points once per batch
# rather than once per 64 picks: on 2 cores, 21% less time at 1% of 235,000
# vectors of 256 dims, 10-23% at 10% of 96,000 Magnetic Tile vectors, 0-10% at
# 10% of MPDD's 42,336 (runs differ). (Twice the buffer, 16 MB, saved another
# 2.5% on Magnetic Tile but its temporaries raised the selection's peak over its
# input at MPDD 10% by 24 MB, the fit's by ~35 MB.)
_BATCH_WIDTH = 512
_BLOCK_ROWS = 512
# The bound's rows (the centred points and two columns, see _Rows) are kept whole
# up to this size; beyond, they are made from the points a block of this many
# bytes at a time whenever read (2 MB blocks took 40% longer than kept rows on
# MPDD at 1%: 11 products a batch, each with its own listing; 8 MB, 12%).
_KEEP_ROWS_BYTES = 64 << 20
_STREAM_BYTES = 8 << 20
_PRODUCT_FLOATS = 512 * 4096
_CHUNK_POINTS = 65536
# Exact distances to one centre are computed in blocks of this many rows, one
# block per thread, and exact distances of (point, centre) pairs in pieces of
# _PAIR_BLOCK pairs.
# Candidate pairs are bounded _PAIR_CHUNK at a time, so the float64 temporaries
# stay small however many candidates a range of points has.
_ROW_BLOCK = 4096
_PAIR_BLOCK = 1024
_PAIR_CHUNK = 65536
# The log of waiting distances is pruned (and if need be worked out) once it
# holds this many entries per point.
_LOG_POINTS = 2
# Data whose largest norm (after centring) lies in this range is not rescaled.
_UNSCALED_RANGE = (2.0**-16, 2.0**16)
# The bound's products may run in bfloat16 (float32 sums) where the CPU multiplies
# bfloat16 in hardware (AMX or AVX512-BF16) and passes the check of
# utils._bf16.bf16_sums_in_float32: 4x the float32 rate on our 2-core Xeon (AMX). Their margins
# are wider (see _LowBound), so more pairs are listed and worked out: faster on
# real patch features, slower on tight clusters. So _Chooser times both, batch by
# batch, once _LOW_AFTER centres are selected (on fewer, the trial costs more than
# it can save), for batches of at least _LOW_MIN_ROWS centres whose margin is
# below _LOW_MAX_SPREAD of the squared distances that matter (a batch of tight
# clusters at 1 to 14 took 2 to 7 times as long). _LOW_PRECISION None: so;
# True: bfloat16 for every batch; False: float32 (tests force both).
_LOW_PRECISION = None
_PROBE_EVERY = 4
_LOW_MIN_ROWS = 32
_LOW_MAX_SPREAD = 0.25
_LOW_AFTER = 1000
# The bfloat16 margins' analysis takes gamma below this; it grows with the
# dimension (8e-3 at 128, 0.05 from ~83,500 dimensions on): beyond, float32 only.
_LOW_MOST_GAMMA = 0.05
# A centre whose bound cannot rule out more than this fraction of all points is
# checked against every point (blocks of rows, nothing gathered) instead of
# listing the rest of them: early on, when running distances are large, that
# many pairs would fill the log. (Listing is cheaper per point than the exact
# pass, ~45 against ~140 ns: from 0.25 to 0.5, a 1% selection on MPDD took 5%
# less time, 10% on Magnetic Tile's subset 8% less.)
_DENSE_FRACTION = 0.5


def row_distances(points: np.ndarray, center: np.ndarray, work=None, out=None) -> np.ndarray:
    """Euclidean distance of each row of ``points`` to ``center`` (float32).

    Each row's value depends only on that row and ``center``: the same row
    gives bit-identical distances whatever other rows are computed with it,
    which is what lets the fast loop reproduce the plain loop exactly.
    ``work`` (shaped as ``points``) and ``out`` are optional buffers.
    """
    return _row_norms(np.subtract(points, center, out=work), out)


def _row_norms(diff: np.ndarray, out=None) -> np.ndarray:
    """The Euclidean norm of each row of ``diff``: :func:`row_distances`' arithmetic."""
    out = np.einsum("ij,ij->i", diff, diff, out=out)
    return np.sqrt(out, out=out)


def _mean_start_distances(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Each row's mean distance to ``centers``, as the plain loop's warm start computes it."""
    return np.stack([row_distances(block, center) for center in centers], axis=1).mean(axis=1)


def initial_distances(points: np.ndarray, starts: np.ndarray, pool=None) -> np.ndarray:
    """Mean distance of every point to the start points (the reference's warm start).

    With a thread ``pool``, blocks of rows are computed side by side (numpy
    releases the GIL); each row's value is the same either way.
    """
    centers = points[starts]
    return _by_blocks(lambda block: _mean_start_distances(block, centers), points, pool)


def _by_blocks(per_row, points: np.ndarray, pool) -> np.ndarray:
    """``per_row(points)`` (one value per row), in blocks of rows side by side on ``pool``.

    ``per_row`` must give each row a value that depends on that row alone, so
    the result is the same bits either way; without a pool, or for fewer than
    two blocks of rows, it runs in one call.
    """
    if pool is None or len(points) < 2 * _ROW_BLOCK:
        return per_row(points)
    out = np.empty(len(points), dtype=np.result_type(points.dtype, np.float32))

    def fill(start):
        out[start : start + _ROW_BLOCK] = per_row(points[start : start + _ROW_BLOCK])

    list(pool.map(fill, range(0, len(points), _ROW_BLOCK)))
    return out


class _Rows:
    """The bound's rows ``[x, r, last]``: ``x`` the points minus ``mean`` (times
    ``scale``, a power of two, see :meth:`rescale`), ``r = sqrt(gamma) |x|`` and a
    last column set for each use.

    Kept whole where that takes at most ``_KEEP_ROWS_BYTES``; otherwise each read
    makes its rows from the points, ``_STREAM_BYTES`` at a time, in a reused
    buffer. Forced on MPDD's 42,336 x 128 vectors that took 12% longer at 1%, 4%
    at 10%, but it saves a copy of all points with two more columns: on 500,000
    x 152 vectors the selection's peak over its input fell from 361 to 90 MB.
    Both ways run the same arithmetic on the same values, so give the same bits.
    """

    def __init__(self, points: np.ndarray, mean: np.ndarray):
        self.points, (self.n_points, self.n_dims) = points, points.shape
        self.mean, self.scale = torch.from_numpy(mean), 1.0
        self.roots = self.last = None
        n_points, n_dims = self.n_points, self.n_dims
        self.whole = None
        if n_points * (n_dims + 2) * 4 <= _KEEP_ROWS_BYTES:
            self.whole = torch.empty((n_points, n_dims + 2))
            self._centre(slice(0, n_points), self.whole[:, :n_dims])
            self.block_rows = max(1, n_points)
        else:
            self.block_rows = max(1, min(n_points, _STREAM_BYTES // (4 * (n_dims + 2))))
            self._buffer = torch.empty((self.block_rows, n_dims + 2))

    def _centre(self, rows, out: torch.Tensor) -> None:
        """``out`` = x of ``rows`` (a slice or an index array): the points' difference
        from the mean, in torch (one pass on every core), times the scale."""
        torch.sub(as_tensor(self.points[rows]), self.mean, out=out)
        if self.scale != 1.0:
            out.mul_(self.scale)

    def squared_norms(self) -> np.ndarray:
        """|x|^2 of every row, in float32."""
        if self.whole is not None:
            return _squared_norms(self.whole[:, : self.n_dims])
        norms = np.empty(self.n_points, dtype=np.float32)
        for start in range(0, self.n_points, self.block_rows):
            block = self.block(start, start + self.block_rows, columns=False)
            norms[start : start + len(block)] = _squared_norms(torch.from_numpy(block[:, : self.n_dims]))
        return norms

    def rescale(self, scale: float) -> None:
        """Multiply x by ``scale`` (a power of two: exact)."""
        self.scale = scale
        if self.whole is not None:
            self.whole[:, : self.n_dims].mul_(scale)

    def set_roots(self, roots: np.ndarray) -> None:
        self.roots = roots
        if self.whole is not None:
            self.whole[:, self.n_dims] = torch.from_numpy(roots)

    def set_last(self, last: np.ndarray) -> None:
        """The last column (the array is read, not copied, where rows are not kept)."""
        self.last = last
        if self.whole is not None:
            self.whole[:, self.n_dims + 1] = torch.from_numpy(last)

    def block(self, start: int, stop: int, columns: bool = True) -> np.ndarray:
        """Rows ``start:stop`` (at most ``block_rows``), valid until the next call;
        only x where ``columns`` is False."""
        if self.whole is not None:
            return self.whole[start:stop].numpy()
        stop = min(stop, self.n_points)
        return self._make(slice(start, stop), self._buffer[: stop - start], columns)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """A copy of the rows at the indices ``rows``."""
        if self.whole is not None:
            return self.whole.numpy()[rows]
        return self._make(rows, torch.empty((len(rows), self.n_dims + 2)), columns=True)

    def _make(self, rows, out: torch.Tensor, columns: bool) -> np.ndarray:
        """``out`` = the rows at ``rows`` (a slice or an index array), made from the points."""
        self._centre(rows, out[:, : self.n_dims])
        if columns:
            out[:, self.n_dims] = torch.from_numpy(self.roots[rows])
            out[:, self.n_dims + 1] = torch.from_numpy(self.last[rows])
        return out.numpy()


class _Running:
    """The running distances, each known to an interval until its exact value is needed.

    The plain loop keeps, for every point, ``m`` = the minimum of its start
    distance (the mean distance to the start points) and its distances to the
    selected centres, each an exact float32 value. Only a point that may be
    among the farthest (the next batch, and ``tau``) needs ``m`` exactly; the
    candidates' bound only needs an upper end. So a contribution is first known
    to an interval, from products the loop makes anyway: the start distances
    from one small product (:meth:`bounds`), a centre's distance from the
    candidates' own bound (:meth:`_Bound.intervals`). Its exact value is worked
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

        ``rows`` (:class:`_Rows`) are [x, sqrt(gamma) |x|, |x|^2] in the centred (and scaled)
        units of the bound (see :func:`_candidates`). One product gives, for
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
        # a product, slowed torch's next products by half), _CHUNK_POINTS rows at a
        # time, so the 2k values per row never all exist at once.
        right, constant = right.astype(np.float32), constant.astype(np.float32)
        margin = 2 * (k + 2) * u
        # The means, times (1 +- margin) / scale, as one more small product: columns
        # of weights (1 + margin) / (scale k) for the upper ends, (1 - margin) / (scale k)
        # for the lower ones (each rounded to float32: u more, within the margin).
        weights = np.zeros((2 * k, 2), dtype=np.float32)
        weights[:k, 0] = (1.0 + margin) / (scale * k)
        weights[k:, 1] = (1.0 - margin) / (scale * k)
        n_points, chunk = rows.n_points, min(_CHUNK_POINTS, rows.block_rows)
        ends = np.empty((n_points, 2), dtype=np.float32)
        squared = np.empty((min(n_points, chunk), 2 * k), dtype=np.float32)
        for start in range(0, n_points, chunk):
            stop = min(start + chunk, n_points)
            part = squared[: stop - start]
            _torch_product(rows.block(start, stop), right, out=part)
            part += constant
            np.maximum(part, 0.0, out=part)
            _torch_product(np.sqrt(part, out=part), weights, out=ends[start:stop])
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
                start = _mean_start_distances(self.points[alive], self.points[self.starts])
                base[alive] = np.minimum(base[alive], start)
            self.start_pending[pending] = False
        if self._log:
            points, centres, lows, alive = self._merged_log()
            listed = np.zeros(len(hi), dtype=bool)
            listed[rows] = True
            listed = listed[points]
            now = listed & alive
            if now.any():
                np.minimum.at(base, points[now], _pair_distances(self.points, points[now], centres[now]))
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
        limit = _LOG_POINTS * len(self.exact) + _PAIR_CHUNK
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


def _pair_distances(points: np.ndarray, rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Exact distance of each ``points[rows[k]]`` to ``points[centres[k]]``, as :func:`row_distances`."""
    out = np.empty(len(rows), dtype=np.float32)
    size = min(_PAIR_BLOCK, len(rows))
    work = np.empty((size, points.shape[1]), dtype=points.dtype)
    other = np.empty_like(work)
    for start in range(0, len(rows), size):
        stop = min(start + size, len(rows))
        # take(mode="clip") fills the buffers in place (the indices are valid).
        diff = np.take(points, rows[start:stop], axis=0, out=work[: stop - start], mode="clip")
        diff -= np.take(points, centres[start:stop], axis=0, out=other[: stop - start], mode="clip")
        _row_norms(diff, out=out[start:stop])
    return out


class _Bound:
    """The candidates' bound (see :func:`_candidates`): its rows and per-point terms.

    ``rows`` (:class:`_Rows`) are ``[x, sqrt(gamma) |x|, c]`` with ``x`` the
    centred, scaled point and ``c`` the last column, set for each batch by
    :meth:`aim`.
    """

    def __init__(self, rows, sq_norms, scale, gamma, slack, floor):
        """``rows``' roots must be ``r = sqrt(gamma) |x|``."""
        n_points, n_dims = rows.n_points, rows.n_dims
        self.source, self.sq_norms, self.n_dims = rows, sq_norms, n_dims
        self.scale, self.gamma, self.slack, self.floor = scale, gamma, slack, floor
        self.roots = rows.roots  # r, read back in intervals
        self.column = np.empty(n_points, dtype=np.float32)
        u = _UNIT_ROUNDOFF
        self._size_margin = np.float32(4.0 * (n_dims + 2) * u * (1.0 + gamma) + 8.0 * u)
        self._column_margin = np.float32(4.0 * (n_dims + 2) * u)

    def half_center(self, rows):
        """The candidates' thresholds ``(1 - gamma) |x_s|^2 / 2`` of centres ``rows``."""
        return 0.5 * (1.0 - self.gamma) * self.sq_norms[rows]

    def left(self, rows, half_center) -> np.ndarray:
        """The centres' rows ``[x_s, r_s, 1]`` (a copy)."""
        left = self.source.take(rows)
        left[:, -1] = 1.0
        return left

    def most_points(self) -> int:
        """The most points one product may take (the rows made at a time)."""
        return self.source.block_rows

    def listed(self, left, half_center, start: int, width: int, work: np.ndarray):
        """The pairs of the centres ``left`` and the points ``start:start + width``
        that the test keeps: (point offsets, centre positions, product entries).
        ``work`` (float32) holds the product: centres x points."""
        bounds = work[: len(left) * width].reshape(len(left), width)
        _torch_product(left, self.source.block(start, start + width).T, out=bounds)
        flat = np.flatnonzero(bounds > half_center[:, None])
        local = flat // width
        return flat - local * width, local, np.take(bounds.reshape(-1), flat)

    def aim(self, min_dist) -> None:
        """Set the last column to ``-half_point`` for running distances ``min_dist`` (upper ends).

        Point i is a candidate for centre s when <a_i, a_s> - half_point_i >
        half_center_s, i.e. when |x_i - x_s|^2 minus the margin is below
        (m_i (1 + slack))^2; the centre's row has 1 in the last column, so the
        product subtracts half_point_i.
        """
        self.source.set_last(self._aim_column(min_dist))

    def _aim_column(self, min_dist) -> np.ndarray:
        """``-half_point`` of every point for running distances ``min_dist``, in ``self.column``."""
        column = self.column
        scaled = min_dist * np.float32(self.scale)  # exact: a power of two
        # Worked out in a contiguous array, then written to the strided column once.
        np.square(np.multiply(scaled, 1.0 + self.slack, out=scaled), out=column)
        np.subtract(column, np.multiply(self.sq_norms, 1.0 - self.gamma, out=scaled), out=column)
        column *= 0.5
        column += self.floor
        return column

    def intervals(self, values, rows, centres):
        """Float32 ``lo <= d <= hi`` for the plain loop's distance ``d`` of each candidate pair.

        ``values`` are the candidates' bound entries (see :func:`_candidates`):
        the float32 product ``v`` of a point's row ``[x_i, r_i, c_i]`` with a
        centre's ``[x_s, r_s, 1]``, where ``r = sqrt(gamma) |x|``. So
        ``|x_i - x_s|^2 = |x_i|^2 + |x_s|^2 - 2 v + 2 r_i r_s + 2 c_i``, up to
        rounding: the product's, at most (d + 2) u times the sum of its terms'
        sizes, itself below 0.25 (1 + gamma) (|x_i| + |x_s|)^2 + |c_i|, and each
        squared norm's, d u times itself. The margin ``4 (d + 2) u ((1 + gamma)
        (|x_i| + |x_s|)^2 + |c_i|)`` covers these twice over (its own float32
        arithmetic, and that of ``r_i r_s``, a few u of it), ``8 u (|x_i| +
        |x_s|)^2`` the centring (as in :meth:`_Running.bounds`); ``(1 +- slack)^2``
        and ``2 floor`` cover the plain loop's own float32 distance and
        products below the normal range (subnormal or flushed to zero). The
        estimate and the ends are worked out in float64 and rounded outwards to
        float32.
        """
        column = self.column[rows]
        estimate = self._estimate(values, rows, centres, column)
        margin = self._size_margin * self._size(rows, centres)
        margin += self._column_margin * np.abs(column)
        return self._ends(estimate, margin)

    def _estimate(self, values, rows, centres, column):
        """|x_i - x_s|^2 from the product entries ``values``, in float64 (the terms are float32)."""
        estimate = np.add(self.sq_norms[rows], self.sq_norms[centres], dtype=np.float64)
        estimate -= 2.0 * values  # (doubling a float32 is exact)
        estimate += 2.0 * column
        roots = self.roots
        estimate += 2.0 * (roots[rows] * roots[centres])
        return estimate

    def _size(self, rows, centres):
        """(|x_i| + |x_s|)^2, in float32."""
        size = np.sqrt(self.sq_norms[rows]) + np.sqrt(self.sq_norms[centres])
        size *= size
        return size

    def _ends(self, estimate, margin):
        """Float32 ``lo, hi`` around the plain loop's distance, from the squared
        distance ``estimate`` (float64) and its ``margin``."""
        ends = []
        for sign in (1.0, -1.0):
            end = np.add(estimate, sign * margin)  # float64
            end *= (1.0 + sign * self.slack) ** 2
            end += sign * 2.0 * self.floor
            np.sqrt(np.maximum(end, 0.0, out=end), out=end)
            if self.scale != 1.0:
                end /= self.scale
            ends.append(end.astype(np.float32))
        hi, lo = ends
        return np.nextafter(lo, np.float32(-np.inf)).clip(0.0), np.nextafter(hi, np.float32(np.inf))


class _LowBound(_Bound):
    """The bound with its products in bfloat16: the same test, wider margins.

    ``rows`` (bfloat16) are ``[x, r, c_hi, c_lo, 1, 1]`` for the points and
    ``[x_s, r_s, 1, 1, -h_hi, -h_lo]`` for the centres, where ``c`` is the
    point's last column of :class:`_Bound` (set by :meth:`aim`), ``h`` the
    centre's half_center and ``hi + lo`` a split of a float32 value into two
    bfloat16 ones (``lo`` rounds the exact remainder: within u_b^2 of the
    value, u_b = 2^-8). So one product gives ``q = <a_i, a_s> - half_center_s``
    directly, and a point is listed when ``q > 0``: its rounding to bfloat16
    keeps the sign, so only the products' own rounding needs a margin.

    That rounding (:func:`~skpatchcore.utils._bf16.bf16_sums_in_float32`: exact products, summed in
    float32, rounded to bfloat16 once): x and r are rounded to bfloat16, so each
    of their products is off by (2 u_b + u_b^2) of itself, in all at most
    ``(2 u_b + u_b^2) (1 + gamma) |x_i| |x_s|``; the splits by ``u_b^2 (|c_i| +
    h_s)``; the float32 sum of k = d + 5 terms by ``k u / (1 - k u)`` times
    their sizes. With ``|x_i| |x_s| <= S / 4``, S = (|x_i| + |x_s|)^2, this is
    ``beta_s S + beta_c (|c_i| + h_s)``. ``gamma`` is chosen so that
    ``gamma S / 2`` is twice that error's part in S plus the float32 part of
    :class:`_Bound` (norms, centring), ``slack`` to cover its part in m'^2 (as
    c_i <= (m'^2 + |x_i|^2) / 2) twice, and the floor also covers products and
    rounded entries below the normal range (``tiny`` each, or ``tiny`` times
    the largest entry of the other side).

    :meth:`intervals` reads ``q`` back: ``v = q + h_s`` in :class:`_Bound`'s
    terms, off by the product's error plus ``q``'s rounding to bfloat16 (u_b
    of it, from above ``u_b / (1 - u_b)`` of the rounded value), all twice over.
    """

    def __init__(self, source, sq_norms, scale, floor):
        """``source``: :class:`_Bound`'s rows (:class:`_Rows`; their ``x`` is read)."""
        n_points, n_dims = source.n_points, source.n_dims
        u, unit, tiny = _UNIT_ROUNDOFF, _BF16_UNIT, float(np.finfo(np.float32).tiny)
        terms = n_dims + 5
        gamma, slack, beta_s, beta_c = self.margins(n_dims)
        radius = math.sqrt(float(sq_norms.max())) if n_points else 0.0  # in the bound's units
        subnormal = tiny * (4 * terms + 4 * math.sqrt(terms) * (radius + 1.0))
        super().__init__(source, sq_norms, scale, gamma, slack, floor + 2 * subnormal + 4 * tiny)
        self.source = None
        self.roots = np.sqrt(gamma * sq_norms)
        self._size_margin = np.float32(4 * beta_s + 2 * n_dims * u + 8 * u)
        self._column_margin = np.float32(4 * beta_c)
        self._value_margin = np.float32(4 * unit / (1 - unit) * 1.01)
        # Kept whole, whatever the size (unlike _Rows: made afresh each batch, they
        # would cost their saving): half the float32 rows, 157 MB for 500,000 x 152.
        rows = torch.empty((n_points, terms), dtype=torch.bfloat16)
        for start in range(0, n_points, source.block_rows):  # (no temporary of the whole)
            block = source.block(start, start + source.block_rows, columns=False)
            # (rounded to nearest)
            rows[start : start + len(block), :n_dims] = torch.from_numpy(block[:, :n_dims])
        rows[:, n_dims] = torch.from_numpy(self.roots)
        rows[:, n_dims + 3 :] = 1.0
        self.rows = rows

    @staticmethod
    def margins(n_dims: int):
        """``gamma``, ``slack``, ``beta_s`` and ``beta_c`` (see the class) for ``n_dims``."""
        u, unit = _UNIT_ROUNDOFF, _BF16_UNIT
        terms = n_dims + 5
        sums = terms * u / (1.0 - terms * u)
        most_gamma = _LOW_MOST_GAMMA  # gamma itself is below (else float32 only)
        beta_s = 1.01 * (2 * unit + unit * unit + sums * (1 + unit) ** 2) * (1 + most_gamma) / 4
        beta_c = 1.01 * (unit * unit + sums * (1 + unit) ** 2)
        gamma = 4.0 * (beta_s + beta_c / 2 + 1.25 * (n_dims + 2) * u * (1 + most_gamma))
        slack = max(_SLACK, 2 * (n_dims + 2) * u + 2.02 * beta_c)
        return gamma, slack, beta_s, beta_c

    def aim(self, min_dist) -> None:
        """Set the ``c`` columns (see the class) for running distances ``min_dist``."""
        column = torch.from_numpy(self._aim_column(min_dist))
        high = column.to(torch.bfloat16)
        self.rows[:, self.n_dims + 1] = high
        self.rows[:, self.n_dims + 2] = column - high.float()  # exact in float32, then rounded

    def most_points(self) -> int:
        return len(self.sq_norms)

    def listed(self, left, half_center, start: int, width: int, work: np.ndarray):
        """As :meth:`_Bound.listed`, the product in bfloat16 (``work`` holds as many
        bfloat16 entries, their bits as int16), points x centres (twice as fast in
        bfloat16 as the other way round); the entries are the products' ``q``."""
        bits = work.view(np.int16)[: len(left) * width].reshape(width, len(left))
        torch.mm(self.rows[start : start + width], left.T, out=torch.from_numpy(bits).view(torch.bfloat16))
        # A positive bfloat16 has a positive int16 pattern; -0 and 0 do not.
        flat = np.flatnonzero(bits > 0)
        points_at, local = np.divmod(flat, len(left))
        # The bfloat16 bits, as the float32 of the same value.
        values = bf16_bits_as_float32(np.take(bits.reshape(-1), flat))
        return points_at, local, values

    def left(self, rows, half_center) -> torch.Tensor:
        """The centres' rows ``[x_s, r_s, 1, 1, -h_hi, -h_lo]``."""
        n_dims = self.n_dims
        left = self.rows[torch.from_numpy(rows)]
        left[:, n_dims + 1 : n_dims + 3] = 1.0
        half = torch.from_numpy(half_center)
        high = half.to(torch.bfloat16)
        left[:, n_dims + 3] = -high
        left[:, n_dims + 4] = high.float() - half
        return left

    def intervals(self, values, rows, centres):
        """As :meth:`_Bound.intervals`, for ``values`` = the rounded ``q`` (see the class)."""
        column = self.column[rows]
        half = self.half_center(centres)  # the same float32 values as in the product
        estimate = self._estimate(values, rows, centres, column)
        estimate -= 2.0 * half
        margin = self._size_margin * self._size(rows, centres)
        margin += self._column_margin * (np.abs(column) + half)
        margin += self._value_margin * np.abs(values)
        return self._ends(estimate, margin)


def _distances_to(points: np.ndarray, center: np.ndarray, pool) -> np.ndarray:
    """:func:`row_distances` of all ``points``, in blocks side by side."""
    return _by_blocks(lambda block: row_distances(block, center), points, pool)


def greedy_indices_cpu(points: np.ndarray, n_select: int, starts: np.ndarray, progress=None) -> np.ndarray:
    """Greedy k-center selection, exactly as the plain loop, in batches.

    The plain loop (take the point farthest from the selection, lower every
    point's distance to it, repeat) reads all points once per selected point:
    a memory-bound pass. Here the work is batched so it runs as a matrix
    product instead, without changing a single result:

    1. The running distances ``m`` only ever decrease. So if ``S`` holds the
       ``_BATCH_WIDTH`` farthest points (ties by index, as ``np.argmax``) and
       ``tau`` is the largest ``m`` outside ``S``, the next selections come out of
       ``S`` for as long as some member of ``S`` is still above ``tau``.
    2. Which members those are, and in which order, depends only on the
       members' own distances: :func:`_batch_picks` replays the loop on ``S``
       alone, so every pick of the batch is known before any work on the
       other points.
    3. For the picks, one matrix product gives every point's squared distance
       to them, up to a proven error bound (float32 products, or bfloat16 ones
       where the CPU has them and they are faster: :class:`_LowBound`). A pick
       can lower a point's ``m`` only if that bound says it *might* be closer;
       all other points provably keep their ``m``.
    4. The same product entry also bounds the candidate's distance from both
       sides, to a few 1e-4 (relative; a few 1e-2 from bfloat16). The running
       distances are kept as intervals (:class:`_Running`): a point's ``m`` is
       worked out exactly, with :func:`row_distances`' arithmetic (the plain
       loop's own), only when the point may be among the ``_BATCH_WIDTH + 1``
       farthest, and then only from the distances whose intervals say they may
       be its minimum. So the running distances the batches use are
       bit-identical to the plain loop's, and so are the selected indices.
    5. The start distances (each point's mean distance to the start points,
       ``len(starts)`` exact passes in the plain loop) are bounded the same
       way, from one more small product, and worked out only where needed.

    So each selected point costs one bound row (a row of a matrix product),
    an interval for each of its candidates (a few hundred per selected point
    on the patch features of one MVTec-style category) and exact distances for
    the few points that reach the top of the running distances.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)  # as the plain loop: float32 distances
    n_points, n_dims = points.shape
    n_workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=n_workers) as pool, contextlib.ExitStack() as stack:
        # Rows [centered, sqrt(gamma) * norm, -half_point] (see _candidates): the
        # product adds the cross term of the margin gamma * (|x| + |y|)^2 and
        # subtracts each point's offset for free. It reads the rows transposed (a
        # view: BLAS takes either layout), so no transposed copy is made.
        gamma = max(_GAMMA, 4 * (n_dims + 2) * _UNIT_ROUNDOFF)
        slack = max(_SLACK, 2 * (n_dims + 2) * _UNIT_ROUNDOFF)
        # The smallest normal float32: a result that falls below it is off by less,
        # whether the CPU rounds it to a subnormal or flushes it to zero (FTZ/DAZ, as
        # torch.set_flush_denormal(True) or a -ffast-math library sets them).
        tiny = float(np.finfo(np.float32).tiny)
        # The centre only has to be central (the bound holds for any): the mean of
        # ~4096 rows spread over the data, at a fraction of a full pass.
        mean = points[:: max(1, n_points // 4096)].mean(axis=0, dtype=np.float64).astype(np.float32)
        # Centred rows (in torch: NumPy on the thread pool took twice as long).
        rows = _Rows(points, mean)
        sq_norms = rows.squared_norms()
        # The largest centred norm (NaN stays NaN; inf where the squares overflow).
        radius = math.sqrt(float(sq_norms.max())) if n_points else 0.0
        # Start distances are worked out lazily (_Running) for data of ordinary
        # magnitude, where no distance can overflow; otherwise all of them first.
        lazy = math.isfinite(radius) and 2.0**-60 < radius and 4.0 * radius**2 < 2.0**120
        min_dist = None
        if not lazy:
            min_dist = initial_distances(points, starts, pool).astype(np.float32)
            if not (math.isfinite(radius) and np.isfinite(min_dist).all()) or 0.0 < radius < 2.0**-100:
                return _plain_indices(points, min_dist, n_select, pool, progress)
        # The bound's rounding analysis needs squares that can neither overflow nor,
        # for all but far-out coordinates, fall to subnormals (the floor below covers
        # those). Data whose norms are far from 1 is scaled by a power of two
        # (exactly) to bring the largest norm into [0.5, 1); where the plain loop's
        # own squares would be mostly rounding (all norms below 2^-100) it runs instead.
        scale = 1.0
        if not _UNSCALED_RANGE[0] <= radius < _UNSCALED_RANGE[1]:
            scale = 2.0 ** -math.frexp(radius)[1] if radius > 0 else 1.0
            rows.rescale(scale)
            sq_norms = rows.squared_norms()
        # Absolute floors, where rounding errors are absolute rather than relative:
        # products of the bound that fall below the normal range, and the exact
        # distances' own squares where the raw differences are that small (only for
        # data of about 1e-18 and below; in scaled units, where it then dominates).
        floor = 4 * (n_dims + 2) * tiny + min(1e30, (n_dims + 1) * tiny * scale * scale)
        rows.set_roots(np.sqrt(gamma * sq_norms))  # r = sqrt(gamma) |x|
        running = _Running(points, starts, min_dist)
        if lazy:
            running.bound(rows, sq_norms, scale, gamma, slack, floor)
        low_gamma = _LowBound.margins(n_dims)[0]
        mode = _low_precision() if low_gamma <= _LOW_MOST_GAMMA else False
        if mode == "always":  # its bfloat16 rows replace the float32 ones
            bounds = [_LowBound(rows, sq_norms, scale, floor)]
            rows = None
        else:  # the bfloat16 bound is made when first taken
            bounds = [_Bound(rows, sq_norms, scale, gamma, slack, floor), None]
        chooser = _Chooser(1 if mode != "measured" else 2)
        # The bfloat16 margin, gamma (|x| + |y|)^2 for points of average norm.
        margin_size = 0.0
        if mode == "measured":
            margin_size = 4.0 * low_gamma * float(np.mean(sq_norms, dtype=np.float64))
        min_dist = running.min_dist
        work = stack.enter_context(_work_buffer(n_points))
        selected = np.empty(n_select, dtype=np.int64)
        count, timing = 0, None
        while count < n_select:
            cutoff = running.settle_farthest(min(_BATCH_WIDTH, n_points))
            if timing is not None:  # the last lowering's cost includes the exact values it left
                chooser.record(*timing, time.perf_counter())
            batch, tau, tau_index = _farthest_batch(min_dist, min(_BATCH_WIDTH, n_points), cutoff)
            chosen = _batch_picks(points, batch, min_dist[batch], tau, tau_index, n_select - count)
            selected[count : count + len(chosen)] = chosen
            count += len(chosen)
            if count < n_select:  # after the last picks, no distance to them is needed
                # The bfloat16 margin over the squared distance the batch started below.
                spread = margin_size / max((tau * scale) ** 2, tiny)
                which = chooser.pick(len(chosen), spread, count)
                if bounds[which] is None:
                    bounds[which] = _LowBound(rows, sq_norms, scale, floor)
                timing = (which, len(chosen), time.perf_counter())  # (not the rows' making)
                bound = bounds[which]
                _lower_to(chosen, points, bound, running, work, pool)
            if progress is not None:
                progress.update(len(chosen))
    return selected


# One full-size product buffer is kept between selections (8 MB): mapping a new
# one took ~1.8 ms, 3% of a 1% selection on MPDD.
_SPARE_WORK: list[np.ndarray] = []
_SPARE_LOCK = threading.Lock()


@contextlib.contextmanager
def _work_buffer(n_points: int):
    """The float32 product buffer for ``n_points`` points: ``_BLOCK_ROWS`` rows of
    up to ``_PRODUCT_FLOATS / _BLOCK_ROWS`` points; the spare one if free and of that size."""
    full_width = max(1, _PRODUCT_FLOATS // _BLOCK_ROWS)
    size = _BLOCK_ROWS * min(full_width, n_points)
    with _SPARE_LOCK:
        work = _SPARE_WORK.pop() if _SPARE_WORK and len(_SPARE_WORK[0]) == size else None
    if work is None:
        work = empty_buffer(size)
    try:
        yield work
    finally:
        if n_points >= full_width:
            with _SPARE_LOCK:
                if not _SPARE_WORK:
                    _SPARE_WORK.append(work)


def _squared_norms(rows: torch.Tensor) -> np.ndarray:
    """Each row's squared norm, in float32 (pinned: see :func:`_torch_product`)."""
    with cpu_float32():
        return torch.einsum("ij,ij->i", rows, rows).numpy()


def _lower_to(chosen, points, bound: _Bound, running: _Running, work, pool) -> None:
    """Lower the running distances with the distances to the new centres ``chosen``."""
    bound.aim(running.min_dist)
    for start in range(0, len(chosen), _BLOCK_ROWS):
        rows = chosen[start : start + _BLOCK_ROWS]
        dense = np.zeros(len(rows), dtype=bool)
        for listed, centres, values in _candidates(rows, bound, work, dense):
            for first in range(0, len(listed), _PAIR_CHUNK):
                pairs = slice(first, first + _PAIR_CHUNK)
                lows, highs = bound.intervals(values[pairs], listed[pairs], centres[pairs])
                running.lower_pairs(listed[pairs], centres[pairs], lows, highs)
        for center in rows[dense]:  # checked against every point
            running.lower_exact(_distances_to(points, points[center], pool))


def _torch_product(left: np.ndarray, right: np.ndarray, out: np.ndarray) -> None:
    """``out = left @ right`` in torch (MKL, every core), in float32 whatever torch's
    global precision settings: bfloat16 or TF32 products would be far outside the
    bounds' margins."""
    with cpu_float32():
        torch.mm(torch.from_numpy(left), torch.from_numpy(right), out=torch.from_numpy(out))


def _low_precision():
    """Whether the bound's products may run in bfloat16 (see ``_LOW_PRECISION``):
    False, "always", or "measured" (batch by batch, as :class:`_Chooser` finds faster)."""
    if _LOW_PRECISION is not None:
        return "always" if _LOW_PRECISION else False
    return "measured" if _bf16_hardware() else False


class _Chooser:
    """Which bound lowers the next batch: float32 products (0) or bfloat16 (1).

    Both give the same indices; which is faster depends on the data. bfloat16
    products cost a quarter, but their margins are wider: where the distances
    that matter are small next to the points' norms (tight clusters far from
    the mean), many more pairs are listed and worked out, and a batch took up
    to 6 times as long; on MPDD and Magnetic Tile patch features, 0.5-0.85
    times as long. So both are timed (the lowering and the exact values it
    leaves for the next batch), per centre lowered, and the one that cost less
    is taken; the other is tried again after ``_PROBE_EVERY`` batches, and
    each time it loses, after twice as many. Batches of fewer than
    ``_LOW_MIN_ROWS`` centres, where the product is a small part of the work,
    and the others that _LOW_PRECISION's comment names stay in float32, and
    are not timed (their costs are not comparable).
    """

    def __init__(self, n_bounds: int):
        self.costs = [None] * n_bounds
        self.wait, self.since, self.probing, self.timed = _PROBE_EVERY, 0, False, False

    def pick(self, n_rows: int, spread: float, n_done: int) -> int:
        """The bound for a batch of ``n_rows`` centres; ``spread`` = the bfloat16
        margin over the squared distances that matter (see _LOW_MAX_SPREAD)."""
        self.timed = False  # a batch that had no choice is not compared
        if len(self.costs) == 1:
            return 0
        if n_rows < _LOW_MIN_ROWS or not spread <= _LOW_MAX_SPREAD or n_done < _LOW_AFTER:
            return 0
        self.timed = True
        if self.costs[0] is None or self.costs[1] is None:
            return 0 if self.costs[0] is None else 1
        best = int(self.costs[1] < self.costs[0])
        self.since += 1
        self.probing = self.since >= self.wait
        if self.probing:
            self.since = 0
            return 1 - best
        return best

    def record(self, which: int, n_rows: int, started: float, now: float) -> None:
        if not self.timed:
            return
        cost = (now - started) / max(1, n_rows)
        if self.probing:
            other = self.costs[1 - which]
            self.wait = self.wait * 2 if other is not None and cost >= other else _PROBE_EVERY
            self.probing = False
        self.costs[which] = cost


def _plain_indices(points, min_dist, n_select, pool, progress) -> np.ndarray:
    """The plain loop itself: one exact pass over all points per selected point."""
    selected = np.empty(n_select, dtype=np.int64)
    for step in range(n_select):
        chosen = int(np.argmax(min_dist))
        selected[step] = chosen
        np.minimum(min_dist, _distances_to(points, points[chosen], pool), out=min_dist)
        if progress is not None:
            progress.update(1)
    return selected


def _candidates(rows, bound: _Bound, work, dense):
    """For each centre in ``rows``: the points its bound cannot rule out.

    ``bound.source`` rows are [x_i, sqrt(gamma) |x_i|, -half_point_i], where x_i is
    point i minus the mean (times a power of two, ``scale``, for data of
    extreme magnitude; m_i is scaled alike), with
    half_point_i = ((1 - gamma) |x_i|^2 - m'_i^2) / 2 - floor,
    m'_i = m_i (1 + slack), and half_center_s = (1 - gamma) |x_s|^2 / 2. The
    centres' rows take 1 in the last column, so one product gives
    <a_i, a_s> - half_point_i, to compare with half_center_s; in exact
    arithmetic the difference is half of
    m'_i^2 - |x_i - x_s|^2 + gamma (|x_i| + |x_s|)^2. Rounding: the product of
    d + 2 terms is off by at most (d + 2) u times the sum of the terms' sizes,
    itself below 0.75 (1 + gamma) (|x_i| + |x_s|)^2 + m'_i^2 / 2, and each
    float32 squared norm by d u times itself; gamma covers the parts in the
    norms (and the centring's rounding, ~u of them), slack the part in m'_i
    and the exact distance's own rounding, and ``floor`` the absolute errors of
    products (and of the plain loop's own squares) that fall below the normal
    range. So every point whose exact float32 distance can fall below m_i
    is listed.

    Yields, for one range of points at a time, the (point, centre) pairs as
    flat arrays ``(points, centres, values)``, with their product entries
    ``values`` (from which :meth:`_Bound.intervals` bounds the pair's
    distance). ``dense[k]`` (updated in place) marks the centres ``rows[k]``
    with too many to list (over ``_DENSE_FRACTION`` of all points), which the
    caller checks against every point: from the range where a centre turns
    dense on, none of its pairs is yielded. So however many points there are,
    the pairs in memory at once are at most the entries of ``work``, which
    holds the products. A :class:`_LowBound` makes the same test with its own
    rows and margins, and its ``values`` are the products' ``q`` (see there).
    """
    # The product goes into the reused ``work`` buffer (see the bound's
    # ``listed``). The listing runs on this thread: split over the pool it was
    # slower on 2 cores.
    n_points = len(bound.sq_norms)
    index_dtype = np.int32 if n_points < 2**31 else np.int64
    dense_limit = int(_DENSE_FRACTION * n_points)
    half_center = bound.half_center(rows)
    left = bound.left(rows, half_center)
    counts = np.zeros(len(rows), dtype=np.int64)
    step = min(max(1, len(work) // len(rows)), bound.most_points())
    for start in range(0, n_points, step):
        points_at, local, values = bound.listed(left, half_center, start, min(step, n_points - start), work)
        counts += np.bincount(local, minlength=len(rows))
        dense |= counts > dense_limit
        if dense.any():
            keep = ~dense[local]
            points_at, local, values = points_at[keep], local[keep], values[keep]
        cols = (points_at + start).astype(index_dtype)
        centres = rows[local].astype(index_dtype)
        del local, points_at  # not held while the caller works on the pairs
        yield cols, centres, values


def _batch_picks(points, batch, values, tau, tau_index, limit) -> np.ndarray:
    """The centres the greedy loop takes next from ``batch``, in order.

    ``values`` are the batch's running distances. While the farthest of them
    beats ``tau`` (the largest running distance outside the batch, which can
    only have fallen since), it is the next pick; the batch's own distances are
    then lowered with :func:`row_distances`' arithmetic, bit for bit as the
    full update would lower them. The rest of the points are not needed to
    know the picks.
    """
    order = np.argsort(batch)  # by index, so argmax breaks ties as the plain loop's argmax
    batch, values = batch[order], values[order]
    members = points[batch]
    work, distances = np.empty_like(members), np.empty(len(values), dtype=np.float32)
    picks = []
    while len(picks) < limit and len(values):
        at = int(values.argmax())
        best, chosen = values[at], int(batch[at])
        if not (best > tau or (best == tau and chosen < tau_index)):
            break  # the farthest point may now lie outside the batch
        picks.append(chosen)
        size = len(values)
        np.subtract(members, members[at], out=work[:size])
        np.minimum(values, _row_norms(work[:size], out=distances[:size]), out=values)
        # Members below tau can no longer be picked from this batch (a larger one
        # would have to come first); drop them once they are a quarter of the rows.
        alive = values >= tau
        if 4 * np.count_nonzero(alive) < 3 * len(values):
            batch, values, members = batch[alive], values[alive], members[alive]
    return np.array(picks, dtype=np.int64)


def _farthest_batch(min_dist: np.ndarray, width: int, cutoff=None) -> tuple[np.ndarray, float, int]:
    """The ``width`` largest values in (-value, index) order, and the best one left out.

    ``cutoff``, if given, is at most the (``width + 1``)-th largest value.
    """
    n_points = len(min_dist)
    if width >= n_points:
        order = np.lexsort((np.arange(n_points), -min_dist))
        return order, -np.inf, n_points
    if cutoff is None:
        cutoff = np.partition(min_dist, n_points - width - 1)[n_points - width - 1]
    # At least width + 1 points; every point left out of them is below the cutoff,
    # so the best one left out (ties by index) is the next in this order.
    pool = np.flatnonzero(min_dist >= cutoff)
    order = pool[np.lexsort((pool, -min_dist[pool]))]
    return order[:width], float(min_dist[order[width]]), int(order[width])


def greedy_indices_torch(
    points: torch.Tensor, n_select: int, starts: torch.Tensor, progress=None
) -> np.ndarray:
    """The plain greedy loop on a torch device (used on CUDA).

    One pass over all points per selected centre, no host round trip inside the
    loop: on a GPU that pass is a memory-bound matrix-vector product.
    """
    norms = torch.einsum("ij,ij->i", points, points)

    def distances_to(index: torch.Tensor) -> torch.Tensor:
        center = points.index_select(0, index.view(1)).squeeze(0)
        squared = norms - 2.0 * (points @ center) + norms.index_select(0, index.view(1))
        return squared.clamp_min_(0.0).sqrt_()

    min_dist = torch.stack([distances_to(s) for s in starts], dim=1).mean(dim=1)
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)
    for step in range(n_select):
        chosen = torch.argmax(min_dist)
        selected[step] = chosen
        torch.minimum(min_dist, distances_to(chosen), out=min_dist)
        if progress is not None:
            progress.update(1)
    return selected.cpu().numpy()


class GreedyCoresetSampler(VersionedPickleMixin, TransformerMixin, BaseEstimator):
    """Greedy coreset of patch features: the vectors that enter the memory bank.

    The greedy (minimax facility location, k-center) coreset of PatchCore
    (Roth et al. 2022, Algorithm 1): all patch vectors are projected once with
    a random Gaussian map to ``projection_dim`` dimensions; starting from each
    point's mean distance to ``n_starts`` random points, the point farthest from
    the current coreset is added and every point's distance to the coreset is
    lowered, until ``ratio`` of the points are kept. The kept vectors are the
    original, unprojected ones.

    In a :class:`~sklearn.pipeline.Pipeline`, :meth:`fit_transform` returns the
    features unchanged in shape as a :class:`numpy.ma.MaskedArray` whose mask
    hides the patches not kept, so the number of images (and ``y``) still
    matches; :meth:`transform` passes features through untouched (at test time
    every patch is scored). Alone, on an (n, d) array, use
    :attr:`sample_indices_`.

    Parameters
    ----------
    ratio : float, default=0.1
        Fraction of patch vectors kept, in (0, 1]. At least one is kept; 1.0
        keeps all without running the greedy loop.
    projection_dim : int, default=256
        Dimension of the random projection used only for choosing. When the
        features have at most this many dimensions they are used as they are.
        The reference code uses 128. Projecting the 152-dimensional default
        features of efficientnet_lite0 down to 128 lowered image AUROC on
        Magnetic Tile at 1 % (0.789 -> 0.768 at the earlier 288 px crop,
        0.888 -> 0.878 at the 320 px letterbox, where AUPRO rose 0.763 ->
        0.777); the default keeps small features whole, so their distances
        are exact.
    n_starts : int, default=10
        Number of random points whose mean distance starts the search.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the start points (no global state is used).
    device : str or torch.device, default="auto"
        ``"cpu"`` runs the exact pruned loop in NumPy; a CUDA device runs the
        plain loop on the GPU. ``"auto"`` picks CUDA when available.
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    sample_indices_ : ndarray of shape (n_kept,)
        Indices of the kept vectors into ``X.reshape(-1, n_features_in_)``, in
        the order they were chosen.
    n_features_in_ : int
        Length of each feature vector.
    n_patches_seen_ : int
        Number of patch vectors the coreset was chosen from.

    See Also
    --------
    PatchFeatureTransformer : Computes the patch features.
    PatchCoreDetector : Builds the memory bank from the kept vectors.

    Notes
    -----
    When ``y`` is given (+1 good, -1 defective), only patches of good images are
    candidates, and defective images are fully masked.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import GreedyCoresetSampler
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> sampler = GreedyCoresetSampler(ratio=0.05, random_state=0).fit(X)
    >>> sampler.sample_indices_.shape
    (50,)
    >>> X[sampler.sample_indices_].shape
    (50, 16)
    """

    _parameter_constraints: dict = {
        "ratio": [Interval(Real, 0.0, 1.0, closed="right")],
        "projection_dim": [Interval(Integral, 1, None, closed="left")],
        "n_starts": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "device": [str, torch.device, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self, ratio=0.1, *, projection_dim=256, n_starts=10, random_state=None, device="auto", verbose=0
    ):
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.n_starts = n_starts
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Choose the coreset.

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features (a 2-D array is a set of vectors, one "image" each).
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective; only good images' patches
            can be chosen.

        Returns
        -------
        self : GreedyCoresetSampler
            The fitted sampler.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> X = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
        >>> sampler = GreedyCoresetSampler(ratio=0.1, random_state=0).fit(X)
        >>> len(sampler.sample_indices_), sampler.n_patches_seen_
        (50, 500)
        """
        return self._fit(check_patch_features(self, X, reset=True), y)

    def _fit(self, X, y):
        """:meth:`fit` on features already validated."""
        good = check_labels(y, len(X))
        n_features = X.shape[-1]
        per_image = int(np.prod(X.shape[1:-1])) if X.ndim > 2 else 1
        candidates = np.arange(len(X)) if good is None else np.flatnonzero(good)
        # Without labels every patch is a candidate: a view, no copy of the features.
        vectors = X.reshape(-1, n_features) if good is None else X[candidates].reshape(-1, n_features)
        positions = (candidates[:, None] * per_image + np.arange(per_image)).ravel()

        n_select = max(1, int(len(vectors) * self.ratio))
        self.n_patches_seen_ = len(vectors)
        if n_select >= len(vectors):
            self.sample_indices_ = positions
            return self
        device = resolve_device(self.device)
        rng = check_random_state(self.random_state)
        with tqdm(total=n_select, desc="Coreset", unit="pt", disable=not self.verbose) as progress:
            chosen = _greedy(vectors, n_select, self.projection_dim, self.n_starts, rng, device, progress)
        self.sample_indices_ = positions[chosen]
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, **fit_params):
        """Choose the coreset and return ``X`` with the other patches masked.

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features.
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective.
        **fit_params : dict
            Ignored; accepted for pipeline compatibility.

        Returns
        -------
        X_masked : numpy.ma.MaskedArray, same shape as X
            The same values; the mask is True on every patch not in the coreset
            (it is a read-only broadcast view, costing no memory per feature).

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> features = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
        >>> masked = GreedyCoresetSampler(ratio=0.25, random_state=0).fit_transform(features)
        >>> masked.shape
        (2, 4, 4, 16)
        >>> int((~masked.mask[..., 0]).sum())  # patches kept: 25 % of 32
        8
        """
        # Validated once (float32 check and a pass over every value), for both steps.
        X = check_patch_features(self, X, reset=True)
        self._fit(X, y)
        kept = np.zeros(X.shape[:-1], dtype=bool).reshape(-1)
        kept[self.sample_indices_] = True
        mask = np.broadcast_to(~kept.reshape(*X.shape[:-1], 1), X.shape)
        return np.ma.MaskedArray(X, mask=mask, copy=False)

    def transform(self, X):
        """Pass features through unchanged (at test time every patch is scored).

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features.

        Returns
        -------
        X : ndarray
            The validated features, values unchanged.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> features = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
        >>> sampler = GreedyCoresetSampler(ratio=0.25, random_state=0).fit(features)
        >>> np.array_equal(sampler.transform(features), features)
        True
        """
        check_is_fitted(self)
        return check_patch_features(self, X, reset=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Features are float32 end to end (the bank and the faiss search are float32).
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def project(vectors: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``vectors @ projection`` on the CPU, in float32, into a new (n, k) array.

    The product runs in torch, like the loop's own products: NumPy's BLAS
    threads keep spinning for a while after a product, and that slowed the
    loop right after it by 30-50% on 2 cores.
    """
    points = empty_buffer((len(vectors), projection.shape[1]))
    with torch.inference_mode(), cpu_float32():
        torch.mm(as_tensor(vectors), torch.from_numpy(projection), out=torch.from_numpy(points))
    return points


def _greedy(vectors, n_select, projection_dim, n_starts, rng, device, progress) -> np.ndarray:
    """Project, draw the start points and run the greedy loop on ``device``."""
    n_features = vectors.shape[1]
    projection = None
    if n_features > projection_dim:
        projection = rng.standard_normal((n_features, projection_dim)).astype(np.float32)
        projection /= np.sqrt(projection_dim)
    starts = rng.choice(len(vectors), size=min(n_starts, len(vectors)), replace=False)
    if device.type == "cpu":
        points = np.ascontiguousarray(vectors) if projection is None else project(vectors, projection)
        return greedy_indices_cpu(points, n_select, starts, progress)
    with torch.inference_mode(), float32_precision():  # no TF32: the CPU's selection
        points = as_tensor(np.ascontiguousarray(vectors)).to(device)
        if projection is not None:
            points = points @ torch.from_numpy(projection).to(device)
        return greedy_indices_torch(points, n_select, torch.from_numpy(starts).to(device), progress)
