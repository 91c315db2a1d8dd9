"""Each point's exact distance to the nearest of fixed centres: where a continued selection starts.

A selection continued from a bank (:meth:`GreedyCoresetSampler.partial_fit`)
starts each new point's running distance at its distance to the nearest bank
vector, as the plain loop computes it: the minimum over the bank of
:func:`~._plain.row_distances`. Computing every pair that way reads the points
once per bank vector. Instead one float32 matrix product per block bounds
every pair's distance (the margin covers the product's rounding, the
centring's and the plain loop's own float32 distance), and only the pairs
whose lower end can reach the smallest upper end of their point are worked
out exactly: the result is the plain minimum, bit for bit, at the cost of
one product (a nearest-neighbour search of the points in the bank).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..utils._bf16 import TINY, UNIT_ROUNDOFF
from ..utils._device import as_tensor, cpu_float32
from . import _tuning as tuning
from ._plain import distances_to, row_norms


def nearest_distances(points: np.ndarray, centres: np.ndarray, pool=None) -> np.ndarray:
    """``min`` over ``centres`` of :func:`~._plain.row_distances` for every point (float32).

    Bit for bit the plain minimum. With a thread ``pool`` the plain passes (few
    centres, or data of extreme magnitude) run in blocks of rows side by side.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    n_points, n_dims = points.shape
    nearest = np.full(n_points, np.inf, dtype=np.float32)
    if not n_points or not len(centres):
        return nearest
    if len(centres) <= tuning.PLAIN_CENTRES or n_dims == 0:
        return _plain_nearest(points, centres, nearest, pool)
    # Centred on a mean of both (any centre works; a central one keeps the margins tight).
    sample = np.concatenate([points[:: max(1, n_points // 2048)], centres[:: max(1, len(centres) // 2048)]])
    mean = torch.from_numpy(sample.mean(axis=0, dtype=np.float64).astype(np.float32))
    point_norms = _centred_squared_norms(points, mean, 1.0)
    centre_norms = _centred_squared_norms(centres, mean, 1.0)
    radius = math.sqrt(max(float(point_norms.max()), float(centre_norms.max())))
    if radius == 0.0:  # every point and centre is the mean: all distances are 0
        return np.zeros(n_points, dtype=np.float32)
    if not (math.isfinite(radius) and 2.0**-100 <= radius and 4.0 * radius**2 < 2.0**120):
        # The plain loop's own squares overflow, or are mostly rounding: no bound helps.
        return _plain_nearest(points, centres, nearest, pool)
    # Scaled by a power of two (exact) so the largest norm lies in [0.5, 1), as the engine does.
    scale = 2.0 ** -math.frexp(radius)[1]
    if scale != 1.0:
        point_norms = _centred_squared_norms(points, mean, scale)
        centre_norms = _centred_squared_norms(centres, mean, scale)
    u = UNIT_ROUNDOFF
    gamma_k = n_dims * u / (1.0 - n_dims * u)
    # Margin of the squared distance, times (|a| + |b|)^2 (a, b the centred, scaled
    # vectors): the product's rounding and the squared norms' (together gamma_k of
    # it), their float32 sum (3 u), the centring (2 u: each vector moves by u of
    # itself), all twice over.
    relative = 2.0 * (gamma_k + 5.0 * u)
    # The plain loop's float32 distance is within ``slack`` of the exact one, and its
    # squares (and the product's) below the normal range are off by absolute
    # amounts: the floor, in scaled squared units, as in the engine. The last term
    # covers centred coordinates that fall below the normal range (2^-150 each).
    slack = max(tuning.SLACK, 2 * (n_dims + 2) * u)
    floor = (
        4 * (n_dims + 2) * TINY
        + min(1e30, (n_dims + 1) * TINY * scale * scale)
        + 8.0 * math.sqrt(n_dims) * 2.0**-149 * scale
    )
    frame = _Frame(mean, scale, point_norms, centre_norms, np.sqrt(centre_norms.astype(np.float64)))
    point_rows = tuning.NEAREST_POINTS
    for start in range(0, n_points, point_rows):
        rows = slice(start, min(start + point_rows, n_points))
        _nearest_block(points, centres, rows, frame, (relative, slack, floor), nearest)
    return nearest


class _Frame(NamedTuple):
    """The common centre and scale of points and centres, and their squared norms in it."""

    mean: torch.Tensor
    scale: float
    point_norms: np.ndarray
    centre_norms: np.ndarray
    centre_sizes: np.ndarray  # |b|, float64


def _plain_nearest(points, centres, nearest, pool) -> np.ndarray:
    """The plain minimum: one exact pass over the points per centre."""
    for centre in centres:
        np.minimum(nearest, distances_to(points, centre, pool), out=nearest)
    return nearest


def _centred(vectors: np.ndarray, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """``(vectors - mean) * scale`` in float32 (a new tensor; the scale is a power of two)."""
    centred = as_tensor(vectors) - mean
    if scale != 1.0:
        centred.mul_(scale)
    return centred


def _centred_squared_norms(vectors: np.ndarray, mean: torch.Tensor, scale: float) -> np.ndarray:
    """|(v - mean) * scale|^2 of every vector, in float32, a block of rows at a time."""
    out = np.empty(len(vectors), dtype=np.float32)
    step = max(1, tuning.PRODUCT_FLOATS // max(1, vectors.shape[1]))
    with cpu_float32():
        for start in range(0, len(vectors), step):
            block = _centred(vectors[start : start + step], mean, scale)
            out[start : start + len(block)] = torch.einsum("ij,ij->i", block, block).numpy()
    return out


def _nearest_block(points, centres, rows: slice, frame: _Frame, margins, nearest) -> None:
    """Lower ``nearest[rows]`` to the exact minimum over all centres.

    For each block of centres, ``q = |b|^2 - 2 <a, b>`` (one float32 product
    with the norms as its bias) plus the point's ``|a|^2`` is the squared
    distance of the centred, scaled vectors up to ``M = relative (|a| +
    B)^2``, where B is the block's largest centre norm. A point's distance is
    then at most ``hi`` = the root of ``(|a|^2 + min q + M)(1 + slack)^2 +
    floor`` over the centres seen so far, and a pair can be at most that only
    if ``(|a|^2 + q - M)(1 - slack)^2 - floor <= hi^2``: those pairs, and no
    others, get their exact distance. The pair achieving the minimum is
    always among them (its lower end is below its own value, the minimum,
    which is below every upper end), so the exact minimum over them is the
    plain minimum.
    """
    relative, slack, floor = margins
    block = _centred(points[rows], frame.mean, frame.scale)
    squared = frame.point_norms[rows].astype(np.float64)
    sizes = np.sqrt(squared)
    upper = np.full(len(block), np.inf)  # hi^2 in scaled units
    product = torch.empty(len(block) * min(tuning.NEAREST_CENTRES, len(centres)))
    for start in range(0, len(centres), tuning.NEAREST_CENTRES):
        stop = min(start + tuning.NEAREST_CENTRES, len(centres))
        right = _centred(centres[start:stop], frame.mean, frame.scale)
        bias = torch.from_numpy(frame.centre_norms[start:stop])[None, :]
        q = product[: len(block) * (stop - start)].view(len(block), stop - start)
        with cpu_float32():
            torch.addmm(bias, block, right.T, alpha=-2.0, out=q)
        margin = relative * (sizes + frame.centre_sizes[start:stop].max()) ** 2
        smallest = squared + q.min(dim=1).values.numpy()
        np.minimum(upper, (smallest + margin) * (1.0 + slack) ** 2 + floor, out=upper)
        # Pairs with q <= (hi^2 + floor) / (1 - slack)^2 + M - |a|^2, rounded up to float32.
        limit = ((upper + floor) / (1.0 - slack) ** 2 + margin - squared).astype(np.float32)
        local, column = np.nonzero(q.numpy() <= np.nextafter(limit, np.float32(np.inf))[:, None])
        if len(local):
            at = local + rows.start
            np.minimum.at(nearest, at, _pair_distances(points, at, centres, column + start))


def _pair_distances(points, rows, centres, columns) -> np.ndarray:
    """Exact distance of each ``points[rows[k]]`` to ``centres[columns[k]]``, as ``row_distances``."""
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), tuning.PAIR_BLOCK):
        stop = start + tuning.PAIR_BLOCK
        row_norms(points[rows[start:stop]] - centres[columns[start:stop]], out=out[start:stop])
    return out
