"""Reading images and bringing them to the model's input geometry.

Everything that turns user input (arrays, PIL images, file paths) into
pixels for the model lives here, once, so that the feature transformer, the
dataset loaders, the reports, the command line and the torch-free runtime
agree on it. This module imports NumPy and PIL only.

Files are read as a photo viewer shows them: the EXIF orientation is
applied, a fully opaque alpha channel is dropped, palettes and other colour
spaces become RGB, and 16-bit grayscale files keep their 16 bits (values are
divided by ``2**bit_depth - 1``). What cannot be read faithfully (a
transparent alpha channel, 32-bit float files) is refused with a message
naming the file.

The geometry (resize, crop, letterbox) lives in :mod:`._geometry`; the
reader hands images to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ._geometry import Geometry

# PIL modes we convert on read, and why: palettes, bilevel and colour spaces
# other than RGB carry no information that an RGB conversion loses for a CNN.
_CONVERT_TO_RGB = {"P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_CONVERT_TO_L = {"1"}
# Modes with an alpha channel, and what is left once an opaque alpha is dropped.
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "RGB"}
# Grayscale with more than 8 bits: 16-bit PNG and TIFF open as "I;16*", some as "I".
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_GRAY_MODES = {"L"} | _CONVERT_TO_L | {"LA", "La"} | _HIGH_BIT_MODES
# EXIF orientation -> the transposition that shows the picture upright.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# The default and the accepted range of ``bit_depth``.
DEFAULT_BIT_DEPTH = 16


class ImageReadError(ValueError):
    """An image could not be read or is in a form skpatchcore does not accept.

    The message names the offending item (file path or position in ``X``).
    """


class SkippedImagesWarning(UserWarning):
    """Some images were skipped (``on_error="skip"``); their results are NaN.

    Attributes
    ----------
    skipped : dict of int to str
        Position in ``X`` of each skipped image and why it was skipped.
    """

    def __init__(self, skipped: dict):
        self.skipped = dict(skipped)

    def __str__(self) -> str:
        shown = "; ".join(self.skipped[i] for i in sorted(self.skipped)[:5])
        more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        return f"Skipped {len(self.skipped)} image(s), their scores and maps are NaN: {shown}{more}"


def _describe(item, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"X[{index}] ({os.fspath(item)!r})"
    return f"X[{index}]"


def open_image(path, index: int = 0) -> Image.Image:
    """Open an image file lazily (header only) and check it can be used.

    Returns a PIL image whose pixels are not decoded yet. Raises
    :class:`ImageReadError` naming the file for missing, unreadable,
    non-image, too large and unsupported (e.g. 32-bit float) files.
    """
    where = _describe(path, index)
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise ImageReadError(f"{where}: no such file.") from None
    except IsADirectoryError:
        raise ImageReadError(f"{where}: is a directory, not an image file.") from None
    except PermissionError:
        raise ImageReadError(f"{where}: permission denied.") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{where}: not an image file PIL can read.") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{where}: refused, too many pixels ({exc}).") from None
    except OSError as exc:
        raise ImageReadError(f"{where}: cannot be read ({exc}).") from None
    try:
        _check_mode(image.mode, where)
        if image.width < 1 or image.height < 1:
            raise ImageReadError(f"{where}: has no pixels ({image.width}x{image.height}).")
    except ImageReadError:
        image.close()
        raise
    return image


def _check_mode(mode: str, where: str) -> None:
    if mode == "F":
        raise ImageReadError(
            f"{where}: is a 32-bit float image (mode 'F'); skpatchcore reads 8- and 16-bit images. "
            "Pass its pixels as a float array scaled to [0, 1] instead."
        )
    known = {"L", "RGB"} | _CONVERT_TO_RGB | _CONVERT_TO_L | set(_ALPHA_MODES) | _HIGH_BIT_MODES
    if mode not in known:
        raise ImageReadError(f"{where}: image mode {mode!r} is not supported; use grayscale or RGB.")


def channels_of_mode(mode: str) -> int:
    """Number of channels an image of this PIL mode has once read: 1 (gray) or 3 (colour)."""
    return 1 if mode in _GRAY_MODES else 3


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, read without decoding its pixels.

    1 (upright) when there is none or it cannot be read. A PNG's EXIF chunk
    counts only when it precedes the pixel data (where PIL finds it on
    opening the file), so that a file's size is known from its header.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is ignored, as photo viewers do
        return 1
    return value if value in _UPRIGHT else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an opened image as shown upright (EXIF orientation applied)."""
    if orientation(image) >= 5:  # a quarter turn, or a transposition: the sides swap
        return image.width, image.height
    return image.height, image.width


def decode(image: Image.Image, index: int = 0, source=None) -> Image.Image:
    """Decode an opened image as a photo viewer shows it.

    The EXIF orientation is applied, an alpha channel is dropped when fully
    opaque (else :class:`ImageReadError`), and the result is in mode "L" or
    "RGB", or one of the 16-bit grayscale modes ("I;16", "I", ...), which
    :meth:`ImageSet.load` scales with ``bit_depth``.
    """
    where = _describe(source if source is not None else image, index)
    turn = _UPRIGHT.get(orientation(image))  # before load(): the header alone decides
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        image.close()
        raise ImageReadError(f"{where}: refused, too many pixels ({exc}).") from None
    except (OSError, SyntaxError, ValueError) as exc:
        image.close()
        raise ImageReadError(f"{where}: cannot be decoded, the file may be truncated ({exc}).") from None
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("PA")
    if image.mode in _ALPHA_MODES:
        image = _drop_opaque_alpha(image, where)
    if image.mode in _CONVERT_TO_RGB:
        image = image.convert("RGB")
    elif image.mode in _CONVERT_TO_L:
        image = image.convert("L")
    if turn is not None:
        image = image.transpose(turn)
    return image


def _drop_opaque_alpha(image: Image.Image, where: str) -> Image.Image:
    low, _ = image.getchannel(image.mode[-1]).getextrema()
    if low != 255:
        raise ImageReadError(
            f"{where}: has transparent pixels (alpha down to {low} of 255); skpatchcore reads opaque "
            "images only, since what lies behind a transparent pixel is unknown. Flatten it onto a "
            "background first, e.g. PIL.Image.alpha_composite(background, image).convert('RGB')."
        )
    if image.mode == "PA":
        image = image.convert("RGBA")
    # Opaque, so premultiplied ("RGBa", "La") and straight values are the same.
    return Image.merge(_ALPHA_MODES[image.mode], image.split()[:-1])


def high_bit_pixels(image: Image.Image | np.ndarray, bit_depth: int, where: str) -> np.ndarray:
    """16-bit pixels as float32 ``(H, W, C)`` in [0, 1]: ``value / (2**bit_depth - 1)``.

    Values beyond that range mean ``bit_depth`` is too small for the data:
    an :class:`ImageReadError` says so rather than clipping them.
    """
    values = np.asarray(image)
    top = (1 << bit_depth) - 1
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > top:
        raise ImageReadError(
            f"{where}: holds values up to {high} (down to {low}), outside 0..{top} of bit_depth="
            f"{bit_depth}; set bit_depth to the number of bits the camera stores (16 for the full "
            "16-bit range)."
        )
    pixels = values.astype(np.float32) / np.float32(top)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


@dataclass
class ImageSet:
    """A validated, lazily decoded collection of images.

    Attributes
    ----------
    items : sequence
        The user's items: file paths, PIL images or per-image arrays.
    sizes : list of (int, int)
        ``(height, width)`` of every image as shown upright, read from
        headers or arrays.
    n_channels : int
        1 (grayscale) or 3 (RGB): what :meth:`load` returns for every image.
        A grayscale image among colour ones gets its one channel three times
        (exactly as converting the file to RGB first); a colour image for a
        grayscale model gets PIL's luma ``L = 0.299 R + 0.587 G + 0.114 B``.
    bit_depth : int
        Significant bits of 16-bit images (files and uint16 arrays).
    """

    items: Sequence
    sizes: list
    n_channels: int
    failed: dict = field(default_factory=dict)  # position -> reason, with skip_errors
    bit_depth: int = DEFAULT_BIT_DEPTH

    def __len__(self) -> int:
        return len(self.items)

    @property
    def valid(self) -> list[int]:
        """Positions of the images that passed validation (all, unless errors are skipped)."""
        return [i for i in range(len(self.items)) if i not in self.failed]

    def load(self, index: int) -> Image.Image | np.ndarray:
        """Pixels of image ``index``: PIL "L"/"RGB" (8-bit data) or float32 ``(H, W, C)`` in [0, 1]."""
        item = self.items[index]
        where = _describe(item, index)
        if isinstance(item, np.ndarray):
            pixels = high_bit_pixels(item, self.bit_depth, where) if item.dtype == np.uint16 else item
            return _float_with_channels(pixels, self.n_channels)
        image = decode(item if isinstance(item, Image.Image) else open_image(item, index), index, item)
        if image.mode in _HIGH_BIT_MODES:
            return _float_with_channels(high_bit_pixels(image, self.bit_depth, where), self.n_channels)
        if channels_of_mode(image.mode) != self.n_channels:
            image = image.convert("RGB" if self.n_channels == 3 else "L")
        return image

    def model_input(self, index: int, geometry: Geometry) -> np.ndarray:
        """Image ``index`` at the model input geometry: uint8 or float32 ``(h, w, n_channels)``.

        8-bit images stay uint8 (:func:`to_unit_float` converts them, a batch
        at a time); 16-bit images and float arrays come as float32 in [0, 1].
        """
        image = self.load(index)
        if isinstance(image, Image.Image):
            return geometry.apply_8bit(image)
        return geometry.apply(image)


def _float_with_channels(pixels: np.ndarray, n_channels: int) -> np.ndarray:
    """Float32 ``(H, W, C)`` pixels with ``n_channels`` channels (repeated gray, or PIL's luma)."""
    pixels = pixels.astype(np.float32, copy=False)
    if pixels.shape[2] == n_channels:
        return pixels
    if n_channels == 3:
        return np.repeat(pixels, 3, axis=2)
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(luma, 0.0, 1.0)[:, :, None]


def _array_image(array: np.ndarray, where: str, bit_depth: int) -> Image.Image | np.ndarray:
    """Validate one image array.

    uint8 arrays become PIL images, so that they are resized exactly like the
    same picture read from a file; uint16 arrays stay as they are (scaled with
    ``bit_depth`` when loaded); float arrays stay float32 ``(H, W, C)``.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(
            f"{where}: an image must be a 2-D (H, W) or 3-D (H, W, C) array; got shape {array.shape}."
        )
    if array.shape[2] in (2, 4):
        array = _without_opaque_alpha(array, where)
    channels = array.shape[2]
    if channels not in (1, 3):
        raise ValueError(f"{where}: has {channels} channels; accepted are 1 (grayscale) or 3 (RGB).")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{where}: has no pixels (shape {array.shape}).")
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if channels == 1 else array))
    if array.dtype == np.uint16:
        top = (1 << bit_depth) - 1
        if int(array.max()) > top:
            raise ValueError(
                f"{where}: uint16 values go up to {int(array.max())}, beyond {top} of bit_depth="
                f"{bit_depth}; set bit_depth to the number of bits the camera stores."
            )
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{where}: integer dtype {array.dtype} is not accepted; pass uint8 (0-255), uint16 "
            "(scaled by bit_depth) or float in [0, 1]."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{where}: dtype {array.dtype} is not accepted; pass uint8, uint16 or float in [0, 1]."
        )
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: contains NaN or infinity.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{where}: float pixel values must lie in [0, 1]; got [{low:g}, {high:g}]. "
            "Scale the images, or pass uint8."
        )
    return array


def _without_opaque_alpha(array: np.ndarray, where: str) -> np.ndarray:
    """Drop the last channel of a gray+alpha or RGBA array when it is fully opaque."""
    opaque = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(array.dtype, 1.0)
    alpha = array[:, :, -1]
    if alpha.size and (alpha == opaque).all():
        return array[:, :, :-1]
    kind = "RGBA" if array.shape[2] == 4 else "gray + alpha"
    raise ValueError(
        f"{where}: has {array.shape[2]} channels ({kind}?) whose last is not fully opaque; pass "
        "grayscale (H, W) or RGB (H, W, 3) pixels, flattened onto a background."
    )


def check_images(
    X, *, channels: int | None = None, skip_errors: bool = False, bit_depth: int = DEFAULT_BIT_DEPTH
) -> ImageSet:
    """Validate ``X`` as a batch of images without decoding files.

    Parameters
    ----------
    X : ndarray of shape (n, H, W) or (n, H, W, C), or sequence
        uint8, uint16 or float arrays in ``[0, 1]``; or a sequence whose items
        are file paths, PIL images or single-image arrays (sizes may differ).
    channels : int, optional
        Channels the images are to have (the model's): 1 or 3. None decides
        from the images: 3 when any of them is in colour, else 1.
    skip_errors : bool, default=False
        Record a bad item in ``ImageSet.failed`` instead of raising (only
        errors of single items; an empty or malformed ``X`` still raises).
    bit_depth : int, default=16
        Significant bits of 16-bit images.

    Returns
    -------
    ImageSet
    """
    if isinstance(X, (str, os.PathLike, Image.Image)):
        raise TypeError(
            f"X must be a sequence of images (a list of paths, PIL images or arrays) or an array of "
            f"shape (n, H, W[, C]); got a single {type(X).__name__}. Wrap it in a list: [X]."
        )
    if isinstance(X, np.ndarray):
        if X.dtype != object and X.ndim not in (3, 4):
            raise ValueError(
                "X as an array must have shape (n_images, H, W) or (n_images, H, W, C); "
                f"got {X.ndim}-D shape {X.shape}."
            )
        X = list(X)
    if not isinstance(X, Sequence):
        try:
            X = list(X)
        except TypeError:
            raise TypeError(
                "X must be an array of images or a sequence of file paths, PIL images or arrays; "
                f"got {type(X).__name__}."
            ) from None
    if len(X) == 0:
        raise ValueError("X is empty: at least one image is required.")

    items, sizes, found, failed = [], [], set(), {}
    for index, item in enumerate(X):
        try:
            image, size, n_channels = _check_item(item, index, bit_depth)
        except (ValueError, TypeError) as error:
            if not skip_errors:
                raise
            failed[index] = str(error)
            image, size, n_channels = None, None, None
        items.append(image)
        sizes.append(size)
        found.add(n_channels)
    if channels is None:
        channels = 3 if 3 in found else 1
    return ImageSet(items=items, sizes=sizes, n_channels=channels, failed=failed, bit_depth=bit_depth)


def _check_item(item, index: int, bit_depth: int):
    """Validate one item of ``X``: (image to keep, (height, width) upright, channels)."""
    where = _describe(item, index)
    if isinstance(item, (str, os.PathLike)):
        image = open_image(item, index)
        found = upright_size(image), channels_of_mode(image.mode)
        image.close()
        return item, *found
    if isinstance(item, Image.Image):
        _check_mode(item.mode, where)
        return item, upright_size(item), channels_of_mode(item.mode)
    if isinstance(item, np.ndarray):
        image = _array_image(item, where, bit_depth)
        if isinstance(image, Image.Image):
            return image, (image.height, image.width), channels_of_mode(image.mode)
        return image, image.shape[:2], image.shape[2]
    raise TypeError(f"{where}: expected a file path, a PIL image or an array; got {type(item).__name__}.")


def image_paths_in(folder, *, recursive: bool = False) -> list[Path]:
    """Sorted image files (by extension) in ``folder``."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    # "._name" files are macOS resource forks, not images.
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("._")
    )
