"""Turning backbone stages into one vector per feature-map location.

DESIGN steps 2-5 (neighbourhood aggregation, resolution alignment, per-stage
reduction, stage fusion) are all linear in the stage activations. We use that
to never build the reference code's unfolded tensors for a whole batch (nor
its upsampled unfolded deeper stages):

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

    That convolution weight is almost all zeros: each output channel averages
    a few neighbouring entries of the unfolded vector (2 or 3 for
    EfficientNet-Lite0, up to 18 for wide_resnet50_2's layer3), so the matrix
    is a narrow band. On the CPU we cut it into blocks of rows, each with the
    columns it touches, and run one small matrix product per block on the
    unfolded stage, writing straight into the (B, h, w, d) output. The
    unfolded values are copied one band of map rows at a time, so at most
    ``_UNFOLD_BUDGET`` of them exist at once. With 32-row blocks over 512 rows
    each block reads 1/16 of the columns: 94% of the dense convolution's
    multiply-adds are skipped. On CUDA the dense convolution is kept, as it is
    already fast there.

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


# Rows per block of the banded "reference" map on the CPU. Anything from 16 to
# 64 measured the same (efficientnet_lite0, 1024 dims); smaller blocks touch
# fewer columns, larger ones make fewer calls.
BLOCK_ROWS = 32
# Most values of one stage's unfolded neighbourhoods held at once (32 MB).
_UNFOLD_BUDGET = 1 << 23


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
    blocks : list of tuple
        ``"reference"`` only: ``(r0, r1, c0, c1, block)`` with ``block`` the
        transposed ``weight[r0:r1]`` restricted to the unfolded columns
        ``c0:c1`` it reaches (outside them that part of the weight is zero).
    """

    def __init__(self, rows: slice, weight: torch.Tensor | None, mode: str, patch_size: int):
        self.rows = rows
        self.weight = weight
        self.mode = mode
        self.patch_size = patch_size
        # The banded products serve the CPU only; on other devices the dense
        # convolution runs (see the module docstring).
        on_cpu = weight is not None and weight.device.type == "cpu"
        self.blocks = _row_blocks(weight) if mode == "reference" and on_cpu else []

    @property
    def n_rows(self) -> int:
        return self.rows.stop - self.rows.start

    def to(self, device: torch.device) -> StageMap:
        weight = None if self.weight is None else self.weight.to(device)
        return StageMap(self.rows, weight, self.mode, self.patch_size)

    def __call__(self, stage: torch.Tensor) -> torch.Tensor:
        """The stage's part ``(B, rows, h_l, w_l)`` at the stage's own resolution."""
        pad = self.patch_size // 2
        if self.mode == "reference":
            if stage.device.type == "cpu" and self.blocks:
                batch, _, height, width = stage.shape
                part = stage.new_empty((batch, height, width, self.n_rows))
                self.banded_into(stage, part)
                return part.permute(0, 3, 1, 2)
            return F.conv2d(stage, self.weight, padding=pad)
        pooled = F.avg_pool2d(stage, self.patch_size, stride=1, padding=pad, count_include_pad=True)
        return pooled if self.weight is None else F.conv2d(pooled, self.weight)

    def banded_into(self, stage: torch.Tensor, out: torch.Tensor) -> None:
        """Write the "reference" part into ``out`` of shape ``(B, h_l, w_l, rows)``.

        ``out`` may be a slice of the last axis of a larger array. The
        neighbourhoods are unfolded one band of map rows at a time (of one
        image), so the unfolded buffer stays below ``_UNFOLD_BUDGET`` values
        whatever the batch and image size.
        """
        p = self.patch_size
        batch, channels, height, width = stage.shape
        if (
            out.shape != (batch, height, width, self.n_rows)
            or out.stride(3) != 1
            or (out.stride(1) != width * out.stride(2))
        ):
            raise ValueError(
                f"out must be a (B, h, w, rows) = {(batch, height, width, self.n_rows)} slice of a "
                f"contiguous (B, h, w, d) array; got shape {tuple(out.shape)}, strides {out.stride()}."
            )
        band = max(1, min(height, _UNFOLD_BUDGET // (channels * p * p * width)))
        for image in range(batch):
            # One image in (C, H, W) order, padded: the unfolded copy below then
            # reads whole rows.
            padded = F.pad(stage[image].contiguous(), (p // 2,) * 4)
            s_c, s_y, s_x = padded.stride()
            for top in range(0, height, band):
                rows = min(band, height - top)
                # (C, p, p, rows, w) view of the neighbourhoods of this band,
                # copied into the (C * p * p, rows * w) layout of F.unfold.
                unfolded = (
                    padded[:, top:]
                    .as_strided((channels, p, p, rows, width), (s_c, s_y, s_x, s_y, s_x))
                    .reshape(channels * p * p, rows * width)
                )
                vectors = unfolded.t()
                target = out[image, top : top + rows].as_strided(
                    (rows * width, out.shape[-1]), (out.stride(2), 1)
                )
                for r0, r1, c0, c1, block in self.blocks:
                    torch.mm(vectors[:, c0:c1], block, out=target[:, r0:r1])


def _row_blocks(weight: torch.Tensor) -> list:
    matrix = weight.reshape(weight.shape[0], -1)
    blocks = []
    for r0 in range(0, matrix.shape[0], BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, matrix.shape[0])
        used = torch.nonzero(matrix[r0:r1].abs().sum(dim=0)).flatten()
        if len(used) == 0:
            c0, c1 = 0, 1
        else:
            c0, c1 = int(used[0]), int(used[-1]) + 1
        blocks.append((r0, r1, c0, c1, matrix[r0:r1, c0:c1].t().contiguous()))
    return blocks


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


def aggregate(
    stages: list[torch.Tensor], maps: list[StageMap], out_dim: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Fuse stage activations into ``(B, out_dim, h, w)`` on the first stage's grid.

    The result is a channels-last view: its memory is laid out as
    ``(B, h, w, out_dim)``, so ``.permute(0, 2, 3, 1)`` of it is contiguous.
    ``out``, if given, is that contiguous ``(B, h, w, out_dim)`` array; the
    result is then a view of it.
    """
    first = stages[0]
    batch = first.shape[0]
    height, width = first.shape[-2:]
    shape = (batch, height, width, out_dim)
    if out is None:
        out = first.new_empty(shape)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.device != first.device:
        raise ValueError(
            f"out must be a contiguous {shape} tensor on {first.device}; got {tuple(out.shape)} "
            f"on {out.device}."
        )
    written = torch.zeros(out_dim, dtype=torch.bool)
    for stage, stage_map in zip(stages, maps):
        rows = stage_map.rows
        overlaps = bool(written[rows].any())
        target = out[..., rows]
        banded = bool(stage_map.blocks) and stage.device.type == "cpu"
        if banded and not overlaps and stage.shape[-2:] == (height, width):
            stage_map.banded_into(stage, target)
        else:
            part = stage_map(stage)
            if part.shape[-2:] != (height, width):
                part = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
            part = part.permute(0, 2, 3, 1)
            if overlaps:
                # Rows shared with an earlier stage: add; those not yet written start at zero.
                fresh = ~written[rows]
                if fresh.any():
                    target[..., fresh.to(out.device)] = 0
                target += part
            else:
                target.copy_(part)
        written[rows] = True
    if not bool(written.all()):
        out[..., (~written).to(out.device)] = 0
    return out.permute(0, 3, 1, 2)
