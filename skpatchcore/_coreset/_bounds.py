"""Proven bounds on the plain loop's distances, from one matrix product.

A point can be lowered by a new centre only if its distance to the centre
may fall below its running distance. :func:`candidates` lists those points
for a batch of centres from one float32 (:class:`Bound`) or bfloat16
(:class:`LowBound`) product, with margins that cover every rounding of the
product and of the plain loop's own float32 distance; the same product entry
then bounds each listed pair's distance from both sides
(:meth:`Bound.intervals`). :class:`Rows` holds the product's left-hand rows,
kept whole or made block by block for large data.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..utils._bf16 import BF16_UNIT as _BF16_UNIT
from ..utils._bf16 import UNIT_ROUNDOFF as _UNIT_ROUNDOFF
from ..utils._bf16 import bf16_bits_as_float32
from ..utils._device import as_tensor, cpu_float32
from . import _tuning as tuning
from ._plain import row_norms


class Rows:
    """The bound's rows ``[x, r, last]``: ``x`` the points minus ``mean`` (times
    ``scale``, a power of two, see :meth:`rescale`), ``r = sqrt(gamma) |x|`` and a
    last column set for each use.

    Kept whole where that takes at most ``tuning.KEEP_ROWS_BYTES``; otherwise each read
    makes its rows from the points, ``tuning.STREAM_BYTES`` at a time, in a reused
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
        if n_points * (n_dims + 2) * 4 <= tuning.KEEP_ROWS_BYTES:
            self.whole = torch.empty((n_points, n_dims + 2))
            self._centre(slice(0, n_points), self.whole[:, :n_dims])
            self.block_rows = max(1, n_points)
        else:
            self.block_rows = max(1, min(n_points, tuning.STREAM_BYTES // (4 * (n_dims + 2))))
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
            return squared_norms(self.whole[:, : self.n_dims])
        norms = np.empty(self.n_points, dtype=np.float32)
        for start in range(0, self.n_points, self.block_rows):
            block = self.block(start, start + self.block_rows, columns=False)
            norms[start : start + len(block)] = squared_norms(torch.from_numpy(block[:, : self.n_dims]))
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


def pair_distances(points: np.ndarray, rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Exact distance of each ``points[rows[k]]`` to ``points[centres[k]]``, as :func:`row_distances`."""
    out = np.empty(len(rows), dtype=np.float32)
    size = min(tuning.PAIR_BLOCK, len(rows))
    work = np.empty((size, points.shape[1]), dtype=points.dtype)
    other = np.empty_like(work)
    for start in range(0, len(rows), size):
        stop = min(start + size, len(rows))
        # take(mode="clip") fills the buffers in place (the indices are valid).
        diff = np.take(points, rows[start:stop], axis=0, out=work[: stop - start], mode="clip")
        diff -= np.take(points, centres[start:stop], axis=0, out=other[: stop - start], mode="clip")
        row_norms(diff, out=out[start:stop])
    return out


class Bound:
    """The candidates' bound (see :func:`candidates`): its rows and per-point terms.

    ``rows`` (:class:`Rows`) are ``[x, sqrt(gamma) |x|, c]`` with ``x`` the
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
        torch_product(left, self.source.block(start, start + width).T, out=bounds)
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

        ``values`` are the candidates' bound entries (see :func:`candidates`):
        the float32 product ``v`` of a point's row ``[x_i, r_i, c_i]`` with a
        centre's ``[x_s, r_s, 1]``, where ``r = sqrt(gamma) |x|``. So
        ``|x_i - x_s|^2 = |x_i|^2 + |x_s|^2 - 2 v + 2 r_i r_s + 2 c_i``, up to
        rounding: the product's, at most (d + 2) u times the sum of its terms'
        sizes, itself below 0.25 (1 + gamma) (|x_i| + |x_s|)^2 + |c_i|, and each
        squared norm's, d u times itself. The margin ``4 (d + 2) u ((1 + gamma)
        (|x_i| + |x_s|)^2 + |c_i|)`` covers these twice over (its own float32
        arithmetic, and that of ``r_i r_s``, a few u of it), ``8 u (|x_i| +
        |x_s|)^2`` the centring (as in :meth:`Running.bounds`); ``(1 +- slack)^2``
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


class LowBound(Bound):
    """The bound with its products in bfloat16: the same test, wider margins.

    ``rows`` (bfloat16) are ``[x, r, c_hi, c_lo, 1, 1]`` for the points and
    ``[x_s, r_s, 1, 1, -h_hi, -h_lo]`` for the centres, where ``c`` is the
    point's last column of :class:`Bound` (set by :meth:`aim`), ``h`` the
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
    :class:`Bound` (norms, centring), ``slack`` to cover its part in m'^2 (as
    c_i <= (m'^2 + |x_i|^2) / 2) twice, and the floor also covers products and
    rounded entries below the normal range (``tiny`` each, or ``tiny`` times
    the largest entry of the other side).

    :meth:`intervals` reads ``q`` back: ``v = q + h_s`` in :class:`Bound`'s
    terms, off by the product's error plus ``q``'s rounding to bfloat16 (u_b
    of it, from above ``u_b / (1 - u_b)`` of the rounded value), all twice over.
    """

    def __init__(self, source, sq_norms, scale, floor):
        """``source``: :class:`Bound`'s rows (:class:`Rows`; their ``x`` is read)."""
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
        # Kept whole, whatever the size (unlike Rows: made afresh each batch, they
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
        most_gamma = tuning.LOW_MOST_GAMMA  # gamma itself is below (else float32 only)
        beta_s = 1.01 * (2 * unit + unit * unit + sums * (1 + unit) ** 2) * (1 + most_gamma) / 4
        beta_c = 1.01 * (unit * unit + sums * (1 + unit) ** 2)
        gamma = 4.0 * (beta_s + beta_c / 2 + 1.25 * (n_dims + 2) * u * (1 + most_gamma))
        slack = max(tuning.SLACK, 2 * (n_dims + 2) * u + 2.02 * beta_c)
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
        """As :meth:`Bound.listed`, the product in bfloat16 (``work`` holds as many
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
        """As :meth:`Bound.intervals`, for ``values`` = the rounded ``q`` (see the class)."""
        column = self.column[rows]
        half = self.half_center(centres)  # the same float32 values as in the product
        estimate = self._estimate(values, rows, centres, column)
        estimate -= 2.0 * half
        margin = self._size_margin * self._size(rows, centres)
        margin += self._column_margin * (np.abs(column) + half)
        margin += self._value_margin * np.abs(values)
        return self._ends(estimate, margin)


def squared_norms(rows: torch.Tensor) -> np.ndarray:
    """Each row's squared norm, in float32 (pinned: see :func:`torch_product`)."""
    with cpu_float32():
        return torch.einsum("ij,ij->i", rows, rows).numpy()


def torch_product(left: np.ndarray, right: np.ndarray, out: np.ndarray) -> None:
    """``out = left @ right`` in torch (MKL, every core), in float32 whatever torch's
    global precision settings: bfloat16 or TF32 products would be far outside the
    bounds' margins."""
    with cpu_float32():
        torch.mm(torch.from_numpy(left), torch.from_numpy(right), out=torch.from_numpy(out))


def candidates(rows, bound: Bound, work, dense):
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
    ``values`` (from which :meth:`Bound.intervals` bounds the pair's
    distance). ``dense[k]`` (updated in place) marks the centres ``rows[k]``
    with too many to list (over ``tuning.DENSE_FRACTION`` of all points), which the
    caller checks against every point: from the range where a centre turns
    dense on, none of its pairs is yielded. So however many points there are,
    the pairs in memory at once are at most the entries of ``work``, which
    holds the products. A :class:`LowBound` makes the same test with its own
    rows and margins, and its ``values`` are the products' ``q`` (see there).
    """
    # The product goes into the reused ``work`` buffer (see the bound's
    # ``listed``). The listing runs on this thread: split over the pool it was
    # slower on 2 cores.
    n_points = len(bound.sq_norms)
    index_dtype = np.int32 if n_points < 2**31 else np.int64
    dense_limit = int(tuning.DENSE_FRACTION * n_points)
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
