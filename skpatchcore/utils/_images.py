"""Reading images and bringing them to the model's input geometry.

Everything that turns user input (arrays, PIL images, file paths) into
float32 pixels in ``[0, 1]`` lives here, once, so that the feature
transformer, the dataset loaders and the command line agree on it.

The geometry follows torchvision's ``Resize`` + ``CenterCrop`` on PIL
images exactly (PIL bilinear resampling, Python ``round`` for the crop
offset, zero padding when the crop is larger than the image), because that
is what the PatchCore reference code feeds its backbone.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL modes we convert on read, and why: palettes, bilevel and colour spaces
# other than RGB carry no information that an RGB conversion loses for a CNN.
_CONVERT_TO_RGB = {"P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_CONVERT_TO_L = {"1"}
_ALPHA_MODES = {"RGBA", "LA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


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


def _check_size(value, name: str, allow_none: bool) -> int | tuple[int, int] | None:
    """Validate an ``image_size`` / ``crop_size`` value: int, (h, w) or None."""
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value >= 1:
            return int(value)
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    accepted = "a positive int, a (height, width) pair of positive ints"
    if allow_none:
        accepted += " or None"
    raise ValueError(f"The '{name}' parameter must be {accepted}; got {value!r}.")


RESIZE_SIDES = ("shorter", "longer")
# What an image_size int meant before resize_side existed: models, files and
# estimators that do not say otherwise resize the shorter side.
LEGACY_RESIZE_SIDE = "shorter"


@dataclass(frozen=True)
class Geometry:
    """Resize then centre-crop, as torchvision's ``Resize`` + ``CenterCrop``.

    Parameters
    ----------
    image_size : int, (int, int) or None
        An int resizes one side to that many pixels, keeping the aspect
        ratio (which side: ``resize_side``); a pair is an exact
        ``(height, width)``; None keeps the size.
    crop_size : int, (int, int) or None
        Size of the centre crop; None means no crop. A crop larger than the
        resized image pads it with zeros (black), centred.
    resize_side : {"shorter", "longer"}
        Which side an int ``image_size`` sets. ``"shorter"`` (torchvision's
        ``Resize``) fills the crop and may cut off the ends of a long part;
        ``"longer"`` fits the whole image inside ``image_size`` x
        ``image_size``, so with ``crop_size=image_size`` it is letterboxed:
        nothing is cut away and the short side is padded. Ignored when
        ``image_size`` is a pair or None.
    """

    image_size: int | tuple[int, int] | None = 256
    crop_size: int | tuple[int, int] | None = 224
    # A class-level default also serves Geometry objects pickled before this field existed.
    resize_side: str = LEGACY_RESIZE_SIDE

    def __post_init__(self):
        object.__setattr__(self, "image_size", _check_size(self.image_size, "image_size", True))
        object.__setattr__(self, "crop_size", _check_size(self.crop_size, "crop_size", True))
        if self.resize_side not in RESIZE_SIDES:
            raise ValueError(
                f"The 'resize_side' parameter must be 'shorter' or 'longer'; got {self.resize_side!r}."
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(h, w)`` after the resize step, for an input of ``(height, width)``."""
        size = self.image_size
        if size is None:
            return height, width
        if isinstance(size, tuple):
            return size
        # torchvision: the shorter side becomes `size`, the longer one is truncated.
        if self.resize_side == "shorter":
            if width <= height:
                return int(size * height / width), size
            return size, int(size * width / height)
        # The longer side becomes `size`; the shorter one is truncated, at least 1 pixel.
        if width >= height:
            return max(1, int(size * height / width)), size
        return size, max(1, int(size * width / height))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(h, w)`` of the model input for an image of ``(height, width)``."""
        if self.crop_size is None:
            return self.resized_size(height, width)
        if isinstance(self.crop_size, tuple):
            return self.crop_size
        return self.crop_size, self.crop_size

    def apply(self, image: Image.Image | np.ndarray, *, mask: bool = False) -> np.ndarray:
        """Resize and crop one image; return float32 ``(h, w, c)`` in ``[0, 1]``.

        ``image`` is a PIL image in mode "L" or "RGB", or a float array
        ``(H, W, C)`` in ``[0, 1]`` (resized channel by channel as PIL "F"
        images, so no rounding to 8 bits happens). With ``mask=True`` the
        result is binarised at 0.5 after the same bilinear resize, so masks
        follow exactly the geometry of their images; a mask must then be an
        "L" image with 0 for background and 255 for defect
        (:func:`skpatchcore.datasets.load_masks` converts other encodings).
        """
        if isinstance(image, np.ndarray):
            height, width = image.shape[:2]
            target = self.resized_size(height, width)
            if target != (height, width):
                channels = [
                    np.asarray(
                        Image.fromarray(np.ascontiguousarray(image[:, :, c])).resize(
                            (target[1], target[0]), Image.BILINEAR
                        ),
                        dtype=np.float32,
                    )
                    for c in range(image.shape[2])
                ]
                pixels = np.stack(channels, axis=-1)
            else:
                pixels = image.astype(np.float32, copy=False)
            pixels = _center_crop(pixels, self.crop_size)
        else:
            pixels = to_unit_float(self.apply_8bit(image))
        if mask:
            return (pixels >= 0.5).astype(np.float32)
        return pixels

    def apply_8bit(self, image: Image.Image) -> np.ndarray:
        """Resize and crop a PIL image, keeping its 8-bit values: uint8 ``(h, w, c)``.

        :func:`to_unit_float` of the result is exactly :meth:`apply`'s: the
        crop comes before the conversion, so only the kept pixels are
        converted, and a batch can be converted at once.
        """
        target = self.resized_size(image.height, image.width)
        if target != (image.height, image.width):
            image = image.resize((target[1], target[0]), Image.BILINEAR)
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return _center_crop(pixels, self.crop_size)


def to_unit_float(pixels):
    """8-bit values (array or tensor) to float32 in [0, 1]: ``value / 255``, correctly rounded."""
    if isinstance(pixels, np.ndarray):
        return np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    return pixels.float() / 255.0


def _center_crop(pixels: np.ndarray, crop_size) -> np.ndarray:
    if crop_size is None:
        return pixels
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    height, width = pixels.shape[:2]
    if crop_h > height or crop_w > width:
        # torchvision pads with zeros (left/top get the smaller half) and crops.
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        pixels = np.pad(
            pixels,
            ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)),
        )
        height, width = pixels.shape[:2]
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return pixels[top : top + crop_h, left : left + crop_w]


def open_image(path, index: int = 0) -> Image.Image:
    """Open an image file lazily (header only) and check it can be used.

    Returns a PIL image whose pixels are not decoded yet. Raises
    :class:`ImageReadError` naming the file for missing, unreadable,
    non-image, too large, 16-bit and alpha-channel files.
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
    if mode in _ALPHA_MODES:
        raise ImageReadError(
            f"{where}: has an alpha channel (mode {mode!r}); skpatchcore accepts "
            "grayscale or RGB images. Drop the alpha channel first, e.g. "
            "PIL.Image.open(path).convert('RGB')."
        )
    if mode in _HIGH_BIT_MODES:
        raise ImageReadError(
            f"{where}: is a {mode!r} (16/32-bit) image; skpatchcore accepts 8-bit "
            "grayscale or RGB images, or float arrays scaled to [0, 1]. Convert it "
            "first, e.g. np.asarray(img) / 65535.0 for 16-bit data."
        )
    if mode not in {"L", "RGB"} | _CONVERT_TO_RGB | _CONVERT_TO_L:
        raise ImageReadError(f"{where}: image mode {mode!r} is not supported; use grayscale or RGB.")


def channels_of_mode(mode: str) -> int:
    """Number of channels an image of this PIL mode has after :func:`decode`."""
    return 1 if mode in {"L"} | _CONVERT_TO_L else 3


def decode(image: Image.Image, index: int = 0, source=None) -> Image.Image:
    """Decode the pixels of an opened image into mode "L" or "RGB"."""
    where = _describe(source if source is not None else image, index)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        image.close()
        raise ImageReadError(f"{where}: refused, too many pixels ({exc}).") from None
    except (OSError, SyntaxError, ValueError) as exc:
        image.close()
        raise ImageReadError(f"{where}: cannot be decoded, the file may be truncated ({exc}).") from None
    if image.mode in _CONVERT_TO_RGB:
        return image.convert("RGB")
    if image.mode in _CONVERT_TO_L:
        return image.convert("L")
    return image


@dataclass
class ImageSet:
    """A validated, lazily decoded collection of images.

    Attributes
    ----------
    items : sequence
        The user's items: file paths, PIL images or per-image arrays.
    sizes : list of (int, int)
        ``(height, width)`` of every image, as read from headers or arrays.
    n_channels : int
        1 (grayscale) or 3 (RGB), the same for every image.
    """

    items: Sequence
    sizes: list
    n_channels: int
    failed: dict = field(default_factory=dict)  # position -> reason, with skip_errors

    def __len__(self) -> int:
        return len(self.items)

    @property
    def valid(self) -> list[int]:
        """Positions of the images that passed validation (all, unless errors are skipped)."""
        return [i for i in range(len(self.items)) if i not in self.failed]

    def load(self, index: int) -> Image.Image | np.ndarray:
        """Pixels of image ``index``: PIL "L"/"RGB", or float32 ``(H, W, C)``."""
        item = self.items[index]
        if isinstance(item, np.ndarray):
            return item
        if isinstance(item, Image.Image):
            return decode(item, index)
        return decode(open_image(item, index), index, source=item)


def _array_image(array: np.ndarray, where: str) -> Image.Image | np.ndarray:
    """Validate one image array.

    uint8 arrays become PIL images, so that they are resized exactly like the
    same picture read from a file; float arrays stay float32 ``(H, W, C)``.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(
            f"{where}: an image must be a 2-D (H, W) or 3-D (H, W, C) array; got shape {array.shape}."
        )
    channels = array.shape[2]
    if channels == 4:
        raise ValueError(f"{where}: has 4 channels (RGBA?); drop the alpha channel and pass RGB (H, W, 3).")
    if channels not in (1, 3):
        raise ValueError(f"{where}: has {channels} channels; accepted are 1 (grayscale) or 3 (RGB).")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{where}: has no pixels (shape {array.shape}).")
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0] if channels == 1 else array))
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{where}: integer dtype {array.dtype} is not accepted; pass uint8 (0-255) or float "
            "in [0, 1] (e.g. divide 16-bit data by 65535)."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{where}: dtype {array.dtype} is not accepted; pass uint8 or float in [0, 1].")
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


def check_images(X, *, expected_channels: int | None = None, skip_errors: bool = False) -> ImageSet:
    """Validate ``X`` as a batch of images without decoding files.

    Parameters
    ----------
    X : ndarray of shape (n, H, W) or (n, H, W, C), or sequence
        uint8 or float arrays in ``[0, 1]``; or a sequence whose items are file
        paths, PIL images or single-image arrays (sizes may differ).
    expected_channels : int, optional
        Channel count the model was fitted on; a mismatch is an error.
    skip_errors : bool, default=False
        Record a bad item in ``ImageSet.failed`` instead of raising (only
        errors of single items; an empty or malformed ``X`` still raises).

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
        if X.dtype == object:
            X = list(X)
        elif X.ndim not in (3, 4):
            raise ValueError(
                "X as an array must have shape (n_images, H, W) or (n_images, H, W, C); "
                f"got {X.ndim}-D shape {X.shape}."
            )
        else:
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

    items, sizes, channels, failed = [], [], [], {}
    for index, item in enumerate(X):
        try:
            image, size, n_channels = _check_item(item, index)
            if skip_errors and expected_channels is not None and n_channels != expected_channels:
                raise ImageReadError(
                    f"{_describe(item, index)}: has {n_channels} channel(s), the model was fitted on "
                    f"{expected_channels}."
                )
        except (ValueError, TypeError) as error:
            if not skip_errors:
                raise
            failed[index] = str(error)
            image, size, n_channels = None, None, None
        items.append(image)
        sizes.append(size)
        channels.append(n_channels)

    kinds = {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}
    distinct = sorted({c for c in channels if c is not None})
    if len(distinct) > 1:
        first_gray = channels.index(1)
        first_rgb = channels.index(3)
        raise ValueError(
            "X mixes grayscale and RGB images (e.g. "
            f"{_describe(X[first_gray], first_gray)} has 1 channel, "
            f"{_describe(X[first_rgb], first_rgb)} has 3); convert them to one kind first."
        )
    n_channels = distinct[0] if distinct else expected_channels
    if expected_channels is not None and n_channels != expected_channels:
        raise ValueError(
            f"X holds {kinds[n_channels]} images but the model was fitted on "
            f"{kinds[expected_channels]} images."
        )
    return ImageSet(items=items, sizes=sizes, n_channels=n_channels, failed=failed)


def _check_item(item, index: int):
    """Validate one item of ``X``: (image to keep, (height, width), channels)."""
    where = _describe(item, index)
    if isinstance(item, (str, os.PathLike)):
        image = open_image(item, index)
        found = (image.height, image.width), channels_of_mode(image.mode)
        image.close()
        return item, *found
    if isinstance(item, Image.Image):
        _check_mode(item.mode, where)
        return item, (item.height, item.width), channels_of_mode(item.mode)
    if isinstance(item, np.ndarray):
        image = _array_image(item, where)
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
