"""Anomaly maps: patch scores -> upsampled, Gaussian-smoothed heat maps.

Upsampling (bilinear with ``align_corners=False``, or nearest) and the
Gaussian blur (scipy's ``gaussian_filter``: kernel truncated at 4 sigma,
"reflect" borders) both act on each axis separately and linearly. So each
axis is one small matrix, ``A = blur @ upsample`` of shape (H, h), and a whole
map is ``A_rows @ patch_scores @ A_cols.T``: two tiny matrix products per
image instead of an upsampled image and a 33-tap convolution. On the CPU this
was 7 ms per 224 x 224 map with torch's convolution; it is now a fraction of a
millisecond, and the same code runs on CUDA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .utils._device import as_tensor, float32_precision

UPSAMPLING_MODES = ("bilinear", "nearest")

# Images mapped per step: bounds the (batch, H, W) float32 work buffers.
_MAP_CHUNK = 64


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """1-D Gaussian weights as :func:`scipy.ndimage.gaussian_filter` builds them."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _reflect(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Map positions outside [0, length) back inside as scipy's "reflect" (d c b a | a b c d)."""
    period = 2 * length
    positions = torch.remainder(positions, period)
    return torch.where(positions >= length, period - 1 - positions, positions)


def blur_matrix(length: int, sigma: float) -> torch.Tensor:
    """(length, length) matrix of a 1-D Gaussian blur with reflected borders (float64)."""
    if sigma <= 0:
        return torch.eye(length, dtype=torch.float64)
    kernel = gaussian_kernel(sigma)
    radius = (len(kernel) - 1) // 2
    rows = torch.arange(length).repeat_interleave(len(kernel))
    cols = _reflect(torch.arange(length)[:, None] + torch.arange(-radius, radius + 1)[None, :], length)
    matrix = torch.zeros((length, length), dtype=torch.float64)
    matrix.index_put_((rows, cols.reshape(-1)), kernel.repeat(length), accumulate=True)
    return matrix


def upsampling_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) matrix of torch's 1-D ``interpolate`` (linear without corners, or nearest)."""
    basis = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)
    if mode == "bilinear":
        upsampled = F.interpolate(basis, size=n_out, mode="linear", align_corners=False)
    else:
        upsampled = F.interpolate(basis, size=n_out, mode="nearest")
    return upsampled.squeeze(1).T


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int, sigma: float, mode: str, device: str) -> torch.Tensor:
    operator = blur_matrix(n_out, sigma) @ upsampling_matrix(n_in, n_out, mode)
    return operator.to(device=device, dtype=torch.float32)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n, H, W) maps, equal to scipy's ``gaussian_filter``."""
    height, width = maps.shape[-2:]
    rows = blur_matrix(height, sigma).to(maps.device, maps.dtype)
    cols = blur_matrix(width, sigma).to(maps.device, maps.dtype)
    return rows @ maps @ cols.T


def anomaly_maps(
    patch_scores, output_size: tuple[int, int], *, sigma: float = 4.0, upsampling: str = "bilinear"
):
    """Upsample (n, h, w) patch scores to ``output_size`` and smooth them.

    Bilinear upsampling uses ``align_corners=False`` as the reference code;
    the Gaussian ``sigma`` is in output pixels. A tensor is processed on its
    own device and a tensor is returned; an array gives an array.
    """
    as_array = not torch.is_tensor(patch_scores)
    scores = as_tensor(patch_scores).to(torch.float32)
    height, width = (int(v) for v in output_size)
    device = str(scores.device)
    rows = _axis_operator(scores.shape[-2], height, float(sigma), upsampling, device)
    cols_t = _axis_operator(scores.shape[-1], width, float(sigma), upsampling, device).T.contiguous()
    parts = []
    with torch.inference_mode(), float32_precision():
        for chunk in scores.split(_MAP_CHUNK):
            parts.append(rows @ chunk @ cols_t)
    maps = torch.cat(parts)
    return maps.cpu().numpy() if as_array else maps
