"""Images made from integer arithmetic only, the same on every machine and NumPy version.

The committed model file under ``tests/data/`` was fitted on these images; the
test that loads it on another machine regenerates them bit for bit (NumPy's
random generators and floating-point ``sin`` may change between versions and
CPUs, integer arithmetic does not).
"""

from __future__ import annotations

import numpy as np

MODEL_FILE = "portable_lite0.skpatchcore"
RECORD_FILE = "portable_lite0_scores.json"
MODEL_PARAMS = {
    "backbone": "efficientnet_lite0",
    "image_size": 64,
    "crop_size": None,
    "ratio": 0.25,
    "random_state": 0,
    "device": "cpu",
}
# Maps are recorded at every MAP_STEP-th pixel of each axis.
MAP_STEP = 4


def _hash(*parts: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash of integer arrays (broadcast), as int64 in [0, 2**32)."""
    value = np.zeros(np.broadcast(*parts).shape, dtype=np.int64)
    for multiplier, part in zip((73856093, 19349663, 83492791, 2654435761), parts):
        value = (value ^ (np.asarray(part, dtype=np.int64) * multiplier)) & 0xFFFFFFFF
        value = (value * 0x45D9F3B) & 0xFFFFFFFF
        value ^= value >> 16
    return value


def portable_parts(n_images: int, size: int = 64, *, defect: bool = False, seed: int = 0) -> np.ndarray:
    """Grey striped parts with pixel noise (uint8, (n, size, size, 3)); defects are dark discs."""
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n_images, size, size, 3), dtype=np.uint8)
    for i in range(n_images):
        phase = int(_hash(np.int64(seed), np.int64(i)) % 40)
        stripes = np.abs((xx * 4 + phase) % 40 - 20) * 4  # a triangle wave, 0..80
        noise = _hash(np.int64(seed + 1000), np.int64(i), yy, xx) % 25 - 12
        pixels = 88 + stripes + noise
        if defect:
            cy, cx = (
                int(_hash(np.int64(seed + 2000), np.int64(i), np.int64(k)) % (size // 2)) for k in (0, 1)
            )
            cy, cx = cy + size // 4, cx + size // 4
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 10) ** 2] = 20
        images[i] = np.clip(pixels, 0, 255).astype(np.uint8)[:, :, None]
    return images
