"""The exact greedy engine: the plain loop's indices, in batches of matrix products."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..utils._bf16 import UNIT_ROUNDOFF as _UNIT_ROUNDOFF
from ..utils._bf16 import bf16_hardware as _bf16_hardware
from ..utils._buffers import empty_buffer
from . import _tuning as tuning
from ._bounds import Bound, LowBound, Rows, candidates
from ._nearest import nearest_distances
from ._plain import distances_to, initial_distances, plain_indices, row_norms
from ._running import Running


def greedy_indices_cpu(
    points: np.ndarray, n_select: int, starts: np.ndarray | None, progress=None, *, centres=None
) -> np.ndarray:
    """Greedy k-center selection, exactly as the plain loop, in batches.

    The running distances start as each point's mean distance to the points
    ``starts`` (the reference's warm start) or, given ``centres`` (an array of
    vectors already selected, e.g. a memory bank), as its distance to the
    nearest of them (:func:`~._nearest.nearest_distances`): the loop then
    continues a selection that holds them.

    The plain loop (take the point farthest from the selection, lower every
    point's distance to it, repeat) reads all points once per selected point:
    a memory-bound pass. Here the work is batched so it runs as a matrix
    product instead, without changing a single result:

    1. The running distances ``m`` only ever decrease. So if ``S`` holds the
       ``tuning.BATCH_WIDTH`` farthest points (ties by index, as ``np.argmax``) and
       ``tau`` is the largest ``m`` outside ``S``, the next selections come out of
       ``S`` for as long as some member of ``S`` is still above ``tau``.
    2. Which members those are, and in which order, depends only on the
       members' own distances: :func:`_batch_picks` replays the loop on ``S``
       alone, so every pick of the batch is known before any work on the
       other points.
    3. For the picks, one matrix product gives every point's squared distance
       to them, up to a proven error bound (float32 products, or bfloat16 ones
       where the CPU has them and they are faster: :class:`LowBound`). A pick
       can lower a point's ``m`` only if that bound says it *might* be closer;
       all other points provably keep their ``m``.
    4. The same product entry also bounds the candidate's distance from both
       sides, to a few 1e-4 (relative; a few 1e-2 from bfloat16). The running
       distances are kept as intervals (:class:`Running`): a point's ``m`` is
       worked out exactly, with :func:`row_distances`' arithmetic (the plain
       loop's own), only when the point may be among the ``tuning.BATCH_WIDTH + 1``
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
        # Rows [centered, sqrt(gamma) * norm, -half_point] (see candidates): the
        # product adds the cross term of the margin gamma * (|x| + |y|)^2 and
        # subtracts each point's offset for free. It reads the rows transposed (a
        # view: BLAS takes either layout), so no transposed copy is made.
        gamma = max(tuning.GAMMA, 4 * (n_dims + 2) * _UNIT_ROUNDOFF)
        slack = max(tuning.SLACK, 2 * (n_dims + 2) * _UNIT_ROUNDOFF)
        # The smallest normal float32: a result that falls below it is off by less,
        # whether the CPU rounds it to a subnormal or flushes it to zero (FTZ/DAZ, as
        # torch.set_flush_denormal(True) or a -ffast-math library sets them).
        tiny = float(np.finfo(np.float32).tiny)
        # The centre only has to be central (the bound holds for any): the mean of
        # ~4096 rows spread over the data, at a fraction of a full pass.
        mean = points[:: max(1, n_points // 4096)].mean(axis=0, dtype=np.float64).astype(np.float32)
        # Centred rows (in torch: NumPy on the thread pool took twice as long).
        rows = Rows(points, mean)
        sq_norms = rows.squared_norms()
        # The largest centred norm (NaN stays NaN; inf where the squares overflow).
        radius = math.sqrt(float(sq_norms.max())) if n_points else 0.0
        # Start distances are worked out lazily (Running) for data of ordinary
        # magnitude, where no distance can overflow; otherwise all of them first.
        lazy = math.isfinite(radius) and 2.0**-60 < radius and 4.0 * radius**2 < 2.0**120
        min_dist = None
        if centres is not None:  # worked out first, exactly, as for extreme magnitudes
            min_dist, lazy = nearest_distances(points, centres, pool), False
            if not np.isfinite(min_dist).all():  # no centre (all inf): the plain loop
                return plain_indices(points, min_dist, n_select, pool, progress)
        if not lazy:
            if min_dist is None:
                min_dist = initial_distances(points, starts, pool).astype(np.float32)
            if not (math.isfinite(radius) and np.isfinite(min_dist).all()) or 0.0 < radius < 2.0**-100:
                return plain_indices(points, min_dist, n_select, pool, progress)
        # The bound's rounding analysis needs squares that can neither overflow nor,
        # for all but far-out coordinates, fall to subnormals (the floor below covers
        # those). Data whose norms are far from 1 is scaled by a power of two
        # (exactly) to bring the largest norm into [0.5, 1); where the plain loop's
        # own squares would be mostly rounding (all norms below 2^-100) it runs instead.
        scale = 1.0
        if not tuning.UNSCALED_RANGE[0] <= radius < tuning.UNSCALED_RANGE[1]:
            scale = 2.0 ** -math.frexp(radius)[1] if radius > 0 else 1.0
            rows.rescale(scale)
            sq_norms = rows.squared_norms()
        # Absolute floors, where rounding errors are absolute rather than relative:
        # products of the bound that fall below the normal range, and the exact
        # distances' own squares where the raw differences are that small (only for
        # data of about 1e-18 and below; in scaled units, where it then dominates).
        floor = 4 * (n_dims + 2) * tiny + min(1e30, (n_dims + 1) * tiny * scale * scale)
        rows.set_roots(np.sqrt(gamma * sq_norms))  # r = sqrt(gamma) |x|
        running = Running(points, starts, min_dist)
        if lazy:
            running.bound(rows, sq_norms, scale, gamma, slack, floor)
        low_gamma = LowBound.margins(n_dims)[0]
        mode = _low_precision() if low_gamma <= tuning.LOW_MOST_GAMMA else False
        if mode == "always":  # its bfloat16 rows replace the float32 ones
            bounds = [LowBound(rows, sq_norms, scale, floor)]
            rows = None
        else:  # the bfloat16 bound is made when first taken
            bounds = [Bound(rows, sq_norms, scale, gamma, slack, floor), None]
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
            cutoff = running.settle_farthest(min(tuning.BATCH_WIDTH, n_points))
            if timing is not None:  # the last lowering's cost includes the exact values it left
                chooser.record(*timing, time.perf_counter())
            batch, tau, tau_index = _farthest_batch(min_dist, min(tuning.BATCH_WIDTH, n_points), cutoff)
            chosen = _batch_picks(points, batch, min_dist[batch], tau, tau_index, n_select - count)
            selected[count : count + len(chosen)] = chosen
            count += len(chosen)
            if count < n_select:  # after the last picks, no distance to them is needed
                # The bfloat16 margin over the squared distance the batch started below.
                spread = margin_size / max((tau * scale) ** 2, tiny)
                which = chooser.pick(len(chosen), spread, count)
                if bounds[which] is None:
                    bounds[which] = LowBound(rows, sq_norms, scale, floor)
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
    """The float32 product buffer for ``n_points`` points: ``tuning.BLOCK_ROWS`` rows of
    up to ``tuning.PRODUCT_FLOATS / tuning.BLOCK_ROWS`` points; the spare one if free and of that size."""
    full_width = max(1, tuning.PRODUCT_FLOATS // tuning.BLOCK_ROWS)
    size = tuning.BLOCK_ROWS * min(full_width, n_points)
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


def _lower_to(chosen, points, bound: Bound, running: Running, work, pool) -> None:
    """Lower the running distances with the distances to the new centres ``chosen``."""
    bound.aim(running.min_dist)
    for start in range(0, len(chosen), tuning.BLOCK_ROWS):
        rows = chosen[start : start + tuning.BLOCK_ROWS]
        dense = np.zeros(len(rows), dtype=bool)
        for listed, centres, values in candidates(rows, bound, work, dense):
            for first in range(0, len(listed), tuning.PAIR_CHUNK):
                pairs = slice(first, first + tuning.PAIR_CHUNK)
                lows, highs = bound.intervals(values[pairs], listed[pairs], centres[pairs])
                running.lower_pairs(listed[pairs], centres[pairs], lows, highs)
        for center in rows[dense]:  # checked against every point
            running.lower_exact(distances_to(points, points[center], pool))


def _low_precision():
    """Whether the bound's products may run in bfloat16 (see ``tuning.LOW_PRECISION``):
    False, "always", or "measured" (batch by batch, as :class:`_Chooser` finds faster)."""
    if tuning.LOW_PRECISION is not None:
        return "always" if tuning.LOW_PRECISION else False
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
    is taken; the other is tried again after ``tuning.PROBE_EVERY`` batches, and
    each time it loses, after twice as many. Batches of fewer than
    ``tuning.LOW_MIN_ROWS`` centres, where the product is a small part of the work,
    and the others that tuning.LOW_PRECISION's comment names stay in float32, and
    are not timed (their costs are not comparable).
    """

    def __init__(self, n_bounds: int):
        self.costs = [None] * n_bounds
        self.wait, self.since, self.probing, self.timed = tuning.PROBE_EVERY, 0, False, False

    def pick(self, n_rows: int, spread: float, n_done: int) -> int:
        """The bound for a batch of ``n_rows`` centres; ``spread`` = the bfloat16
        margin over the squared distances that matter (see tuning.LOW_MAX_SPREAD)."""
        self.timed = False  # a batch that had no choice is not compared
        if len(self.costs) == 1:
            return 0
        if n_rows < tuning.LOW_MIN_ROWS or not spread <= tuning.LOW_MAX_SPREAD or n_done < tuning.LOW_AFTER:
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
            self.wait = self.wait * 2 if other is not None and cost >= other else tuning.PROBE_EVERY
            self.probing = False
        self.costs[which] = cost


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
        np.minimum(values, row_norms(work[:size], out=distances[:size]), out=values)
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
