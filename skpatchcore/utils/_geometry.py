"""The model's input geometry: resize, centre crop or letterbox, and their inverse.

:class:`Geometry` follows torchvision's ``Resize`` + ``CenterCrop`` on PIL
images exactly (PIL bilinear resampling, Python ``round`` for the crop offset,
zero padding when the crop is larger than the image), because that is what
the PatchCore reference code feeds its backbone; it also letterboxes into a
rectangular box (``resize_side="fit"``), whose shape :func:`fitted_box`
chooses from the training images. :meth:`Geometry.to_original` takes a map
back onto its original image. NumPy and PIL only, like the image reader.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from PIL import Image


def check_size(value, name: str, allow_none: bool) -> int | tuple[int, int] | None:
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


RESIZE_SIDES = ("shorter", "longer", "fit")
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
    resize_side : {"shorter", "longer", "fit"}
        Which side an int ``image_size`` sets. ``"shorter"`` (torchvision's
        ``Resize``) fills the crop and may cut off the ends of a long part;
        ``"longer"`` fits the whole image inside ``image_size`` x
        ``image_size``, so with ``crop_size=image_size`` it is letterboxed:
        nothing is cut away and the short side is padded. Ignored when
        ``image_size`` is a pair or None. ``"fit"`` letterboxes into
        ``crop_size`` itself, which may be a rectangle: the image is scaled,
        aspect kept, to the largest size inside it, then padded to it
        (``image_size`` is then ignored and must be None).
    """

    image_size: int | tuple[int, int] | None = 256
    crop_size: int | tuple[int, int] | None = 224
    # A class-level default also serves Geometry objects pickled before this field existed.
    resize_side: str = LEGACY_RESIZE_SIDE

    def __post_init__(self):
        object.__setattr__(self, "image_size", check_size(self.image_size, "image_size", True))
        object.__setattr__(self, "crop_size", check_size(self.crop_size, "crop_size", True))
        if self.resize_side not in RESIZE_SIDES:
            raise ValueError(
                f"The 'resize_side' parameter must be one of {list(RESIZE_SIDES)}; got {self.resize_side!r}."
            )
        if self.resize_side == "fit" and (self.crop_size is None or self.image_size is not None):
            raise ValueError(
                "resize_side='fit' letterboxes each image into crop_size: it needs a crop_size and "
                f"image_size=None; got image_size={self.image_size!r}, crop_size={self.crop_size!r}."
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(h, w)`` after the resize step, for an input of ``(height, width)``."""
        if self.resize_side == "fit":
            box_h, box_w = _pair(self.crop_size)
            # The largest size inside the box with the image's aspect ratio; the
            # shorter side is truncated, as resize_side="longer" does in a square box.
            if width * box_h >= height * box_w:
                return max(1, int(box_w * height / width)), box_w
            return box_h, max(1, int(box_h * width / height))
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

    def to_original(self, anomaly_map: np.ndarray, original_size: tuple[int, int]):
        """Bring a map at the model input size back onto the original image.

        The inverse of this geometry: the map is placed where the centre crop
        took it from in the resized image (letterbox padding falls away), the
        border a crop cut away is filled by extending the map's edge (so the
        resize below does not smear zeros inwards) and flagged as not
        inspected, and the resized frame is resized back to ``original_size``
        (bilinear).

        Parameters
        ----------
        anomaly_map : ndarray of shape (H, W)
            A map at the model input size, e.g. one of ``predict_map``'s maps.
        original_size : (int, int)
            ``(height, width)`` of the original image (as shown upright).

        Returns
        -------
        heat : ndarray of shape original_size, float32
            The map at the original size; outside ``inspected`` it only
            repeats the nearest inspected value.
        inspected : ndarray of shape original_size, bool
            True where the model saw the image, False on the cut-away border.
        """
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
        height, width = int(original_size[0]), int(original_size[1])
        resized = self.resized_size(height, width)
        expected = self.output_size(height, width)
        if anomaly_map.shape != tuple(expected):
            raise ValueError(
                f"An image of {height}x{width} pixels reaches the model as {expected[0]}x{expected[1]} "
                f"(image_size={self.image_size!r}, crop_size={self.crop_size!r}), but the map is "
                f"{anomaly_map.shape[0]}x{anomaly_map.shape[1]}."
            )
        if self.crop_size is None:
            frame, inspected = anomaly_map, np.ones(resized, dtype=bool)
        else:
            top, left = self._crop_offsets(resized)
            rows = np.arange(resized[0]) - top
            cols = np.arange(resized[1]) - left
            inside_rows = (rows >= 0) & (rows < anomaly_map.shape[0])
            inside_cols = (cols >= 0) & (cols < anomaly_map.shape[1])
            frame = anomaly_map[np.clip(rows, 0, anomaly_map.shape[0] - 1)][
                :, np.clip(cols, 0, anomaly_map.shape[1] - 1)
            ]
            inspected = inside_rows[:, None] & inside_cols[None, :]
        if resized == (height, width):
            return np.ascontiguousarray(frame, dtype=np.float32), inspected
        heat = _resize_float(frame, (height, width))
        # The inspected region goes through the same bilinear resize as a mask
        # through the forward geometry, then is binarised at one half.
        inspected = _resize_float(inspected.astype(np.float32), (height, width)) >= 0.5
        return heat, inspected

    def _crop_offsets(self, resized: tuple[int, int]) -> tuple[int, int]:
        """Row and column of the crop's top-left corner in the resized frame.

        Mirrors the forward centre crop: torchvision pads a too-small image with
        zeros (the smaller half on the top/left) and then takes the centre, so
        the offset is negative when the crop is larger than the resized image.
        """
        crop_h, crop_w = _pair(self.crop_size)
        offsets = []
        for length, crop_length in zip(resized, (crop_h, crop_w)):
            pad = max(crop_length - length, 0)
            padded = length + pad
            offsets.append(int(round((padded - crop_length) / 2.0)) - pad // 2)
        return offsets[0], offsets[1]


def _resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def fitted_box(sizes, image_size: int, multiple: int = 16) -> tuple[int, int]:
    """A letterbox of about ``image_size**2`` pixels shaped like the images of ``sizes``.

    Its aspect ratio is the median of the images' (over their logarithms,
    so that 1:2 and 2:1 weigh alike); each side is rounded to a multiple of
    ``multiple`` pixels (at least one multiple), so that the feature grids of
    stride-8 and stride-16 stages line up. Images of one shape get a box of
    their shape (320 x 320 for squares at ``image_size=320``); images whose
    shapes vary get the typical shape, and the others are padded into it.
    """
    if not sizes:
        raise ValueError("fitted_box needs the size of at least one image.")
    log_aspect = float(np.median([np.log(width / height) for height, width in sizes]))
    scale = float(np.exp(log_aspect / 2.0))
    return tuple(
        max(multiple, int(round(side / multiple)) * multiple)
        for side in (image_size / scale, image_size * scale)
    )


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
