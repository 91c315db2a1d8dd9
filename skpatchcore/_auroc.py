"""Image AUROC, pixel AUROC and AUPRO on arrays of scores, labels and masks.

The public face, and how the pixel metrics keep their memory small, is
:mod:`skpatchcore.metrics`.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage

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


def _check_masks_and_maps(masks, anomaly_maps, inspected=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (defective pixels, scores): 2-D arrays of one shape.

    ``masks`` and ``anomaly_maps`` are (n, H, W) arrays or sequences of 2-D
    arrays whose sizes may differ between images. Where ``inspected`` is
    False, a pixel's score is replaced by one just below every inspected
    pixel's, so that no threshold flags it.
    """
    masks = _image_list(masks, "masks")
    anomaly_maps = _image_list(anomaly_maps, "anomaly_maps")
    if len(masks) != len(anomaly_maps):
        raise ValueError(
            f"'masks' and 'anomaly_maps' must hold one entry per image; got {len(masks)} masks and "
            f"{len(anomaly_maps)} maps."
        )
    masks = [_check_binary_masks(mask) for mask in masks]
    anomaly_maps = [_as_float_scores(scores, "anomaly_maps") for scores in anomaly_maps]
    for index, (mask, scores) in enumerate(zip(masks, anomaly_maps)):
        if mask.ndim != 2 or scores.shape != mask.shape:
            raise ValueError(
                "'anomaly_maps' must have the same shape as 'masks', image by image ((n_images, height, "
                f"width) arrays or lists of (height, width) arrays); image {index} has a map of shape "
                f"{scores.shape} and a mask of shape {mask.shape}."
            )
    if inspected is None:
        return list(zip(masks, anomaly_maps))
    seen = _image_list(inspected, "inspected")
    if len(seen) != len(masks) or any(np.shape(s) != m.shape for s, m in zip(seen, masks)):
        raise ValueError("'inspected' must have the shape of 'masks', image by image.")
    seen = [np.asarray(s, dtype=bool) for s in seen]
    lowest = min((float(scores[s].min()) for scores, s in zip(anomaly_maps, seen) if s.any()), default=0.0)
    pairs = []
    for mask, scores, s in zip(masks, anomaly_maps, seen):
        if not s.all():
            below = np.nextafter(scores.dtype.type(lowest), scores.dtype.type(-np.inf))
            scores = np.where(s, scores, below)
        pairs.append((mask, scores))
    return pairs


def _gather(pairs, defective: bool) -> np.ndarray:
    """The scores of every defective (or defect-free) pixel, in one new array."""
    counts = [int(np.count_nonzero(mask)) for mask, _ in pairs]
    if not defective:
        counts = [mask.size - count for (mask, _), count in zip(pairs, counts)]
    out = np.empty(sum(counts), dtype=np.result_type(*(scores.dtype for _, scores in pairs)))
    start = 0
    for (mask, scores), count in zip(pairs, counts):
        out[start : start + count] = scores[mask] if defective else scores[~mask]
        start += count
    return out


def _image_list(values, name: str) -> list:
    """A (n, H, W) array or a sequence of 2-D arrays, as a list of per-image arrays."""
    if isinstance(values, np.ndarray):
        if values.ndim != 3:
            raise ValueError(
                f"'{name}' must be a 3-D array of shape (n_images, height, width) or a list of 2-D "
                f"arrays; got shape {values.shape}."
            )
        return list(values)
    if isinstance(values, (list, tuple)):
        arrays = [np.asarray(value) for value in values]
        if any(array.ndim != 2 for array in arrays):
            raise ValueError(f"'{name}' as a list must hold 2-D (height, width) arrays, one per image.")
        return arrays
    return _image_list(np.asarray(values), name)


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


def pixel_auroc(masks, anomaly_maps, *, inspected=None) -> float:
    """Pixel-level area under the ROC curve, over all pixels of all images.

    Every pixel of every image is one sample: defective pixels (mask on)
    are the positive class, scored by the anomaly map. The result equals
    ``sklearn.metrics.roc_auc_score(masks.ravel(), anomaly_maps.ravel())``
    but is computed with sorting and binary searches only, so its extra
    memory is about one copy of the defect-free pixels' scores.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width), or list of 2-D arrays
        Ground-truth defect masks: bool, or 0/1, or 0/255 values. Good images
        have all-zero masks. A list may hold images of different sizes (e.g.
        each at its original size, see :func:`pixel_metrics`).
    anomaly_maps : array-like of shape (n_images, height, width), or list of 2-D arrays
        Anomaly score of each pixel, higher = more anomalous; same shapes as
        ``masks``.
    inspected : same shapes as ``masks``, bool, default=None
        Pixels the model saw. The others (e.g. cut away by a crop) count as
        never flagged: they score below every inspected pixel.

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
    pairs = _check_masks_and_maps(masks, anomaly_maps, inspected)
    n_defective = sum(int(np.count_nonzero(mask)) for mask, _ in pairs)
    n_pixels = sum(mask.size for mask, _ in pairs)
    if n_defective == 0 or n_defective == n_pixels:
        raise ValueError(
            "'masks' must contain both defective and defect-free pixels for a pixel AUROC; "
            f"got {n_defective} defective pixels out of {n_pixels}."
        )
    # Gathering copies, so sorting the negatives in place is safe.
    return _auroc_from_split(_gather(pairs, defective=True), _gather(pairs, defective=False))


def aupro(masks, anomaly_maps, max_fpr: float = 0.3, *, inspected=None) -> float:
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
    masks : array-like of shape (n_images, height, width), or list of 2-D arrays
        Ground-truth defect masks: bool, or 0/1, or 0/255 values. Good images
        have all-zero masks. A list may hold images of different sizes.
    anomaly_maps : array-like of shape (n_images, height, width), or list of 2-D arrays
        Anomaly score of each pixel, higher = more anomalous; same shapes as
        ``masks``.
    max_fpr : float, default=0.3
        Upper end of the integration range, in ``(0, 1]``.
    inspected : same shapes as ``masks``, bool, default=None
        Pixels the model saw. The others count as never flagged (see
        :func:`pixel_auroc`).

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
    pairs = _check_masks_and_maps(masks, anomaly_maps, inspected)

    # Defective pixels: their scores and the size of the region each belongs to.
    region_scores, region_sizes_per_pixel = [], []
    n_regions = 0
    for mask, scores in pairs:
        if not mask.any():
            continue
        labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        pixel_labels = labels[mask]
        sizes = np.bincount(pixel_labels)
        region_scores.append(scores[mask])
        region_sizes_per_pixel.append(sizes[pixel_labels])
        n_regions += count
    n_negatives = sum(mask.size for mask, _ in pairs) - sum(part.size for part in region_scores)
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

    negatives = _gather(pairs, defective=False)
    del pairs
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
