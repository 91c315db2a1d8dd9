"""Shared fixtures: small synthetic parts, the offline backbone, the real data sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# The real data sets are read in place (no redistribution licence) and the tests
# that need them skip when they are absent.
DATA_DIR = Path(
    os.environ.get("SKPATCHCORE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
MPDD = DATA_DIR / "mpdd" / "metal_plate"
MAGNETIC_TILE = DATA_DIR / "magnetic_tile" / "magnetic_tile"


def needs(path: Path):
    """Skip marker for tests that read a real data set."""
    return pytest.mark.skipif(not path.is_dir(), reason=f"data set not found at {path}")


def textured_parts(n_images: int, size: int = 64, *, defect: bool = False, seed: int = 0) -> np.ndarray:
    """Grey parts with a fine striped texture; a defect is a dark blob at a random place.

    Returns uint8 images (n, size, size, 3) and, for defects, the boolean masks.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n_images, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        phase = rng.uniform(0, 2 * np.pi)
        base = 128 + 40 * np.sin(xx / 2.5 + phase) + rng.normal(0, 6, (size, size))
        if defect:
            cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 10) ** 2
            base[blob] = 20
            masks[i] = blob
        images[i] = np.clip(base, 0, 255).astype(np.uint8)[:, :, None]
    return (images, masks) if defect else images


@pytest.fixture(scope="session")
def scoring_parts():
    """Eight good training images, and two held-out good and three defective ones to score."""
    good = textured_parts(10, seed=1)
    defective, _ = textured_parts(3, defect=True, seed=2)
    return good[:8], np.concatenate([good[8:], defective])


@pytest.fixture(scope="session")
def good_parts():
    return textured_parts(12, seed=1)


@pytest.fixture(scope="session")
def defective_parts():
    return textured_parts(6, defect=True, seed=2)


@pytest.fixture(scope="session")
def lite_features():
    """A fitted efficientnet_lite0 transformer for 64 x 64 inputs (8 x 8 patch grid)."""
    from skpatchcore import PatchFeatureTransformer

    images = textured_parts(2, seed=3)
    return PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, crop_size=None, device="cpu"
    ).fit(images)


@pytest.fixture
def clean_precision():
    """torch's default float32 precision settings before and after the test."""
    from ._precision import reset_precision

    reset_precision()
    yield
    reset_precision()
