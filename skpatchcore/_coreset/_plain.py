"""The plain greedy loop, and the exact distances every path computes as it does.

The definition the accelerated engine (:mod:`._exact`) must reproduce bit for
bit: each point's running distance starts as its mean distance to the start
points; each step takes the point farthest from the selection (ties: the
lowest index, as ``np.argmax``) and lowers every running distance with its
distance to that point. Distances are float32, each row's value computed by
:func:`row_distances` alone, so it does not depend on which other rows are
computed with it. :func:`plain_indices` is that loop, run where the engine's
bounds do not apply (data of extreme magnitude); :func:`greedy_indices_torch`
runs it on CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _tuning as tuning


def row_distances(points: np.ndarray, center: np.ndarray, work=None, out=None) -> np.ndarray:
    """Euclidean distance of each row of ``points`` to ``center`` (float32).

    Each row's value depends only on that row and ``center``: the same row
    gives bit-identical distances whatever other rows are computed with it,
    which is what lets the fast loop reproduce the plain loop exactly.
    ``work`` (shaped as ``points``) and ``out`` are optional buffers.
    """
    return row_norms(np.subtract(points, center, out=work), out)


def row_norms(diff: np.ndarray, out=None) -> np.ndarray:
    """The Euclidean norm of each row of ``diff``: :func:`row_distances`' arithmetic."""
    out = np.einsum("ij,ij->i", diff, diff, out=out)
    return np.sqrt(out, out=out)


def mean_start_distances(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Each row's mean distance to ``centers``, as the plain loop's warm start computes it."""
    return np.stack([row_distances(block, center) for center in centers], axis=1).mean(axis=1)


def initial_distances(points: np.ndarray, starts: np.ndarray, pool=None) -> np.ndarray:
    """Mean distance of every point to the start points (the reference's warm start).

    With a thread ``pool``, blocks of rows are computed side by side (numpy
    releases the GIL); each row's value is the same either way.
    """
    centers = points[starts]
    return by_blocks(lambda block: mean_start_distances(block, centers), points, pool)


def by_blocks(per_row, points: np.ndarray, pool) -> np.ndarray:
    """``per_row(points)`` (one value per row), in blocks of rows side by side on ``pool``.

    ``per_row`` must give each row a value that depends on that row alone, so
    the result is the same bits either way; without a pool, or for fewer than
    two blocks of rows, it runs in one call.
    """
    if pool is None or len(points) < 2 * tuning.ROW_BLOCK:
        return per_row(points)
    out = np.empty(len(points), dtype=np.result_type(points.dtype, np.float32))

    def fill(start):
        out[start : start + tuning.ROW_BLOCK] = per_row(points[start : start + tuning.ROW_BLOCK])

    list(pool.map(fill, range(0, len(points), tuning.ROW_BLOCK)))
    return out


def distances_to(points: np.ndarray, center: np.ndarray, pool) -> np.ndarray:
    """:func:`row_distances` of all ``points``, in blocks side by side."""
    return by_blocks(lambda block: row_distances(block, center), points, pool)


def plain_indices(points, min_dist, n_select, pool, progress) -> np.ndarray:
    """The plain loop itself: one exact pass over all points per selected point."""
    selected = np.empty(n_select, dtype=np.int64)
    for step in range(n_select):
        chosen = int(np.argmax(min_dist))
        selected[step] = chosen
        np.minimum(min_dist, distances_to(points, points[chosen], pool), out=min_dist)
        if progress is not None:
            progress.update(1)
    return selected


def greedy_indices_torch(
    points: torch.Tensor, n_select: int, starts: torch.Tensor | None, progress=None, *, centres=None
) -> np.ndarray:
    """The plain greedy loop on a torch device (used on CUDA).

    One pass over all points per selected centre, no host round trip inside the
    loop: on a GPU that pass is a memory-bound matrix-vector product. Given
    ``centres`` (a tensor of vectors already selected), the running distances
    start at the distance to the nearest of them instead of the warm start.
    """
    norms = torch.einsum("ij,ij->i", points, points)

    def distances_to(index: torch.Tensor) -> torch.Tensor:
        center = points.index_select(0, index.view(1)).squeeze(0)
        squared = norms - 2.0 * (points @ center) + norms.index_select(0, index.view(1))
        return squared.clamp_min_(0.0).sqrt_()

    if centres is None:
        min_dist = torch.stack([distances_to(s) for s in starts], dim=1).mean(dim=1)
    else:
        min_dist = torch.full_like(norms, torch.inf)
        for block in centres.split(tuning.NEAREST_CENTRES):
            squared = norms[:, None] - 2.0 * (points @ block.T) + torch.einsum("ij,ij->i", block, block)
            torch.minimum(min_dist, squared.clamp_min_(0.0).sqrt_().min(dim=1).values, out=min_dist)
    selected = torch.empty(n_select, dtype=torch.long, device=points.device)
    for step in range(n_select):
        chosen = torch.argmax(min_dist)
        selected[step] = chosen
        torch.minimum(min_dist, distances_to(chosen), out=min_dist)
        if progress is not None:
            progress.update(1)
    return selected.cpu().numpy()
