"""Evaluation metrics for anomaly detection and localisation.

Three metrics, as in the PatchCore and MVTec AD papers:

- :func:`image_auroc`: image-level AUROC of anomaly scores against good /
  defective labels;
- :func:`pixel_auroc`: AUROC over every pixel of every test image;
- :func:`aupro`: area under the per-region overlap (PRO) curve up to a false
  positive rate of 0.3, normalised to ``[0, 1]``.

Pixel metrics count the images' **own pixels only**. :func:`pixel_metrics`
takes a fitted model's heat maps back to each image's original size (the
inverse of the model's fitted geometry: letterbox padding falls away) and
scores them against the original masks. Pixels that a crop cut away are
still the image's pixels: they count, as pixels the model never flags (each
scores below every inspected pixel), and the result says how many defective
pixels that was.

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

from ._auroc import aupro, image_auroc, pixel_auroc
from ._evaluation import image_auroc_scorer, make_pixel_scorer, pixel_metrics

__all__ = [
    "aupro",
    "image_auroc",
    "image_auroc_scorer",
    "make_pixel_scorer",
    "pixel_auroc",
    "pixel_metrics",
]
