"""Synthetic demo data: machined metal plates with scratches, spots and cracks.

skpatchcore ships no image files. The data sets we evaluate on (MVTec AD,
MPDD, magnetic tile) carry no licence to redistribute them, and we found no
small set of real inspection photos that does. The demo therefore generates
its data: :func:`make_demo_dataset` writes clearly synthetic, deterministic
images in the MVTec AD layout, so that ``skpatchcore demo`` runs the whole
path (fit, evaluate, heat maps) on a fresh machine without internet.

The parts are not trivial to model. Every image is a brushed, machined metal
surface whose fine grain is drawn anew for each image; the machining grooves
shift and turn slightly from part to part, and the lighting (brightness,
gradient direction and strength) changes too, so a good test image never
repeats a training image. The defects are small and local: thin bright
scratches, dark rust-brown spots and thin branching dark cracks, each with
its ground-truth mask.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["DEFECT_TYPES", "make_demo_dataset"]

DEFECT_TYPES = ("crack", "scratch", "spot")

# Written at the root of every generated data set; it says what the images
# are and lets a rerun replace a folder it made itself (and only such a folder).
_MARKER = "SYNTHETIC_DATA.txt"
_SUBFOLDERS = ("train", "test", "ground_truth")
# Streams of random numbers, one per split, so that asking for more test
# images never changes the training images.
_STREAMS = {"train": 0, "test_good": 1, "crack": 2, "scratch": 3, "spot": 4}
_STEEL = np.array([0.80, 0.82, 0.86])  # slightly blue-grey
_RUST = np.array([0.42, 0.25, 0.14])


def make_demo_dataset(
    root,
    *,
    n_train: int = 30,
    n_test_good: int = 8,
    n_test_defect: int = 4,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a small synthetic inspection data set in the MVTec AD layout.

    The images are generated, not photographed (skpatchcore has no real
    images it may redistribute): textured metal plates, defect-free or with
    one defect. The same arguments always give the same pixels. Layout::

        root/train/good/000.png ...                       n_train good parts
        root/test/good/000.png ...                        n_test_good good parts
        root/test/<type>/000.png ...                      n_test_defect per type
        root/ground_truth/<type>/000_mask.png ...         0 / 255 masks
        root/SYNTHETIC_DATA.txt                           what this folder is

    with defect types ``"crack"``, ``"scratch"`` and ``"spot"``. Defects lie
    at least ``size // 8`` pixels from the border, so they stay inside the
    default centre crop.

    Parameters
    ----------
    root : str or path-like
        Category folder to create. It must not exist, be empty, or hold a
        data set written earlier by this function (which is then replaced).
    n_train : int, default=30
        Number of defect-free training images.
    n_test_good : int, default=8
        Number of defect-free test images.
    n_test_defect : int, default=4
        Number of defective test images of *each* defect type.
    size : int, default=256
        Height and width of the square RGB images, at least 64.
    seed : int, default=0
        Seed of the generator.

    Returns
    -------
    pathlib.Path
        ``root``, ready for :func:`skpatchcore.datasets.load_mvtec_category`.

    Raises
    ------
    FileExistsError
        If ``root`` is a non-empty folder that this function did not write.
    ValueError
        If a count is negative, ``n_train`` is 0 or ``size`` is below 64.

    Examples
    --------
    >>> import tempfile
    >>> from skpatchcore._demo import make_demo_dataset
    >>> from skpatchcore.datasets import load_mvtec_category
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     data = load_mvtec_category(make_demo_dataset(folder, n_train=2, n_test_good=1,
    ...                                                  n_test_defect=1, size=64))
    ...     print(len(data.train_paths), data.test_defect_types)
    2 ['crack', 'good', 'scratch', 'spot']
    """
    for name, value, low in [
        ("n_train", n_train, 1),
        ("n_test_good", n_test_good, 0),
        ("n_test_defect", n_test_defect, 0),
        ("size", size, 64),
        ("seed", seed, 0),
    ]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"The '{name}' parameter must be an int >= {low}; got {value!r}.")
    root = _prepare_root(root)
    (root / _MARKER).write_text(
        "Synthetic images written by skpatchcore._demo.make_demo_dataset("
        f"n_train={n_train}, n_test_good={n_test_good}, n_test_defect={n_test_defect}, "
        f"size={size}, seed={seed}).\nThey are generated textures, not photographs of real parts.\n"
    )
    for index in range(n_train):
        _save(_plate(_rng(seed, "train", index), size), root / "train" / "good" / f"{index:03d}.png")
    for index in range(n_test_good):
        _save(_plate(_rng(seed, "test_good", index), size), root / "test" / "good" / f"{index:03d}.png")
    for defect_type in DEFECT_TYPES:
        for index in range(n_test_defect):
            rng = _rng(seed, defect_type, index)
            image = _plate(rng, size)
            image, mask = _DEFECTS[defect_type](image, rng)
            _save(image, root / "test" / defect_type / f"{index:03d}.png")
            _save(mask, root / "ground_truth" / defect_type / f"{index:03d}_mask.png")
    return root


def _prepare_root(root) -> Path:
    root = Path(os.fspath(root))
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{os.fspath(root)!r} is a file; give a folder for the demo data.")
        if (root / _MARKER).is_file():
            for name in _SUBFOLDERS:
                _remove_tree(root / name)
        elif any(root.iterdir()):
            raise FileExistsError(
                f"{os.fspath(root)!r} is not empty and does not hold demo data written earlier; "
                "give a new or empty folder."
            )
    root.mkdir(parents=True, exist_ok=True)
    return root


def _remove_tree(folder: Path) -> None:
    """Remove a previous demo tree: only PNG files and the folders holding them."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_dir():
            path.rmdir()
        elif path.suffix == ".png":
            path.unlink()
    folder.rmdir()


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)).save(path)


def _plate(rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free part: brushed grain, machining grooves, varying light; (size, size, 3) in [0, 1]."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    # Brushing: white noise smeared along the rows gives long, thin streaks.
    streaks = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=(0.7, 10.0), mode="wrap")
    streaks /= streaks.std()
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=0.8)
    grain /= grain.std()
    # Machining grooves: a periodic relief, shifted and turned a little per part.
    angle = np.deg2rad(rng.uniform(-3.0, 3.0))
    period = rng.uniform(10.0, 12.0)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    across = rows * np.cos(angle) - cols * np.sin(angle)
    grooves = np.sin(2.0 * np.pi * across / period + phase)
    # Lighting: overall level and a linear gradient in a random direction.
    direction = rng.uniform(0.0, 2.0 * np.pi)
    slope = rng.uniform(0.0, 0.12)
    ramp = ((cols - size / 2) * np.cos(direction) + (rows - size / 2) * np.sin(direction)) / size
    light = rng.uniform(0.85, 1.1) * (1.0 + 2.0 * slope * ramp)

    height = 0.55 + 0.06 * streaks + 0.025 * grain + 0.05 * grooves
    gray = np.clip(height * light, 0.0, 1.0)
    return gray[:, :, None] * _STEEL


def _defect_centre(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (row, col) point at least a quarter of the image from the border."""
    return rng.uniform(size / 4, 3 * size / 4, size=2)


def _distance_to_polyline(points: np.ndarray, size: int) -> np.ndarray:
    """Distance (pixels) of every pixel centre to the polyline through ``points`` (k, 2)."""
    grid = np.stack(np.mgrid[0:size, 0:size], axis=-1).astype(np.float64)
    distance = np.full((size, size), np.inf)
    for start, end in zip(points[:-1], points[1:]):
        step = end - start
        t = np.clip(((grid - start) @ step) / max(step @ step, 1e-12), 0.0, 1.0)
        nearest = start + t[:, :, None] * step
        distance = np.minimum(distance, np.linalg.norm(grid - nearest, axis=-1))
    return distance


def _clip_to_margin(points: np.ndarray, size: int) -> np.ndarray:
    margin = size // 8
    return np.clip(points, margin, size - 1 - margin)


def _line_defect(image, distance, width, shade):
    """Blend a line of ``width`` pixels into ``image``; the mask covers where it shows."""
    coverage = np.clip(width / 2.0 + 0.5 - distance, 0.0, 1.0)
    mask = coverage >= 0.25
    return np.clip(image + shade * coverage[:, :, None], 0.0, 1.0), mask


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    centre = _defect_centre(rng, size)
    angle = rng.uniform(0.0, np.pi)
    half_length = rng.uniform(0.12, 0.22) * size
    offset = half_length * np.array([np.sin(angle), np.cos(angle)])
    points = _clip_to_margin(np.stack([centre - offset, centre + offset]), size)
    distance = _distance_to_polyline(points, size)
    # A scratch cuts through the grooves and catches the light: bright with a dark rim.
    image, mask = _line_defect(image, distance, rng.uniform(1.5, 2.5), shade=0.35)
    rim = np.clip(1.0 - np.abs(distance - 2.0), 0.0, 1.0)
    return np.clip(image - 0.12 * rim[:, :, None], 0.0, 1.0), _as_mask(mask | (rim > 0.5))


def _crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    heading = rng.uniform(0.0, 2.0 * np.pi)
    points = [_defect_centre(rng, size)]
    for _ in range(int(rng.integers(8, 14))):
        heading += rng.normal(0.0, 0.5)
        points.append(points[-1] + rng.uniform(4.0, 8.0) * np.array([np.sin(heading), np.cos(heading)]))
    trunk = _clip_to_margin(np.array(points), size)
    # A short side branch from the middle of the trunk.
    branch = [trunk[len(trunk) // 2]]
    turn = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    for _ in range(3):
        turn += rng.normal(0.0, 0.4)
        branch.append(branch[-1] + rng.uniform(4.0, 7.0) * np.array([np.sin(turn), np.cos(turn)]))
    branch = _clip_to_margin(np.array(branch), size)
    distance = np.minimum(_distance_to_polyline(trunk, size), _distance_to_polyline(branch, size))
    image, mask = _line_defect(image, distance, rng.uniform(1.2, 2.0), shade=-0.4)
    return image, _as_mask(mask)


def _spot(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    centre = _defect_centre(rng, size)
    radii = rng.uniform(0.025, 0.05, size=2) * size
    angle = rng.uniform(0.0, np.pi)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    dr, dc = rows - centre[0], cols - centre[1]
    along = dr * np.cos(angle) + dc * np.sin(angle)
    across = -dr * np.sin(angle) + dc * np.cos(angle)
    radius = np.hypot(along / radii[0], across / radii[1])
    # Rust: an irregular, soft-edged brown stain that keeps some of the texture below.
    rough = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=2.0)
    rough /= rough.std()
    cover = np.clip((1.15 - radius + 0.08 * rough) / 0.3, 0.0, 1.0)
    luminance = image.mean(axis=2, keepdims=True)
    stained = (0.5 + 0.6 * luminance) * _RUST
    image = image * (1.0 - cover[:, :, None]) + stained * cover[:, :, None]
    return image, _as_mask(cover >= 0.5)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as a (size, size) float image that :func:`_save` writes as 0 / 255."""
    return mask.astype(np.float64)


_DEFECTS = {"crack": _crack, "scratch": _scratch, "spot": _spot}
