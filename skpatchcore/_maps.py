"""Anomaly maps: patch scores -> upsampled, Gaussian-smoothed heat maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils._device import as_tensor

UPSAMPLING_MODES = ("bilinear", "nearest")

# Images smoothed per step: bounds the (batch, H, W) float32 work buffers.
_MAP_CHUNK = 64


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """1-D Gaussian weights as :func:`scipy.ndimage.gaussian_filter` builds them."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _reflect_indices(length: int, radius: int, device) -> torch.Tensor:
    """Indices padding an axis by ``radius`` in scipy's "reflect" mode (d c b a | a b c d)."""
    positions = torch.arange(-radius, length + radius, device=device)
    period = 2 * length
    positions = torch.remainder(positions, period)
    return torch.where(positions >= length, period - 1 - positions, positions)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n, H, W) maps, equal to scipy's ``gaussian_filter``.

    Same kernel (truncated at 4 sigma) and the same "reflect" border handling,
    computed as two 1-D convolutions on the maps' device.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(device=maps.device, dtype=maps.dtype)
    radius = (len(kernel) - 1) // 2
    height, width = maps.shape[-2:]
    out = maps.unsqueeze(1)
    out = out.index_select(2, _reflect_indices(height, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    out = out.index_select(3, _reflect_indices(width, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return out.squeeze(1)


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
    parts = []
    with torch.inference_mode():
        for chunk in scores.split(_MAP_CHUNK):
            chunk = chunk.unsqueeze(1)
            if upsampling == "bilinear":
                chunk = F.interpolate(chunk, size=tuple(output_size), mode="bilinear", align_corners=False)
            else:
                chunk = F.interpolate(chunk, size=tuple(output_size), mode="nearest")
            parts.append(gaussian_blur(chunk.squeeze(1), sigma))
    maps = torch.cat(parts)
    return maps.cpu().numpy() if as_array else maps
