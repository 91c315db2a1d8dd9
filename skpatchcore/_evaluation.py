"""Evaluating a fitted model on image files: pixel metrics over each image's own pixels, and scorers.

The public face is :mod:`skpatchcore.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ._auroc import _check_max_fpr, aupro, image_auroc, pixel_auroc
from .datasets import _image_size, _read_mask
from .utils._geometry import Geometry


def image_auroc_scorer(estimator, X, y) -> float:
    """Image AUROC of a fitted outlier detector, as a ``GridSearchCV`` scorer.

    Calls ``estimator.decision_function(X)`` (higher = more normal, as in
    scikit-learn) and negates it into anomaly scores for :func:`image_auroc`.

    Parameters
    ----------
    estimator : estimator object
        A fitted estimator with a ``decision_function`` method.
    X : array-like or list of image paths
        Images to score.
    y : array-like of shape (n_images,)
        ``+1`` for good images, ``-1`` for defective ones.

    Returns
    -------
    float
        The image AUROC, higher is better.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> from skpatchcore.metrics import image_auroc_scorer
    >>> search = GridSearchCV(..., param_grid=..., scoring=image_auroc_scorer)  # doctest: +SKIP
    """
    return image_auroc(y, -np.asarray(estimator.decision_function(X), dtype=np.float64))


_PIXEL_METRICS = ("aupro", "pixel_auroc")


def pixel_metrics(estimator, image_paths, mask_paths, *, maps=None, max_fpr: float = 0.3) -> dict:
    """Pixel AUROC and AUPRO of a fitted model over the images' own pixels.

    Each heat map (at the model input size) is taken back to its image's
    original size by the inverse of the model's *fitted* geometry
    (``geometry_`` of the feature step: resize, crop or letterbox), and
    compared with the image's mask as it is on disk. So letterbox padding,
    which is no pixel of the image, is not counted at all; pixels that a
    crop cut away are the image's own and are counted, as pixels the model
    never flags (each scores below every inspected pixel): a defect outside
    the crop is missed, not forgiven.

    Parameters
    ----------
    estimator : fitted PatchCorePipeline, or estimator with ``predict_map`` and ``geometry_``
        The model. For a pipeline, the geometry is its ``"features"`` step's.
    image_paths : sequence of str or path-like
        The test images, as files (their original sizes come from their
        headers, as shown upright).
    mask_paths : sequence of str, path-like or None
        The mask file of each image (same size as the image), or None for a
        good image.
    maps : ndarray of shape (n_images, H, W), default=None
        The model's maps of these images, if already computed
        (``estimator.predict_map(image_paths)`` otherwise).
    max_fpr : float, default=0.3
        Integration limit of the AUPRO.

    Returns
    -------
    dict
        ``pixel_auroc``, ``aupro``; ``n_pixels`` and ``n_defective_pixels``
        (over all images, at their original sizes); ``n_pixels_not_inspected``
        and ``n_defective_pixels_not_inspected`` (cut away by a crop).

    See Also
    --------
    pixel_auroc, aupro : the metrics on maps and masks you bring yourself.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec_category
    >>> from skpatchcore.metrics import pixel_metrics
    >>> data = load_mvtec_category("mpdd/metal_plate")  # doctest: +SKIP
    >>> pixel_metrics(model, data.test_paths, data.test_mask_paths)["aupro"]  # doctest: +SKIP
    0.95
    """
    max_fpr = _check_max_fpr(max_fpr)
    masks, heats, inspected = _on_original_images(estimator, image_paths, mask_paths, maps)
    not_inspected = sum(int(np.count_nonzero(~seen)) for seen in inspected)
    return {
        "pixel_auroc": pixel_auroc(masks, heats, inspected=inspected),
        "aupro": aupro(masks, heats, max_fpr, inspected=inspected),
        "n_pixels": sum(mask.size for mask in masks),
        "n_defective_pixels": sum(int(np.count_nonzero(mask)) for mask in masks),
        "n_pixels_not_inspected": not_inspected,
        "n_defective_pixels_not_inspected": sum(
            int(np.count_nonzero(mask & ~seen)) for mask, seen in zip(masks, inspected)
        ),
    }


def _on_original_images(estimator, image_paths, mask_paths, maps):
    """Masks, heat maps and inspected regions of each image at its original size."""
    geometry = _fitted_geometry(estimator)
    image_paths, mask_paths = list(image_paths), list(mask_paths)
    if len(mask_paths) != len(image_paths):
        raise ValueError(
            "'mask_paths' must hold one entry (a mask path or None) per image of 'image_paths'; got "
            f"{len(mask_paths)} for {len(image_paths)} images."
        )
    if maps is None:
        maps = estimator.predict_map(image_paths)
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) != len(image_paths):
        raise ValueError(
            f"The maps must be an (n_images, H, W) array with one map per image; got shape {maps.shape} "
            f"for {len(image_paths)} images."
        )
    masks, heats, inspected = [], [], []
    for image_path, mask_path, anomaly_map in zip(image_paths, mask_paths, maps):
        size = _image_size(image_path, "image")
        expected = geometry.output_size(*size)
        if anomaly_map.shape != tuple(expected):
            raise ValueError(
                f"The map of {os.fspath(image_path)!r} has shape {anomaly_map.shape}, but the model's "
                f"fitted geometry ({_describe_geometry(geometry)}) brings that {size[0]}x{size[1]} image "
                f"to {expected[0]}x{expected[1]}; the maps must be at the model input size."
            )
        heat, seen = geometry.to_original(anomaly_map, size)
        if mask_path is None:
            mask = np.zeros(size, dtype=bool)
        else:
            mask = np.asarray(_read_mask(mask_path)) > 0
            if mask.shape != tuple(size):
                raise ValueError(
                    f"The mask {os.fspath(mask_path)!r} is {mask.shape[0]}x{mask.shape[1]} but its image "
                    f"{os.fspath(image_path)!r} is {size[0]}x{size[1]} (height x width)."
                )
        masks.append(mask)
        heats.append(heat)
        inspected.append(seen)
    return masks, heats, inspected


def _describe_geometry(geometry: Geometry) -> str:
    return (
        f"image_size={geometry.image_size!r}, crop_size={geometry.crop_size!r}, "
        f"resize_side={geometry.resize_side!r}"
    )


class _PixelScorer:
    """Callable ``scorer(estimator, X, y)`` built by :func:`make_pixel_scorer`.

    A class rather than a closure so that it pickles (``n_jobs > 1``).
    """

    def __init__(self, mask_paths: dict, metric: str, max_fpr: float):
        self.mask_paths = mask_paths
        self.metric = metric
        self.max_fpr = max_fpr

    def __repr__(self) -> str:
        return f"make_pixel_scorer(<{len(self.mask_paths)} images>, metric={self.metric!r})"

    def __call__(self, estimator, X, y=None) -> float:
        image_paths = [os.fspath(path) for path in X]
        missing = [path for path in image_paths if path not in self.mask_paths]
        if missing:
            raise ValueError(
                f"The pixel scorer's 'mask_paths' has no entry for {len(missing)} image(s) of X, "
                f"e.g. {missing[0]!r}; map every image path to its mask path, or to None for a good image."
            )
        mask_paths = [self.mask_paths[path] for path in image_paths]
        masks, heats, inspected = _on_original_images(estimator, image_paths, mask_paths, None)
        if self.metric == "aupro":
            return aupro(masks, heats, max_fpr=self.max_fpr, inspected=inspected)
        return pixel_auroc(masks, heats, inspected=inspected)


def _fitted_geometry(estimator) -> Geometry:
    """The fitted ``geometry_`` of an estimator or of its "features" step."""
    source = estimator
    named_steps = getattr(estimator, "named_steps", None)
    if named_steps is not None:
        if "features" not in named_steps:
            raise ValueError(
                "The pixel metrics need the pipeline's feature step to be named 'features' (they read "
                f"its fitted geometry_); the pipeline has steps {list(named_steps)}."
            )
        source = named_steps["features"]
    geometry = getattr(source, "geometry_", None)
    if not isinstance(geometry, Geometry):
        raise ValueError(
            "The pixel metrics read the fitted model's input geometry from its 'geometry_' attribute "
            f"(a fitted PatchFeatureTransformer's); {type(source).__name__} has none: fit it first."
        )
    return geometry


def make_pixel_scorer(mask_paths: Mapping, metric: str = "pixel_auroc", *, max_fpr: float = 0.3):
    """Make a pixel-level scorer for ``GridSearchCV`` from ground-truth mask files.

    The scorer ``scorer(estimator, X, y)`` takes ``X`` as a list of image
    paths, calls ``estimator.predict_map(X)`` (anomaly maps of shape
    ``(n_images, h, w)`` at the model input size) and scores them over the
    images' own pixels, as :func:`pixel_metrics` does: each map is taken back
    to its image's original size by the inverse of the model's fitted
    geometry (``geometry_`` of ``estimator.named_steps["features"]`` for a
    pipeline, else of the estimator) and compared with the mask file as it
    is. Letterbox padding is not counted; pixels cut away by a crop count as
    never flagged. ``y`` is ignored.

    Parameters
    ----------
    mask_paths : mapping of str to str or None
        Image path -> path of its mask, or None for a good image (its mask is
        all zeros). Every path in ``X`` must be a key; paths are compared as
        strings, so use the same spelling as in ``X``.
    metric : {"pixel_auroc", "aupro"}, default="pixel_auroc"
        The metric computed: :func:`pixel_auroc` or :func:`aupro`.
    max_fpr : float, default=0.3
        Integration limit of :func:`aupro`; ignored for "pixel_auroc".

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y) -> float``, higher is better.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec_category
    >>> from skpatchcore.metrics import make_pixel_scorer
    >>> data = load_mvtec_category("mvtec/bottle")  # doctest: +SKIP
    >>> scorer = make_pixel_scorer(data.mask_paths_by_image, metric="aupro")  # doctest: +SKIP
    >>> scorer(fitted_detector, data.test_paths, data.test_labels)  # doctest: +SKIP
    0.93
    """
    if metric not in _PIXEL_METRICS:
        raise ValueError(f"The 'metric' parameter must be one of {sorted(_PIXEL_METRICS)}; got {metric!r}.")
    if not isinstance(mask_paths, Mapping):
        raise TypeError(
            "The 'mask_paths' parameter must be a mapping {image path: mask path or None}; "
            f"got {type(mask_paths).__name__}."
        )
    max_fpr = _check_max_fpr(max_fpr)
    normalised = {
        os.fspath(image): (None if mask is None else os.fspath(mask)) for image, mask in mask_paths.items()
    }
    return _PixelScorer(normalised, metric, max_fpr)
