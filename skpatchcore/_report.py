"""Pictures for people: heat-map overlays on the original images and a one-page report.

The model sees each image resized and centre-cropped (see
:class:`~skpatchcore.utils._geometry.Geometry`), so its anomaly maps live at
the model input size. :meth:`~skpatchcore.utils._geometry.Geometry.to_original` undoes that
geometry (the map back on the original image, with the border that a crop
cut away marked as not inspected); :func:`overlay` then draws it on the
original pixels and :func:`write_report`
lays out the evaluation page. Everything renders with Matplotlib's Agg
canvas directly (no pyplot, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ._auroc import image_auroc
from .datasets import _read_mask
from .utils._geometry import Geometry
from .utils._images import DEFAULT_BIT_DEPTH, check_images

__all__ = ["overlay", "read_rgb", "write_overlay", "write_report"]

# Heat colours are relative to the model's threshold on the image score: the
# colour scale runs from HEAT_LOW to HEAT_HIGH times the threshold, so the
# threshold sits in the middle (green in "jet") whatever the model's distances.
HEAT_LOW, HEAT_HIGH = 0.5, 1.5
_COLORMAP = "jet"


def read_rgb(path, bit_depth: int = DEFAULT_BIT_DEPTH) -> np.ndarray:
    """Pixels of an image file as the model reads them, as uint8 RGB ``(H, W, 3)`` for display.

    Upright (EXIF orientation applied), grayscale repeated, 16-bit images
    scaled with ``bit_depth`` as the model scales them.
    """
    pixels = check_images([path], channels=3, bit_depth=bit_depth).load(0)
    if isinstance(pixels, np.ndarray):
        return np.round(pixels * 255.0).astype(np.uint8)
    return np.asarray(pixels)


def overlay(image: np.ndarray, heat: np.ndarray, inspected: np.ndarray, threshold: float) -> np.ndarray:
    """Draw a heat map over an image.

    Colours follow the "jet" colour map from ``HEAT_LOW * threshold`` (blue)
    to ``HEAT_HIGH * threshold`` (red); hotter places are also painted more
    opaquely, so that normal texture stays visible. The border that the model
    did not inspect is shown darkened and grey.

    Parameters
    ----------
    image : ndarray of shape (H, W, 3), uint8
        The original image.
    heat, inspected : ndarray of shape (H, W)
        From :meth:`~skpatchcore.utils._geometry.Geometry.to_original`.
    threshold : float
        The model's anomaly-score threshold (``threshold_`` of the detector).

    Returns
    -------
    ndarray of shape (H, W, 3), uint8
    """
    from matplotlib import colormaps

    pixels = image.astype(np.float32) / 255.0
    level = np.clip((heat / threshold - HEAT_LOW) / (HEAT_HIGH - HEAT_LOW), 0.0, 1.0)
    colours = colormaps[_COLORMAP](level)[:, :, :3]
    opacity = (0.2 + 0.5 * level)[:, :, None]
    blended = (1.0 - opacity) * pixels + opacity * colours
    grey = 0.5 * pixels.mean(axis=2, keepdims=True)
    result = np.where(inspected[:, :, None], blended, grey)
    return np.round(result * 255.0).astype(np.uint8)


def write_overlay(
    path, image_path, anomaly_map, geometry: Geometry, threshold: float, bit_depth: int = DEFAULT_BIT_DEPTH
) -> tuple[int, int]:
    """Write the overlay of one image as a PNG at its original size; return that ``(height, width)``."""
    image = read_rgb(image_path, bit_depth)
    heat, inspected = geometry.to_original(anomaly_map, image.shape[:2])
    Image.fromarray(overlay(image, heat, inspected, threshold)).save(path)
    return image.shape[0], image.shape[1]


def write_report(
    path,
    *,
    title: str,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    metrics: dict,
    image_paths: Sequence,
    maps: np.ndarray,
    mask_paths: Sequence,
    geometry: Geometry,
    bit_depth: int = DEFAULT_BIT_DEPTH,
    n_examples: int = 4,
) -> None:
    """Write the one-page evaluation report as a PNG.

    Top row: the image-level ROC curve, the histogram of anomaly scores of
    good and defective test images with the threshold, and the metrics.
    Below: the good images the model scored *most* anomalous and the
    defective images it scored *least* anomalous (the likeliest false alarms
    and misses), each with its heat-map overlay; defective images also show
    the outline of their ground-truth mask.

    Parameters
    ----------
    path : str or path-like
        Output PNG file.
    title : str
        Page title.
    labels : ndarray of shape (n,)
        +1 good, -1 defective.
    scores : ndarray of shape (n,)
        Image anomaly scores, higher = more anomalous.
    threshold : float
        The model's threshold on the anomaly score.
    metrics : dict
        Name -> value, printed as a table (floats with 3 decimals).
    image_paths, mask_paths : sequence
        Test image files and their mask files (None for good images).
    maps : ndarray of shape (n, H, W)
        Anomaly maps at the model input size.
    geometry : Geometry
        The model's input geometry, to draw the maps on the original images.
    bit_depth : int, default=16
        The model's ``bit_depth``, to show 16-bit images as it reads them.
    n_examples : int, default=4
        Images shown per row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    defective = labels == -1

    figure = Figure(figsize=(3.2 * n_examples, 10.5), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=14)
    summary, good_row, defective_row = figure.subfigures(3, 1)
    top = summary.add_gridspec(1, 3, width_ratios=[1.0, 1.6, 1.0])

    roc_axes = summary.add_subplot(top[0, 0])
    fpr, tpr, _ = roc_curve(defective, scores)
    roc_axes.plot(fpr, tpr, color="tab:red", label=f"AUROC {image_auroc(labels, scores):.3f}")
    roc_axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    roc_axes.set(xlabel="false positive rate", ylabel="true positive rate", title="Image ROC", aspect="equal")
    roc_axes.legend(loc="lower right")

    histogram_axes = summary.add_subplot(top[0, 1])
    low, high = min(scores.min(), threshold), max(scores.max(), threshold)
    bins = np.linspace(low, high if high > low else low + 1.0, 30)
    histogram_axes.hist(scores[~defective], bins=bins, alpha=0.6, color="tab:blue", label="good")
    histogram_axes.hist(scores[defective], bins=bins, alpha=0.6, color="tab:red", label="defective")
    histogram_axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    histogram_axes.set(xlabel="anomaly score", ylabel="images", title="Anomaly scores")
    histogram_axes.legend()

    text_axes = summary.add_subplot(top[0, 2])
    text_axes.axis("off")
    lines = [
        f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}"
        for name, value in metrics.items()
    ]
    text_axes.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9)

    good_order = np.flatnonzero(~defective)[np.argsort(-scores[~defective], kind="stable")]
    defective_order = np.flatnonzero(defective)[np.argsort(scores[defective], kind="stable")]
    rows = [
        (good_row, good_order[:n_examples], "Good images the model scored most anomalous"),
        (defective_row, defective_order[:n_examples], "Defective images the model scored least anomalous"),
    ]
    for subfigure, picks, caption in rows:
        subfigure.suptitle(caption, fontsize=11)
        for column, axes in enumerate(subfigure.subplots(1, n_examples, squeeze=False)[0]):
            axes.axis("off")
            if column < len(picks):
                image = read_rgb(image_paths[int(picks[column])], bit_depth)
                _draw_example(
                    axes,
                    image,
                    int(picks[column]),
                    image_paths,
                    mask_paths,
                    maps,
                    scores,
                    geometry,
                    threshold,
                )
    figure.savefig(path, dpi=100)


def _draw_example(axes, image, index, image_paths, mask_paths, maps, scores, geometry, threshold) -> None:
    heat, inspected = geometry.to_original(maps[index], image.shape[:2])
    axes.imshow(overlay(image, heat, inspected, threshold))
    if mask_paths[index] is not None:
        mask = np.asarray(_read_mask(mask_paths[index])) > 0
        if mask.any():
            axes.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    folder, name = os.path.split(os.fspath(image_paths[index]))
    axes.set_title(f"{os.path.basename(folder)}/{name}\nscore {scores[index]:.3g}", fontsize=9)
