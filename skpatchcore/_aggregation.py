"""Turning backbone stages into one vector per feature-map location.

DESIGN steps 2-5 (neighbourhood aggregation, resolution alignment, per-stage
reduction, stage fusion) are all linear in the stage activations. We use that
to never build the reference code's huge unfolded tensors:

``"reference"``
    The reference code unfolds each stage into ``C * p * p`` values per
    location, 1-D adaptive-average-pools that flattened vector to
    ``pretrain_dim``, stacks the stages and pools the stacked vector to
    ``target_dim``. Unfold followed by a fixed linear map over the unfolded
    vector is exactly a ``p x p`` convolution whose weight is that map
    reshaped to ``(out, C, p, p)``; the two poolings compose into one matrix
    per stage, and only the output rows a stage actually reaches are computed.
    The bilinear resize of a deeper stage acts on each channel alone, so it
    commutes with the channel map: we convolve at the stage's own (coarser)
    resolution and resize the already reduced result.

``"mean"``
    Each channel is averaged over its ``p x p`` neighbourhood (zero padding
    counted, as ``AvgPool2d(p, 1, p // 2)``), deeper stages are resized to the
    first stage's grid and the stages are concatenated. When the concatenated
    vector is longer than ``target_dim`` it is pooled to ``target_dim`` with the
    same 1-D adaptive average (again a fixed channel map, applied per stage).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

AGGREGATIONS = ("reference", "mean")


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The matrix of ``torch.nn.functional.adaptive_avg_pool1d`` from ``n_in`` to ``n_out``.

    Output ``j`` averages inputs ``floor(j * n_in / n_out)`` up to (excluding)
    ``ceil((j + 1) * n_in / n_out)``; when ``n_out > n_in`` it repeats inputs.
    """
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for j in range(n_out):
        start = (j * n_in) // n_out
        end = -((-(j + 1) * n_in) // n_out)
        matrix[j, start:end] = 1.0 / (end - start)
    return matrix


class StageMap:
    """The linear map from one stage's activations to its share of the output.

    Attributes
    ----------
    rows : slice
        Output channels this stage contributes to.
    weight : torch.Tensor or None
        ``"reference"``: convolution weight ``(rows, C, p, p)``. ``"mean"``:
        1x1 channel map ``(rows, C, 1, 1)`` after the neighbourhood mean, or
        None when the stage's channels are copied as they are.
    """

    def __init__(self, rows: slice, weight: torch.Tensor | None, mode: str, patch_size: int):
        self.rows = rows
        self.weight = weight
        self.mode = mode
        self.patch_size = patch_size

    def to(self, device: torch.device) -> StageMap:
        weight = None if self.weight is None else self.weight.to(device)
        return StageMap(self.rows, weight, self.mode, self.patch_size)

    def __call__(self, stage: torch.Tensor) -> torch.Tensor:
        pad = self.patch_size // 2
        if self.mode == "reference":
            return F.conv2d(stage, self.weight, padding=pad)
        pooled = F.avg_pool2d(stage, self.patch_size, stride=1, padding=pad, count_include_pad=True)
        return pooled if self.weight is None else F.conv2d(pooled, self.weight)


def build_stage_maps(
    channels: list[int], mode: str, patch_size: int, pretrain_dim: int, target_dim: int
) -> tuple[list[StageMap], int]:
    """Per-stage linear maps and the output dimension.

    Parameters
    ----------
    channels : list of int
        Channel count of each stage, in the order the stages are stacked.
    mode : {"reference", "mean"}
    patch_size, pretrain_dim, target_dim : int
        As in :class:`~skpatchcore.PatchFeatureTransformer`.
    """
    area = patch_size * patch_size
    maps = []
    if mode == "reference":
        fuse = adaptive_pool_matrix(len(channels) * pretrain_dim, target_dim)
        for index, n_channels in enumerate(channels):
            per_stage = adaptive_pool_matrix(n_channels * area, pretrain_dim)
            block = fuse[:, index * pretrain_dim : (index + 1) * pretrain_dim] @ per_stage
            used = np.flatnonzero(np.abs(block).sum(axis=1))
            rows = slice(int(used[0]), int(used[-1]) + 1)
            weight = block[rows].reshape(-1, n_channels, patch_size, patch_size)
            maps.append(StageMap(rows, torch.from_numpy(weight.astype(np.float32)), mode, patch_size))
        return maps, target_dim

    total = sum(channels)
    reduce = target_dim < total
    fuse = adaptive_pool_matrix(total, target_dim) if reduce else None
    offset = 0
    for n_channels in channels:
        if reduce:
            block = fuse[:, offset : offset + n_channels]
            used = np.flatnonzero(np.abs(block).sum(axis=1))
            rows = slice(int(used[0]), int(used[-1]) + 1)
            weight = torch.from_numpy(block[rows].astype(np.float32)).reshape(-1, n_channels, 1, 1)
        else:
            rows, weight = slice(offset, offset + n_channels), None
        maps.append(StageMap(rows, weight, mode, patch_size))
        offset += n_channels
    return maps, (target_dim if reduce else total)


def aggregate(stages: list[torch.Tensor], maps: list[StageMap], out_dim: int) -> torch.Tensor:
    """Fuse stage activations into ``(B, out_dim, h, w)`` on the first stage's grid."""
    first = stages[0]
    height, width = first.shape[-2:]
    out = first.new_zeros((first.shape[0], out_dim, height, width))
    for stage, stage_map in zip(stages, maps):
        part = stage_map(stage)
        if part.shape[-2:] != (height, width):
            part = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
        out[:, stage_map.rows] += part
    return out
