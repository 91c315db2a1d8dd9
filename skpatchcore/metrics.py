"""Evaluation metrics for anomaly detection and localisation.

Three metrics, as in the PatchCore and MVTec AD papers:

- :func:`image_auroc`: image-level AUROC of anomaly scores against good /
  defective labels;
- :func:`pixel_auroc`: AUROC over every pixel of every test image;
- :func:`aupro`: area under the per-region overlap (PRO) curve up to a false
  positive rate of 0.3, normalised to ``[0, 1]``.

All three take *anomaly* scores (higher = more anomalous). Labels follow
scikit-learn's outlier convention: ``+1`` is good (an inlier), ``-1`` is
defective (an outlier).

For model selection, :data:`image_auroc_scorer` and :func:`make_pixel_scorer`
give ``scorer(estimator, X, y)`` callables accepted by the ``scoring``
parameter of :class:`~sklearn.model_selection.GridSearchCV`.

The pixel metrics never build the ``(n_pixels,)`` index arrays that a general
ROC routine needs: they split the scores into defect-free and defective
pixels, sort each part once and count with binary searches, so a whole test
set (tens of millions of pixels) costs about one extra copy of its maps.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from skpatchcore.datasets import load_masks
from skpatchcore.utils._images import LEGACY_RESIZE_SIDE

__all__ = [
    "aupro",
    "image_auroc",
    "image_auroc_scorer",
    "make_pixel_scorer",
    "pixel_auroc",
]

# 8-connectivity: pixels touching by a corner belong to the same defect region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Positive scores are counted against the sorted negatives in chunks of this
# many, so the int64 search results stay small whatever the test set size.
_SEARCH_CHUNK = 1 << 20


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _as_float_scores(values, name: str) -> np.ndarray:
    """Return ``values`` as a floating array (no copy when already floating)."""
    array = np.asarray(values)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"'{name}' must hold real numbers; got an array of dtype {array.dtype}.")
    if not np.issubdtype(array.dtype, np.floating):
        # Integers convert exactly to float64 (up to 2**53), so no new ties appear.
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"'{name}' contains NaN or infinite values; all scores must be finite.")
    return array


def _check_binary_masks(masks) -> np.ndarray:
    """Return ``masks`` as a bool array; accept bool, 0/1 or 0/255 values."""
    masks = np.asarray(masks)
    if masks.dtype == np.bool_:
        return masks
    if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
        raise ValueError(
            f"'masks' must be binary (bool, 0/1 or 0/255 values); got an array of dtype {masks.dtype}."
        )
    if masks.size == 0:
        return masks.astype(bool)
    top = masks.max()
    on_value = 255 if top > 1 else 1
    defective = masks == on_value
    valid = defective | (masks == 0)
    if not valid.all():
        bad = masks[~valid].flat[0].item()
        raise ValueError(
            "'masks' must be binary: bool, 0/1 or 0/255 values (not a mix of 1 and 255); "
            f"got the value {bad!r} (values found between {masks.min().item()!r} and {top.item()!r})."
        )
    return defective


def _check_max_fpr(max_fpr) -> float:
    if not isinstance(max_fpr, numbers.Real) or isinstance(max_fpr, bool) or not 0.0 < float(max_fpr) <= 1.0:
        raise ValueError(f"The 'max_fpr' parameter must be a float in (0, 1]; got {max_fpr!r}.")
    return float(max_fpr)


def _check_masks_and_maps(masks, anomaly_maps) -> tuple[np.ndarray, np.ndarray]:
    masks = _check_binary_masks(masks)
    anomaly_maps = _as_float_scores(anomaly_maps, "anomaly_maps")
    if masks.ndim != 3:
        raise ValueError(
            f"'masks' must be a 3-D array of shape (n_images, height, width); got shape {masks.shape}."
        )
    if anomaly_maps.shape != masks.shape:
        raise ValueError(
            "'anomaly_maps' must have the same shape as 'masks' (n_images, height, width); "
            f"got anomaly_maps {anomaly_maps.shape} and masks {masks.shape}."
        )
    return masks, anomaly_maps


def _auroc_from_split(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Mann-Whitney AUROC: P(positive > negative) + P(positive == negative) / 2.

    ``negatives`` is sorted in place (pass a copy you own).
    """
    negatives.sort()
    # For each positive score s, ``left`` counts negatives < s and ``right``
    # counts negatives <= s, so left + right = 2 * (#below + #tied / 2).
    doubled_wins = 0
    for start in range(0, positives.size, _SEARCH_CHUNK):
        chunk = positives[start : start + _SEARCH_CHUNK]
        doubled_wins += int(np.searchsorted(negatives, chunk, side="left").sum())
        doubled_wins += int(np.searchsorted(negatives, chunk, side="right").sum())
    return doubled_wins / (2.0 * positives.size * negatives.size)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def image_auroc(y_true, anomaly_scores) -> float:
    """Image-level area under the ROC curve.

    The defective images (label ``-1``) are the positive class, so a
    detector that gives every defective image a higher anomaly score than
    every good image scores 1.0, and random scores score about 0.5. Tied
    scores count one half, as in :func:`sklearn.metrics.roc_auc_score`.

    Parameters
    ----------
    y_true : array-like of shape (n_images,)
        Ground truth in scikit-learn's outlier convention: ``+1`` for a good
        image, ``-1`` for a defective one. Both must be present.
    anomaly_scores : array-like of shape (n_images,)
        Anomaly score of each image, higher = more anomalous (e.g. the
        negated ``decision_function`` of a detector).

    Returns
    -------
    float
        The AUROC, in ``[0, 1]``.

    See Also
    --------
    pixel_auroc : the same at pixel level.
    image_auroc_scorer : this metric as a scorer for ``GridSearchCV``.

    Examples
    --------
    >>> from skpatchcore.metrics import image_auroc
    >>> image_auroc([1, 1, -1, -1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y_true = np.asarray(y_true)
    anomaly_scores = _as_float_scores(anomaly_scores, "anomaly_scores")
    if y_true.ndim != 1 or anomaly_scores.ndim != 1:
        raise ValueError(
            "'y_true' and 'anomaly_scores' must be 1-D arrays of shape (n_images,); "
            f"got shapes {y_true.shape} and {anomaly_scores.shape}."
        )
    if y_true.shape != anomaly_scores.shape:
        raise ValueError(
            "'y_true' and 'anomaly_scores' must have the same length; "
            f"got {y_true.shape[0]} labels and {anomaly_scores.shape[0]} scores."
        )
    labels = set(np.unique(y_true).tolist()) if y_true.size else set()
    if not labels <= {-1, 1}:
        unexpected = sorted(labels - {-1, 1}, key=repr)
        raise ValueError(
            "'y_true' must only hold +1 (good) and -1 (defective), scikit-learn's outlier labels; "
            f"got {unexpected}."
        )
    if labels != {-1, 1}:
        raise ValueError(
            "'y_true' must contain both good (+1) and defective (-1) images for an AUROC; "
            f"got only {sorted(labels)}."
        )
    defective = y_true == -1
    return _auroc_from_split(anomaly_scores[defective], anomaly_scores[~defective].copy())


def pixel_auroc(masks, anomaly_maps) -> float:
    """Pixel-level area under the ROC curve, over all pixels of all images.

    Every pixel of every image is one sample: defective pixels (mask on)
    are the positive class, scored by the anomaly map. The result equals
    ``sklearn.metrics.roc_auc_score(masks.ravel(), anomaly_maps.ravel())``
    but is computed with sorting and binary searches only, so its extra
    memory is about one copy of the defect-free pixels' scores.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth defect masks: bool, or 0/1, or 0/255 values. Good images
        have all-zero masks.
    anomaly_maps : array-like of shape (n_images, height, width)
        Anomaly score of each pixel, higher = more anomalous; same shape as
        ``masks``.

    Returns
    -------
    float
        The AUROC, in ``[0, 1]``.

    See Also
    --------
    aupro : a localisation metric that weighs small defects like large ones.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pixel_auroc
    >>> masks = np.zeros((1, 2, 2), dtype=bool)
    >>> masks[0, 0, 0] = True
    >>> maps = np.array([[[0.9, 0.2], [0.5, 0.95]]])
    >>> round(pixel_auroc(masks, maps), 4)
    0.6667
    """
    masks, anomaly_maps = _check_masks_and_maps(masks, anomaly_maps)
    n_defective = int(np.count_nonzero(masks))
    if n_defective == 0 or n_defective == masks.size:
        raise ValueError(
            "'masks' must contain both defective and defect-free pixels for a pixel AUROC; "
            f"got {n_defective} defective pixels out of {masks.size}."
        )
    # Boolean indexing copies, so sorting the negatives in place is safe.
    return _auroc_from_split(anomaly_maps[masks], anomaly_maps[~masks])


def aupro(masks, anomaly_maps, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region overlap (PRO) curve.

    Definition. The defect regions are the 8-connected components of each
    ground-truth mask (``scipy.ndimage.label`` with a full 3 x 3 structure),
    taken over all images; let there be :math:`R` of them. A threshold
    :math:`t` flags every pixel whose score is ``>= t``. At :math:`t`,

    - the false positive rate :math:`\\mathrm{FPR}(t)` is the fraction of all
      defect-free pixels of the whole test set that are flagged;
    - the per-region overlap :math:`\\mathrm{PRO}(t)` is the mean, over the
      :math:`R` regions, of the fraction of the region's pixels that are
      flagged (every region counts equally, whatever its size).

    The curve has one point per distinct score (tied scores form one
    threshold step), ordered by decreasing threshold, and starts at
    :math:`(0, 0)` (nothing flagged). Its area is taken with the trapezoidal
    rule from FPR 0 up to ``max_fpr``; the segment that crosses ``max_fpr``
    is linearly interpolated there. The area is divided by ``max_fpr``, so a
    perfect map scores 1.0 and a constant map scores ``max_fpr / 2``.

    Computation. The scores are sorted once (defect-free and defective
    pixels separately); cumulative sums and binary searches then give FPR
    and PRO at every distinct threshold, so the result is exact, not an
    approximation on a threshold grid. Thresholds at which only defective
    pixels change make vertical steps of zero area, so only the FPR steps
    are summed, in chunks: the extra memory is about one copy of the
    defect-free pixels' scores.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width)
        Ground-truth defect masks: bool, or 0/1, or 0/255 values. Good images
        have all-zero masks.
    anomaly_maps : array-like of shape (n_images, height, width)
        Anomaly score of each pixel, higher = more anomalous; same shape as
        ``masks``.
    max_fpr : float, default=0.3
        Upper end of the integration range, in ``(0, 1]``.

    Returns
    -------
    float
        The normalised AUPRO, in ``[0, 1]``.

    See Also
    --------
    pixel_auroc : pixel-level AUROC, dominated by large defects.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import aupro
    >>> masks = np.zeros((1, 4, 4), dtype=bool)
    >>> masks[0, :2, :2] = True
    >>> aupro(masks, masks.astype(float))
    1.0
    >>> aupro(masks, np.zeros((1, 4, 4)), max_fpr=0.3)
    0.15
    """
    max_fpr = _check_max_fpr(max_fpr)
    masks, anomaly_maps = _check_masks_and_maps(masks, anomaly_maps)

    # Defective pixels: their scores and the size of the region each belongs to.
    region_scores, region_sizes_per_pixel = [], []
    n_regions = 0
    for mask, scores in zip(masks, anomaly_maps):
        if not mask.any():
            continue
        labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        pixel_labels = labels[mask]
        sizes = np.bincount(pixel_labels)
        region_scores.append(scores[mask])
        region_sizes_per_pixel.append(sizes[pixel_labels])
        n_regions += count
    n_negatives = masks.size - sum(part.size for part in region_scores)
    if n_regions == 0:
        raise ValueError("'masks' has no defective pixel, so there is no defect region for the AUPRO.")
    if n_negatives == 0:
        raise ValueError("'masks' has no defect-free pixel, so the false positive rate is undefined.")

    # Each defective pixel adds 1 / (R * size of its region) to PRO once flagged.
    positives = np.concatenate(region_scores)
    weights = 1.0 / (n_regions * np.concatenate(region_sizes_per_pixel).astype(np.float64))
    order = np.argsort(positives)
    positives_asc = positives[order]
    # pro_by_count[k] = PRO once the k highest-scoring defective pixels are flagged.
    pro_by_count = np.concatenate([[0.0], np.cumsum(weights[order][::-1])])
    del region_scores, region_sizes_per_pixel, weights, order

    def pro_flagging(values, side):
        """PRO when pixels scoring > value (side="right") or >= value (side="left") are flagged."""
        return pro_by_count[positives_asc.size - np.searchsorted(positives_asc, values, side=side)]

    negatives = anomaly_maps[~masks]
    negatives.sort()
    # At each distinct defect-free score v the curve steps from (FPR(> v), PRO(> v))
    # to (FPR(>= v), PRO(>= v)); the steps in between, where only PRO moves, are
    # vertical and add no area. A step over c tied defect-free pixels has area
    # c / n * (PRO(> v) + PRO(>= v)) / 2, so each defect-free pixel contributes
    # (PRO(> v) + PRO(>= v)) / (2 n) and no grouping of ties is needed.
    #
    # `cutoff` is the score of the step that takes the FPR past max_fpr: the
    # n_crossing-th highest, where n_crossing is the smallest count of flagged
    # defect-free pixels with n_crossing / n > max_fpr (compared in floating
    # point, as a direct sweep would). Every higher score's step lies within max_fpr.
    n_crossing = int(max_fpr * n_negatives) + 1
    while n_crossing > 1 and (n_crossing - 1) / n_negatives > max_fpr:
        n_crossing -= 1
    while n_crossing <= n_negatives and n_crossing / n_negatives <= max_fpr:
        n_crossing += 1
    cutoff = negatives[n_negatives - min(n_crossing, n_negatives)]
    first_above = int(np.searchsorted(negatives, cutoff, side="right"))
    first_at = int(np.searchsorted(negatives, cutoff, side="left"))

    area = 0.0
    for start in range(first_above, n_negatives, _SEARCH_CHUNK):
        chunk = negatives[start : start + _SEARCH_CHUNK]
        area += float(np.sum(pro_flagging(chunk, "right")) + np.sum(pro_flagging(chunk, "left")))
    area /= 2.0 * n_negatives
    # The step at `cutoff`, cut at max_fpr by linear interpolation when it crosses it.
    x0, x1 = (n_negatives - first_above) / n_negatives, (n_negatives - first_at) / n_negatives
    y0, y1 = float(pro_flagging(cutoff, "right")), float(pro_flagging(cutoff, "left"))
    x_end = min(x1, max_fpr)
    y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
    area += (x_end - x0) * (y0 + y_end) / 2.0
    return area / max_fpr


# --------------------------------------------------------------------------
# Scorers for model selection
# --------------------------------------------------------------------------


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
        image_size, crop_size, resize_side = _geometry_of(estimator)
        masks = load_masks(
            [self.mask_paths[path] for path in image_paths],
            image_paths,
            image_size=image_size,
            crop_size=crop_size,
            resize_side=resize_side,
        )
        maps = np.asarray(estimator.predict_map(X))
        if maps.shape != masks.shape:
            raise ValueError(
                f"estimator.predict_map(X) returned maps of shape {maps.shape}, but the masks at the "
                f"estimator's geometry (image_size={image_size!r}, crop_size={crop_size!r}) have shape "
                f"{masks.shape}; the maps must be at the model input size."
            )
        if self.metric == "aupro":
            return aupro(masks, maps, max_fpr=self.max_fpr)
        return pixel_auroc(masks, maps)


def _geometry_of(estimator):
    """``(image_size, crop_size, resize_side)`` of an estimator or of its "features" step."""
    source = estimator
    named_steps = getattr(estimator, "named_steps", None)
    if named_steps is not None:
        if "features" not in named_steps:
            raise ValueError(
                "The pixel scorer needs the pipeline's feature step to be named 'features' (it reads "
                f"its image_size and crop_size); the pipeline has steps {list(named_steps)}."
            )
        source = named_steps["features"]
    if not (hasattr(source, "image_size") and hasattr(source, "crop_size")):
        raise ValueError(
            f"The pixel scorer reads 'image_size' and 'crop_size' from the estimator; "
            f"{type(source).__name__} has no such attributes."
        )
    return source.image_size, source.crop_size, getattr(source, "resize_side", LEGACY_RESIZE_SIDE)


def make_pixel_scorer(mask_paths: Mapping, metric: str = "pixel_auroc", *, max_fpr: float = 0.3):
    """Make a pixel-level scorer for ``GridSearchCV`` from ground-truth mask files.

    The scorer ``scorer(estimator, X, y)`` takes ``X`` as a list of image
    paths, calls ``estimator.predict_map(X)`` (anomaly maps of shape
    ``(n_images, h, w)`` at the model input size) and compares them with the
    masks of those images, loaded with the estimator's own geometry (see
    :func:`skpatchcore.datasets.load_masks`). ``y`` is ignored.

    The geometry (``image_size``, ``crop_size``, ``resize_side``) is read from
    ``estimator.named_steps["features"]`` when the estimator is a pipeline,
    otherwise from the estimator's own attributes, so that masks are always
    resized and cropped exactly like the images the maps come from.

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
