"""Loaders for anomaly detection datasets laid out like MVTec AD.

An MVTec AD category folder looks like::

    <category>/train/good/*.png              defect-free training images
    <category>/test/<defect type>/*.png      test images; the type "good" is defect-free
    <category>/ground_truth/<defect type>/<image stem>_mask.png

The loaders return file *paths* (the estimators read images lazily) and
check the layout up front, reading only image headers, so that a missing or
mismatched mask is reported when the data set is loaded rather than halfway
through an evaluation. :func:`load_masks` brings masks to the model input
geometry exactly as the images are brought there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from skpatchcore.utils._geometry import Geometry
from skpatchcore.utils._images import (
    ImageReadError,
    decode,
    image_paths_in,
    open_image,
    upright_size,
)

__all__ = ["MVTecCategory", "load_image_folder", "load_masks", "load_mvtec_category"]

_GOOD = "good"
_MASK_SUFFIX = "_mask.png"


@dataclass(frozen=True, eq=False)
class MVTecCategory:
    """One category of an MVTec AD style data set, as file paths.

    Returned by :func:`load_mvtec_category`. The attributes cannot be
    reassigned; the ``test_*`` attributes are aligned (one entry per test
    image, in the order of ``test_paths``).

    Attributes
    ----------
    name : str
        Name of the category folder, e.g. ``"metal_plate"``.
    path : str
        The category folder, as given.
    train_paths : list of str
        Defect-free training images (``train/good``), sorted.
    test_paths : list of str
        Test images, sorted by defect type then file name.
    test_labels : ndarray of shape (n_test,), dtype int
        ``+1`` for a good test image, ``-1`` for a defective one
        (scikit-learn's outlier labels); read-only.
    test_defect_types : list of str
        Name of each test image's folder under ``test/``; ``"good"`` for
        good images.
    test_mask_paths : list of str or None
        Ground-truth mask of each test image; None for good images.
    """

    name: str
    path: str
    train_paths: list[str]
    test_paths: list[str]
    test_labels: np.ndarray
    test_defect_types: list[str]
    test_mask_paths: list[str | None]

    @property
    def mask_paths_by_image(self) -> dict[str, str | None]:
        """Mapping {image path: mask path or None} over train and test images.

        Training images are good, so they map to None. This is the
        ``mask_paths`` argument of :func:`skpatchcore.metrics.make_pixel_scorer`.
        """
        mapping: dict[str, str | None] = dict.fromkeys(self.train_paths)
        mapping.update(zip(self.test_paths, self.test_mask_paths))
        return mapping


def _check_folder(path, name: str = "path") -> Path:
    """Return ``path`` as a Path to an existing directory, or raise naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"The '{name}' parameter must be a str or path-like; got {type(path).__name__}.")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"The '{name}' parameter {os.fspath(path)!r}: no such directory.")
    if not folder.is_dir():
        raise ValueError(f"The '{name}' parameter {os.fspath(path)!r} is a file; a directory is expected.")
    return folder


def _open(path, role: str) -> Image.Image:
    """Open an image file lazily; errors say what the file is (e.g. "mask")."""
    try:
        return open_image(path)
    except ImageReadError as exc:
        raise _reworded(exc, path, role) from None


def _reworded(error: ImageReadError, path, role: str) -> ImageReadError:
    # The image helpers phrase their messages for an estimator's X ("X[0] ('path'): ...").
    message = str(error)
    prefix = f"X[0] ({os.fspath(path)!r}): "
    reason = message.removeprefix(prefix)
    return ImageReadError(f"The {role} {os.fspath(path)!r} cannot be used: {reason}")


def _image_size(path, role: str) -> tuple[int, int]:
    """``(height, width)`` from the header of an image file, as shown upright (EXIF orientation)."""
    with _open(path, role) as image:
        return upright_size(image)


def load_image_folder(path) -> list[str]:
    """List the image files in a folder, sorted by name.

    Only the folder itself is searched (not sub-folders). Files count as
    images by their extension (png, jpg, jpeg, bmp, tif, tiff, webp); they
    are not opened.

    Parameters
    ----------
    path : str or path-like
        A folder of images, e.g. the defect-free images to fit a detector on.

    Returns
    -------
    list of str
        Paths of the image files, sorted.

    Examples
    --------
    >>> from skpatchcore.datasets import load_image_folder
    >>> paths = load_image_folder("mvtec/bottle/train/good")  # doctest: +SKIP
    >>> detector.fit(paths)  # doctest: +SKIP
    """
    folder = _check_folder(path)
    paths = [os.fspath(p) for p in image_paths_in(folder)]
    if not paths:
        raise ValueError(
            f"The 'path' parameter {os.fspath(path)!r} holds no image files "
            "(.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp)."
        )
    return paths


def load_mvtec_category(path) -> MVTecCategory:
    """Load the file lists of one category laid out like MVTec AD.

    Expected layout (images may be of any size, also varying)::

        <path>/train/good/<name>.<ext>
        <path>/test/<type>/<name>.<ext>          type "good" = defect-free
        <path>/ground_truth/<type>/<name>_mask.png

    Every defective test image must have its mask, of exactly its size.
    Only image headers are read to check this; pixels are not decoded.

    Parameters
    ----------
    path : str or path-like
        The category folder, e.g. ``".../mvtec/bottle"``.

    Returns
    -------
    MVTecCategory
        Frozen dataclass with ``name``, ``path``, ``train_paths``,
        ``test_paths``, ``test_labels`` (+1 good, -1 defective),
        ``test_defect_types`` and ``test_mask_paths`` (None for good images).

    Raises
    ------
    FileNotFoundError
        If ``path``, ``train/good``, ``test`` or the mask of a defective test
        image does not exist.
    ValueError
        If ``path`` is not a directory, ``train/good`` or ``test`` holds no
        image, or a mask's size differs from its image's.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec_category
    >>> data = load_mvtec_category("mvtec/bottle")  # doctest: +SKIP
    >>> detector.fit(data.train_paths)  # doctest: +SKIP
    >>> image_auroc(data.test_labels, -detector.decision_function(data.test_paths))  # doctest: +SKIP
    """
    root = _check_folder(path)
    train_folder = root / "train" / _GOOD
    if not train_folder.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} is not an MVTec AD category folder: {os.fspath(train_folder)!r} is missing."
        )
    train_paths = [os.fspath(p) for p in image_paths_in(train_folder)]
    if not train_paths:
        raise ValueError(f"The training folder {os.fspath(train_folder)!r} holds no image files.")

    test_folder = root / "test"
    if not test_folder.is_dir():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} is not an MVTec AD category folder: {os.fspath(test_folder)!r} is missing."
        )
    test_paths, defect_types, mask_paths = [], [], []
    type_folders = sorted(p for p in test_folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for type_folder in type_folders:
        for image_path in image_paths_in(type_folder):
            mask_path = None
            if type_folder.name != _GOOD:
                mask_path = root / "ground_truth" / type_folder.name / f"{image_path.stem}{_MASK_SUFFIX}"
                _check_mask_pairs(image_path, mask_path)
                mask_path = os.fspath(mask_path)
            test_paths.append(os.fspath(image_path))
            defect_types.append(type_folder.name)
            mask_paths.append(mask_path)
    if not test_paths:
        raise ValueError(f"The test folder {os.fspath(test_folder)!r} holds no image in any sub-folder.")

    labels = np.where(np.asarray(defect_types) == _GOOD, 1, -1).astype(np.int64)
    labels.setflags(write=False)
    return MVTecCategory(
        name=root.resolve().name,
        path=os.fspath(path),
        train_paths=train_paths,
        test_paths=test_paths,
        test_labels=labels,
        test_defect_types=defect_types,
        test_mask_paths=mask_paths,
    )


def _check_mask_pairs(image_path: Path, mask_path: Path) -> None:
    """A defective test image must have a mask file of exactly its size."""
    if not mask_path.is_file():
        raise FileNotFoundError(
            f"The defective test image {os.fspath(image_path)!r} has no mask: "
            f"expected {os.fspath(mask_path)!r}."
        )
    image_size = _image_size(image_path, "test image")
    mask_size = _image_size(mask_path, "mask")
    if image_size != mask_size:
        raise ValueError(
            f"The mask {os.fspath(mask_path)!r} is {_hw(mask_size)} but its image "
            f"{os.fspath(image_path)!r} is {_hw(image_size)} (height x width); they must be the same size."
        )


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def load_masks(
    mask_paths: Sequence,
    image_paths: Sequence,
    image_size: int | tuple[int, int] | None = 320,
    crop_size: int | tuple[int, int] | None = 320,
    resize_side: str = "longer",
    *,
    geometry: Geometry | None = None,
) -> np.ndarray:
    """Load ground-truth masks at the model input geometry of their images.

    Each mask is resized and centre-cropped exactly like its image (the same
    :class:`~skpatchcore.utils._geometry.Geometry`: bilinear resize, then
    binarised at 0.5), so that it lines up pixel for pixel with the anomaly
    map the model gives for that image. To score maps, prefer
    :func:`skpatchcore.metrics.pixel_metrics`, which compares them with the
    masks at each image's original size (padding and crops counted honestly);
    masks at the model input are for drawing on the maps, or training.

    A mask file is read as grayscale: if its values are only 0 and 1 they are
    used as they are, otherwise a pixel is defective where its value is at
    least half the file's range (128 of 255, or 32768 of 65535 for a 16-bit
    mask), so 0/255 masks and masks with soft edges both work. For a colour
    mask the brightest channel counts.

    Parameters
    ----------
    mask_paths : sequence of str, path-like or None
        One entry per image: the path of its mask, or None for a good image
        (its mask is all zeros).
    image_paths : sequence of str or path-like
        The images the masks belong to (only their headers are read, for the
        size). Each mask must be exactly the size of its image.
    image_size : int, (int, int) or None, default=320
        Resize step, as the estimator's ``image_size``: an int makes the
        longer (or, see ``resize_side``, the shorter) side that long, a pair
        is an exact ``(height, width)``, None keeps the size. The defaults of
        these three settings are a 320 x 320 square letterbox, the
        :class:`~skpatchcore.PatchFeatureTransformer` defaults before 0.2.0:
        the estimator's default now, ``crop_size="auto"``, is a box chosen
        from the training images in ``fit``, which this function cannot
        choose. For a model's own masks, pass ``geometry`` instead.
    crop_size : int, (int, int) or None, default=320
        Centre crop, as the estimator's ``crop_size``; None means no crop.
    resize_side : {"longer", "shorter", "fit"}, default="longer"
        As the estimator's ``resize_side``.
    geometry : Geometry, default=None
        A fitted model's geometry (``model.named_steps["features"].geometry_``
        of a pipeline, ``geometry_`` of a fitted
        :class:`~skpatchcore.PatchFeatureTransformer`); when given, it replaces
        the three settings above, and the masks line up with that model's
        maps whatever its settings (with the default ``crop_size="auto"``, the
        only way).

    Returns
    -------
    ndarray of shape (n_images, height, width), dtype bool
        True on defective pixels.

    Raises
    ------
    ValueError
        If the lengths differ, a mask's size differs from its image's, or the
        images give model inputs of different sizes (then the masks cannot
        be stacked: set ``crop_size`` or an exact ``(height, width)``
        ``image_size``).

    Examples
    --------
    >>> from skpatchcore import make_patchcore
    >>> from skpatchcore.datasets import load_masks, load_mvtec_category
    >>> data = load_mvtec_category("mvtec/bottle")  # doctest: +SKIP
    >>> model = make_patchcore(backbone="efficientnet_lite0").fit(data.train_paths)  # doctest: +SKIP
    >>> geometry = model.named_steps["features"].geometry_  # doctest: +SKIP
    >>> masks = load_masks(data.test_mask_paths, data.test_paths, geometry=geometry)  # doctest: +SKIP
    >>> masks.shape  # doctest: +SKIP
    (83, 320, 320)
    """
    if geometry is None:
        geometry = Geometry(image_size=image_size, crop_size=crop_size, resize_side=resize_side)
    mask_paths, image_paths = list(mask_paths), list(image_paths)
    if len(mask_paths) != len(image_paths):
        raise ValueError(
            "'mask_paths' and 'image_paths' must have the same length (one mask or None per image); "
            f"got {len(mask_paths)} and {len(image_paths)}."
        )
    if not image_paths:
        raise ValueError("'image_paths' is empty: at least one image is required.")

    # Check every size from headers before decoding anything.
    output_sizes = []
    for image_path, mask_path in zip(image_paths, mask_paths):
        size = _image_size(image_path, "image")
        if mask_path is not None:
            mask_size = _image_size(mask_path, "mask")
            if mask_size != size:
                raise ValueError(
                    f"The mask {os.fspath(mask_path)!r} is {_hw(mask_size)} but its image "
                    f"{os.fspath(image_path)!r} is {_hw(size)} (height x width); they must be the same size."
                )
        output_sizes.append(geometry.output_size(*size))
    first = output_sizes[0]
    for index, size in enumerate(output_sizes):
        if size != first:
            raise ValueError(
                f"The images give model inputs of different sizes ({_hw(first)} for "
                f"{os.fspath(image_paths[0])!r}, {_hw(size)} for {os.fspath(image_paths[index])!r}), "
                f"so their masks cannot be stacked (image_size={image_size!r}, crop_size={crop_size!r}); set "
                "'crop_size' (e.g. 224) or an exact (height, width) 'image_size'."
            )

    masks = np.zeros((len(image_paths), *first), dtype=bool)
    for index, mask_path in enumerate(mask_paths):
        if mask_path is not None:
            masks[index] = geometry.apply(_read_mask(mask_path), mask=True)[:, :, 0] > 0.5
    return masks


def _read_mask(path) -> Image.Image:
    """Decode a mask file into a 0/255 grayscale PIL image."""
    image = _open(path, "mask")
    try:
        pixels = np.asarray(decode(image, source=path))
    except ImageReadError as exc:
        raise _reworded(exc, path, "mask") from None
    finally:
        image.close()
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    half = 128 if pixels.dtype == np.uint8 else 32768  # 16-bit modes read as uint16 or int32
    defective = pixels > 0 if pixels.max(initial=0) <= 1 else pixels >= half
    return Image.fromarray(np.where(defective, 255, 0).astype(np.uint8))
