"""Specification of skpatchcore.metrics: values against plain reference implementations."""

import itertools
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV

from skpatchcore.datasets import load_masks
from skpatchcore.metrics import (
    aupro,
    image_auroc,
    image_auroc_scorer,
    make_pixel_scorer,
    pixel_auroc,
    pixel_metrics,
)
from skpatchcore.utils._geometry import Geometry

# --------------------------------------------------------------------------
# Reference implementations, written for clarity rather than speed
# --------------------------------------------------------------------------


def brute_force_aupro(masks, maps, max_fpr):
    """Sweep every distinct score as a threshold and integrate the PRO curve directly.

    ``masks`` and ``maps``: (n, H, W) arrays or lists of 2-D arrays of any sizes.
    """
    masks = [np.asarray(mask).astype(bool) for mask in masks]
    maps = [np.asarray(scores) for scores in maps]
    structure = np.ones((3, 3), dtype=bool)
    regions = []
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=structure)
        regions += [(index, labels == label) for label in range(1, count + 1)]
    n_defect_free = sum(int((~mask).sum()) for mask in masks)

    curve = [(0.0, 0.0)]
    for threshold in np.unique(np.concatenate([scores.ravel() for scores in maps]))[::-1]:
        flagged = [scores >= threshold for scores in maps]
        fpr = sum(int((f & ~mask).sum()) for f, mask in zip(flagged, masks)) / n_defect_free
        pro = np.mean([flagged[index][region].mean() for index, region in regions])
        curve.append((fpr, pro))

    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < max_fpr:
                y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
                area += (max_fpr - x0) * (y0 + y_end) / 2
            break
    return area / max_fpr


def random_masks(rng, n_images, height, width, n_blobs):
    """Masks made of a few random rectangles per image, plus one empty (good) image."""
    masks = np.zeros((n_images, height, width), dtype=bool)
    for mask in masks[1:]:
        for _ in range(n_blobs):
            top, left = rng.integers(0, height - 2), rng.integers(0, width - 2)
            h, w = rng.integers(1, 5, size=2)
            mask[top : top + h, left : left + w] = True
    return masks


# --------------------------------------------------------------------------
# image_auroc
# --------------------------------------------------------------------------


def test_image_auroc_equals_sklearn_with_defective_as_positive_class():
    rng = np.random.default_rng(0)
    y_true = rng.choice([-1, 1], size=200)
    scores = rng.normal(size=200) - 0.5 * y_true
    scores[:50] = np.round(scores[:50], 1)  # some ties
    expected = roc_auc_score(y_true == -1, scores)
    assert image_auroc(y_true, scores) == pytest.approx(expected, abs=1e-12)
    assert expected > 0.6  # the test data is informative, so a sign error would show


def test_image_auroc_is_one_when_every_defective_image_scores_higher():
    assert image_auroc([1, 1, -1, -1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([1, 1, -1, -1], [0.3, 0.4, 0.1, 0.2]) == 0.0
    assert image_auroc([1, -1], [0.5, 0.5]) == 0.5


@pytest.mark.parametrize(
    "y_true, scores, message",
    [
        ([1, -1, 1], [0.1, 0.2], "same length"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "both good"),
        ([0, 1, 1], [0.1, 0.2, 0.3], r"\+1 \(good\) and -1 \(defective\).*\[0\]"),
        ([-1, 1, 1], [0.1, np.nan, 0.3], "NaN or infinite"),
        ([[-1, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_auroc_rejects_invalid_input_with_a_message(y_true, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(y_true, scores)


# --------------------------------------------------------------------------
# pixel_auroc
# --------------------------------------------------------------------------


def test_pixel_auroc_equals_sklearn_on_all_pixels():
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 5, 20, 24, n_blobs=3)
    maps = rng.random(masks.shape).astype(np.float32) + 0.4 * masks
    maps[0] = np.round(maps[0], 1)  # ties between defective and defect-free pixels
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("encode", [lambda m: m, lambda m: m.astype(np.uint8), lambda m: m * np.uint8(255)])
def test_pixel_auroc_accepts_bool_01_and_0255_masks_alike(encode):
    rng = np.random.default_rng(2)
    masks = random_masks(rng, 3, 10, 10, n_blobs=2)
    maps = rng.random(masks.shape)
    assert pixel_auroc(encode(masks), maps) == pixel_auroc(masks, maps)


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.array([[[0, 128], [255, 0]]]), "got the value 128"),
        (np.array([[[0, 1], [255, 0]]]), "not a mix of 1 and 255"),
        (np.array([[[0.0, 0.5], [1.0, 0.0]]]), "got the value 0.5"),
        (np.array([[[0, 1], [1, 0]]]), None),
    ],
)
def test_pixel_auroc_accepts_only_binary_masks(masks, message):
    maps = np.arange(4.0).reshape(1, 2, 2)
    if message is None:
        assert pixel_auroc(masks, maps) == 0.5
    else:
        with pytest.raises(ValueError, match=message):
            pixel_auroc(masks, maps)


def test_pixel_auroc_rejects_shape_mismatch_and_single_class():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 0, 0] = True
    with pytest.raises(ValueError, match=r"same shape.*image 0.*\(4, 5\).*\(4, 4\)"):
        pixel_auroc(masks, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="both defective and defect-free"):
        pixel_auroc(np.zeros((2, 4, 4), dtype=bool), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"3-D.*\(4, 4\)"):
        pixel_auroc(masks[1], np.zeros((4, 4)))


def test_pixel_metrics_use_about_one_copy_of_the_maps_in_extra_memory():
    # 40 images at 224 x 224 (2 million pixels). A general ROC routine would
    # allocate several float64/int64 arrays of the full length (> 8x the maps).
    rng = np.random.default_rng(3)
    masks = np.zeros((40, 224, 224), dtype=bool)
    masks[20:, 100:130, 90:140] = True
    maps = rng.random(masks.shape, dtype=np.float32) + masks
    for metric in (pixel_auroc, aupro):
        tracemalloc.start()
        metric(masks, maps)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2.5 * maps.nbytes, metric.__name__


# --------------------------------------------------------------------------
# aupro
# --------------------------------------------------------------------------


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("tied", [True, False])
def test_aupro_equals_a_brute_force_threshold_sweep(max_fpr, tied):
    rng = np.random.default_rng(4)
    masks = random_masks(rng, 4, 12, 14, n_blobs=3)
    maps = rng.random(masks.shape) + 0.5 * masks
    if tied:  # few distinct values: defective and defect-free pixels share thresholds
        maps = np.round(maps * 8) / 8
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert n_regions >= 5
    expected = brute_force_aupro(masks, maps, max_fpr)
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)


def test_aupro_of_a_perfect_map_is_one():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5, 2:7] = True
    maps = masks * 0.9 + 0.05
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("max_fpr", [0.1, 0.3, 1.0])
def test_aupro_of_a_constant_map_is_half_of_max_fpr(max_fpr):
    # One threshold flags everything: the curve is the straight line (0, 0) -> (1, 1).
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, :2, :3] = True
    masks[1, 4, 4] = True
    assert aupro(masks, np.full(masks.shape, 7.0), max_fpr=max_fpr) == pytest.approx(max_fpr / 2)


def test_aupro_regions_are_8_connected_so_diagonal_pixels_form_one_region():
    # Pixels (0, 0) and (0, 1) touch (1, 2) only by a corner: one region of 3 pixels.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0:2] = True
    masks[0, 1, 2] = True
    maps = np.zeros(masks.shape)
    maps[0, 1, 2] = 1.0  # only the corner-touching pixel is found
    # Curve (0, 0) -> (0, 1/3) -> (1, 1): normalised area p + (1 - p) * max_fpr / 2 with p = 1/3.
    # With 4-connectivity (two regions) p would be 1/2 and the result 0.575.
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(1 / 3 + (2 / 3) * 0.15, abs=1e-12)


def test_aupro_rejects_masks_without_regions_or_without_defect_free_pixels():
    maps = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="no defect region"):
        aupro(np.zeros((2, 3, 3), dtype=bool), maps)
    with pytest.raises(ValueError, match="no defect-free pixel"):
        aupro(np.ones((2, 3, 3), dtype=bool), maps)


@pytest.mark.parametrize("max_fpr", [0, -0.1, 1.5, "0.3", True])
def test_aupro_rejects_max_fpr_outside_zero_one(max_fpr):
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match=r"'max_fpr'.*\(0, 1\].*got"):
        aupro(masks, np.zeros((1, 3, 3)), max_fpr=max_fpr)


# --------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------


class FixedScoreDetector:
    """decision_function is higher = more normal, as in scikit-learn."""

    def __init__(self, anomaly_scores):
        self.anomaly_scores = np.asarray(anomaly_scores)

    def decision_function(self, X):
        return -self.anomaly_scores[np.asarray(X)]


def test_image_auroc_scorer_negates_decision_function_into_anomaly_scores():
    anomaly_scores = np.array([0.1, 0.9, 0.2, 0.8, 0.5])
    y = np.array([1, -1, 1, -1, -1])
    detector = FixedScoreDetector(anomaly_scores)
    assert image_auroc_scorer(detector, np.arange(5), y) == 1.0
    assert image_auroc_scorer(detector, np.arange(5), -y) == 0.0


class BrightnessDetector(BaseEstimator):
    """A fake pixel detector: the anomaly map is the image brightness plus noise.

    Like a fitted PatchFeatureTransformer it fixes its geometry in ``fit``
    (``geometry_``) and its maps are at that model input size; more
    ``noise`` makes them worse.
    """

    def __init__(self, noise=0.0, image_size=16, crop_size=12, resize_side="longer"):
        self.noise = noise
        self.image_size = image_size
        self.crop_size = crop_size
        self.resize_side = resize_side

    def fit(self, X=None, y=None):
        self.geometry_ = Geometry(self.image_size, self.crop_size, self.resize_side)
        return self

    def predict_map(self, X):
        maps = np.stack([self.geometry_.apply(Image.open(path).convert("L"))[:, :, 0] for path in X])
        return maps + self.noise * np.random.default_rng(0).random(maps.shape)


class FakePipeline:
    def __init__(self, detector):
        self.named_steps = {"features": detector, "detector": object()}
        self.detector = detector

    def predict_map(self, X):
        return self.detector.predict_map(X)


@pytest.fixture
def bright_defect_images(tmp_path):
    """Six 20 x 24 images whose defects are bright squares, with 0/255 mask files."""
    rng = np.random.default_rng(5)
    mask_paths = {}
    for index in range(6):
        mask = np.zeros((20, 24), dtype=np.uint8)
        if index % 2:
            top, left = rng.integers(4, 12), rng.integers(4, 14)
            mask[top : top + 5, left : left + 6] = 255
        image = (rng.integers(0, 60, size=mask.shape) + 0.7 * mask).astype(np.uint8)
        image_path = tmp_path / f"image_{index}.png"
        Image.fromarray(image).save(image_path)
        mask_paths[str(image_path)] = None
        if index % 2:
            Image.fromarray(mask).save(tmp_path / f"image_{index}_mask.png")
            mask_paths[str(image_path)] = str(tmp_path / f"image_{index}_mask.png")
    return mask_paths


def on_original_images(detector, bright_defect_images):
    """Masks from the files, maps taken back to the 20 x 24 originals, and what the model saw."""
    image_paths = list(bright_defect_images)
    masks = np.stack(
        [
            np.zeros((20, 24), bool) if mask is None else np.asarray(Image.open(mask)) > 0
            for mask in bright_defect_images.values()
        ]
    )
    pairs = [detector.geometry_.to_original(m, (20, 24)) for m in detector.predict_map(image_paths)]
    return masks, np.stack([heat for heat, _ in pairs]), np.stack([seen for _, seen in pairs])


def test_pixel_metrics_count_the_images_own_pixels_not_the_letterbox_padding(bright_defect_images):
    # Longer side 24 -> 16: 20 x 24 images become 13 x 16, padded to 16 x 16 with black rows.
    detector = BrightnessDetector(noise=0.3, image_size=16, crop_size=16).fit()
    image_paths = list(bright_defect_images)
    result = pixel_metrics(detector, image_paths, list(bright_defect_images.values()))
    masks, heats, inspected = on_original_images(detector, bright_defect_images)
    assert inspected.all() and result["n_pixels_not_inspected"] == 0
    assert result["n_pixels"] == 6 * 20 * 24 and result["n_defective_pixels"] == masks.sum()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), heats.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks, heats, 0.3), abs=1e-9)
    # At the model input size the padding would count as (easy, dark) defect-free pixels.
    padded = load_masks(list(bright_defect_images.values()), image_paths, image_size=16, crop_size=16)
    assert pixel_auroc(padded, detector.predict_map(image_paths)) != result["pixel_auroc"]


def test_pixels_cut_away_by_a_crop_count_as_never_flagged(bright_defect_images):
    # 20 x 24 -> 13 x 16, centre crop 12 x 12: two columns each side and a row are cut away.
    detector = BrightnessDetector(noise=0.3).fit()
    result = pixel_metrics(detector, list(bright_defect_images), list(bright_defect_images.values()))
    masks, heats, inspected = on_original_images(detector, bright_defect_images)
    assert 0 < result["n_pixels_not_inspected"] == (~inspected).sum()
    assert result["n_defective_pixels_not_inspected"] == (masks & ~inspected).sum()
    lowest = np.where(inspected, heats, heats[inspected].min() - 1.0)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), lowest.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(brute_force_aupro(masks, lowest, 0.3), abs=1e-9)


def test_pixel_metrics_use_the_fitted_geometry_not_parameters_changed_after_fit(bright_defect_images):
    image_paths, mask_paths = list(bright_defect_images), list(bright_defect_images.values())
    detector = BrightnessDetector(noise=0.3).fit()
    before = pixel_metrics(detector, image_paths, mask_paths)
    detector.set_params(image_size=20, crop_size=None)
    assert pixel_metrics(detector, image_paths, mask_paths) == before
    scorer = make_pixel_scorer(bright_defect_images, metric="aupro")
    assert scorer(detector, image_paths, None) == before["aupro"]


@pytest.mark.parametrize("metric", ["pixel_auroc", "aupro"])
@pytest.mark.parametrize("wrap", [lambda d: d, FakePipeline], ids=["estimator", "pipeline"])
def test_pixel_scorer_gives_pixel_metrics_over_the_original_images(bright_defect_images, metric, wrap):
    image_paths = list(bright_defect_images)
    detector = BrightnessDetector(noise=0.3).fit()
    score = make_pixel_scorer(bright_defect_images, metric=metric)(wrap(detector), image_paths, None)
    assert score == pixel_metrics(detector, image_paths, list(bright_defect_images.values()))[metric]
    assert 0.5 < score < 1.0


def test_pixel_metrics_accept_lists_of_images_of_different_sizes():
    rng = np.random.default_rng(11)
    sizes = [(12, 30), (20, 20), (7, 9)]
    masks = [random_masks(rng, 2, h, w, n_blobs=2)[1] for h, w in sizes]
    maps = [rng.random(m.shape) + 0.5 * m for m in masks]
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)
    inspected = [np.ones(m.shape, bool) for m in masks]
    inspected[0][:, :5] = False
    lowest = min(a[i].min() for a, i in zip(maps, inspected)) - 1.0
    honest = [np.where(i, a, lowest) for a, i in zip(maps, inspected)]
    assert aupro(masks, maps, inspected=inspected) == pytest.approx(brute_force_aupro(masks, honest, 0.3))
    assert pixel_auroc(masks, maps, inspected=inspected) == pixel_auroc(masks, honest)


def test_pixel_scorer_picks_the_better_parameter_in_grid_search(bright_defect_images):
    image_paths = list(bright_defect_images)
    labels = [1 if mask is None else -1 for mask in bright_defect_images.values()]
    search = GridSearchCV(
        BrightnessDetector(),
        {"noise": [5.0, 0.0, 2.0]},
        scoring=make_pixel_scorer(bright_defect_images, metric="aupro"),
        cv=2,
    ).fit(image_paths, labels)
    assert search.best_params_ == {"noise": 0.0}
    assert search.best_score_ > 0.9


def test_pixel_scorer_reports_missing_masks_and_map_size_mismatch(bright_defect_images):
    image_paths = list(bright_defect_images)
    scorer = make_pixel_scorer({image_paths[0]: None})
    with pytest.raises(ValueError, match=r"no entry for 5 image\(s\).*image_1\.png"):
        scorer(BrightnessDetector(), image_paths, None)

    class WrongSizeDetector(BrightnessDetector):
        def predict_map(self, X):
            return np.zeros((len(X), 10, 10))

    scorer = make_pixel_scorer(bright_defect_images)
    with pytest.raises(ValueError, match=r"image_0.png.*shape \(10, 10\).*20x24 image to 12x12"):
        scorer(WrongSizeDetector().fit(), image_paths, None)
    with pytest.raises(ValueError, match="'geometry_' attribute.*fit it first"):
        scorer(BrightnessDetector(), image_paths, None)


def test_make_pixel_scorer_validates_its_parameters():
    with pytest.raises(ValueError, match=r"'metric'.*\['aupro', 'pixel_auroc'\].*'f1'"):
        make_pixel_scorer({}, metric="f1")
    with pytest.raises(TypeError, match="'mask_paths'.*mapping.*list"):
        make_pixel_scorer(["a.png"])
    with pytest.raises(ValueError, match="'max_fpr'"):
        make_pixel_scorer({}, metric="aupro", max_fpr=2.0)
