"""PatchCoreDetector: nearest-neighbour scores, eq. 7, maps, threshold and conventions."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.exceptions import NotFittedError

from skpatchcore import PatchCoreDetector
from skpatchcore._maps import anomaly_maps, gaussian_blur


def random_features(n_images, h=4, w=5, d=12, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_images, h, w, d)) + shift).astype(np.float32)


def brute_force_distances(queries, bank):
    """(n_queries, n_bank) Euclidean distances in float64."""
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    return np.sqrt(np.maximum(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))


def nearest_mean(distances, k):
    """Each row's mean distance to its ``k`` nearest bank vectors: a patch score."""
    return np.sort(distances, axis=1)[:, :k].mean(axis=1)


@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("k", [1, 3])
def test_image_score_is_the_largest_nearest_neighbour_distance(distance, k):
    train, test = random_features(6), random_features(3, seed=1, shift=0.3)
    detector = PatchCoreDetector(n_neighbors=k, distance=distance, device="cpu").fit(train)
    dist = np.sort(brute_force_distances(test.reshape(-1, 12), train.reshape(-1, 12)), axis=1)[:, :k]
    if distance == "squared":
        dist = dist**2
    patch = dist.mean(axis=1).reshape(3, -1)
    np.testing.assert_allclose(detector.anomaly_score(test), patch.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(detector.predict_map(test), patch.reshape(3, 4, 5), rtol=1e-5)


def test_reweighting_follows_equation_7():
    train, test = random_features(8, d=6), random_features(4, d=6, seed=3, shift=0.5)
    b = 4
    # eq. 7 is written for the nearest neighbour (n_neighbors=1, the paper's scores)
    detector = PatchCoreDetector(n_neighbors=1, reweight_neighbors=b, device="cpu").fit(train)
    bank = train.reshape(-1, 6).astype(np.float64)
    expected = []
    for image in test.reshape(4, -1, 6).astype(np.float64):
        dist = brute_force_distances(image, bank)
        patch = dist.min(axis=1)
        worst = patch.argmax()
        m_star = dist[worst].argmin()
        support = np.argsort(brute_force_distances(bank[m_star : m_star + 1], bank)[0], kind="stable")[:b]
        to_support = brute_force_distances(image[worst : worst + 1], bank[support])[0]
        weight = 1 - np.exp(dist[worst, m_star]) / np.exp(to_support).sum()
        expected.append(weight * patch[worst])
    np.testing.assert_allclose(detector.anomaly_score(test), expected, rtol=1e-4)


def test_masked_patches_and_defective_images_stay_out_of_the_bank():
    X = random_features(4)
    mask = np.zeros(X.shape, dtype=bool)
    mask[:, 0, :, :] = True  # hide the first row of every image
    y = np.array([1, 1, -1, 1])
    detector = PatchCoreDetector(device="cpu").fit(np.ma.MaskedArray(X, mask=mask), y)
    expected = X[[0, 1, 3]][:, 1:].reshape(-1, 12)
    np.testing.assert_array_equal(np.sort(detector.memory_bank_, axis=0), np.sort(expected, axis=0))


def test_sign_conventions_follow_scikit_learn_outlier_detectors():
    train, test = random_features(10), random_features(6, seed=4, shift=1.0)
    detector = PatchCoreDetector(device="cpu").fit(train)
    anomaly = detector.anomaly_score(test)
    np.testing.assert_array_equal(detector.score_samples(test), -anomaly)
    np.testing.assert_allclose(detector.decision_function(test), -anomaly - detector.offset_)
    assert detector.offset_ == -detector.threshold_
    np.testing.assert_array_equal(detector.predict(test), np.where(anomaly <= detector.threshold_, 1, -1))


def test_threshold_is_calibrated_on_out_of_fold_scores():
    # Each image holds one isolated vector, so its in-sample score would be 0.
    # 40 one-vector images are calibrated in 16 folds.
    rng = np.random.default_rng(5)
    train = rng.normal(size=(40, 8)).astype(np.float32)
    detector = PatchCoreDetector(device="cpu").fit(train)
    folds = np.array_split(np.arange(40), 16)
    expected = []
    for fold in folds:
        others = np.setdiff1d(np.arange(40), fold)
        expected.extend(nearest_mean(brute_force_distances(train[fold], train[others]), detector.n_neighbors))
    np.testing.assert_allclose(detector.calibration_scores_, expected, rtol=1e-5)
    assert detector.threshold_ == pytest.approx(max(expected), rel=1e-5)
    strict = PatchCoreDetector(contamination=0.1, device="cpu").fit(train)
    assert strict.threshold_ == pytest.approx(np.quantile(expected, 0.9), rel=1e-5)
    assert (strict.calibration_scores_ > strict.threshold_).mean() == pytest.approx(0.1, abs=0.03)


def test_set_threshold_moves_the_decision():
    detector = PatchCoreDetector(device="cpu").fit(random_features(5))
    test = random_features(3, seed=9)
    scores = detector.anomaly_score(test)
    detector.set_threshold(np.median(scores))
    assert (detector.predict(test) == np.where(scores <= np.median(scores), 1, -1)).all()
    with pytest.raises(ValueError, match="finite"):
        detector.set_threshold(np.nan)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_maps_are_upsampling_then_scipy_gaussian(mode):
    patch = np.random.default_rng(6).random((3, 7, 9)).astype(np.float32)
    maps = anomaly_maps(patch, (56, 72), sigma=4.0, upsampling=mode)
    corners = {"align_corners": False} if mode == "bilinear" else {}
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(patch)[:, None], size=(56, 72), mode=mode, **corners
    )[:, 0].numpy()
    expected = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma=4.0) for m in upsampled])
    np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-6 * expected.max())


@pytest.mark.parametrize("shape, sigma", [((5, 6), 4.0), ((40, 33), 1.5), ((1, 1), 4.0)])
def test_gaussian_blur_equals_scipy_even_on_tiny_maps(shape, sigma):
    maps = np.random.default_rng(7).random((2, *shape))
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_predict_map_returns_scores_of_the_same_pass():
    train, test = random_features(5), random_features(2, seed=8)
    detector = PatchCoreDetector(device="cpu").fit(train)
    maps, scores = detector.predict_map(test, output_size=(32, 40), return_scores=True)
    assert maps.shape == (2, 32, 40) and maps.dtype == np.float32
    np.testing.assert_array_equal(scores, detector.anomaly_score(test))


def test_concurrent_predictions_equal_serial_ones():
    detector = PatchCoreDetector(device="cpu").fit(random_features(20, d=32))
    batches = [random_features(4, d=32, seed=s) for s in range(8)]
    serial = [detector.predict_map(b, output_size=(16, 20)) for b in batches]
    results = [None] * 8

    def work(i):
        results[i] = detector.predict_map(batches[i], output_size=(16, 20))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):
        np.testing.assert_array_equal(a, b)


def test_predict_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        PatchCoreDetector().predict(random_features(1))


@pytest.mark.parametrize(
    "X, message",
    [
        (random_features(2, d=7), "7 features per patch, but PatchCoreDetector was fitted with 12"),
        (np.full((2, 4, 5, 12), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((2, 3, 12), dtype=np.float32), "got 3-D"),
    ],
)
def test_test_features_that_do_not_match_the_bank_are_refused(X, message):
    detector = PatchCoreDetector(device="cpu").fit(random_features(3))
    with pytest.raises(ValueError, match=message):
        detector.anomaly_score(X)


def test_a_single_good_image_warns_that_the_threshold_is_in_sample():
    with pytest.warns(UserWarning, match="could not be calibrated"):
        PatchCoreDetector(device="cpu").fit(random_features(1))


def test_few_images_are_each_calibrated_against_all_the_others():
    train = random_features(6, seed=12)
    detector = PatchCoreDetector(device="cpu").fit(train)
    expected = []
    for i in range(6):
        others = np.delete(train, i, axis=0).reshape(-1, 12)
        distances = brute_force_distances(train[i].reshape(-1, 12), others)
        expected.append(nearest_mean(distances, detector.n_neighbors).max())
    np.testing.assert_allclose(detector.calibration_scores_, expected, rtol=1e-5)


# --------------------------------------------------------------------------
# Growing the bank (partial_fit) and the out-of-fold search
# --------------------------------------------------------------------------


def test_partial_fit_appends_the_kept_patches_and_recalibrates_on_the_new_images():
    train, more = random_features(6, seed=20), random_features(4, seed=21, shift=0.3)
    mask = np.zeros(more.shape, dtype=bool)
    mask[:, :, 0, :] = True  # the first column of every new image stays out
    y = np.array([1, -1, 1, 1])
    detector = PatchCoreDetector(device="cpu").fit(train)
    old_bank, old_scores = detector.memory_bank_.copy(), detector.calibration_scores_.copy()
    detector.partial_fit(np.ma.MaskedArray(more, mask=mask), y)
    new_vectors = more[[0, 2, 3]][:, :, 1:].reshape(-1, 12)
    np.testing.assert_array_equal(detector.memory_bank_, np.concatenate([old_bank, new_vectors]))
    # the earlier scores stay; each new good image is scored against the grown bank without its own patches
    np.testing.assert_array_equal(detector.calibration_scores_[:6], old_scores)
    expected = []
    for image in (0, 2, 3):
        others = np.concatenate(
            [old_bank, np.delete(more[[0, 2, 3]][:, :, 1:], [0, 2, 3].index(image), 0).reshape(-1, 12)]
        )
        distances = brute_force_distances(more[image].reshape(-1, 12), others)
        expected.append(nearest_mean(distances, detector.n_neighbors).max())
    np.testing.assert_allclose(detector.calibration_scores_[6:], expected, rtol=1e-5)
    assert detector.threshold_ == pytest.approx(max(*old_scores, *expected), rel=1e-6)
    strict = PatchCoreDetector(contamination=0.2, device="cpu").fit(train).partial_fit(more)
    assert strict.threshold_ == pytest.approx(np.quantile(strict.calibration_scores_, 0.8), rel=1e-6)


def test_partial_fit_on_an_unfitted_detector_is_fit_and_refuses_other_features():
    train = random_features(5, seed=22)
    grown = PatchCoreDetector(device="cpu").partial_fit(train)
    fitted = PatchCoreDetector(device="cpu").fit(train)
    np.testing.assert_array_equal(grown.memory_bank_, fitted.memory_bank_)
    assert grown.threshold_ == fitted.threshold_
    with pytest.raises(
        ValueError, match="X has 8 features per patch, but PatchCoreDetector was fitted with 12"
    ):
        grown.partial_fit(random_features(2, d=8))


@pytest.mark.parametrize("reweight", [None, 3])
def test_calibration_searches_a_large_bank_block_by_block_with_the_same_scores(monkeypatch, reweight):
    """The out-of-fold bank is searched a block of vectors at a time (no copy of the rest of
    the bank per fold); the scores are those of one search over the bank without the fold."""
    from skpatchcore import _search

    train = random_features(20, seed=23)
    whole = PatchCoreDetector(reweight_neighbors=reweight, device="cpu").fit(train)
    monkeypatch.setattr(_search, "_OUT_OF_FOLD_BLOCK", 37)  # 380 bank vectors: 11 blocks
    blocks = PatchCoreDetector(reweight_neighbors=reweight, device="cpu").fit(train)
    np.testing.assert_allclose(blocks.calibration_scores_, whole.calibration_scores_, rtol=1e-6)
    bank = whole.memory_bank_
    excluded = np.random.default_rng(24).random(len(bank)) < 0.3
    queries = torch.from_numpy(random_features(2, seed=25).reshape(-1, 12))
    squared, found = _search.OutOfFoldIndex(bank, excluded, torch.device("cpu"), False).search(queries, 4)
    assert not excluded[found.numpy()].any()
    exact = brute_force_distances(queries.numpy(), bank) ** 2
    exact[:, excluded] = np.inf
    np.testing.assert_allclose(squared.numpy(), np.sort(exact, axis=1)[:, :4], rtol=1e-4)
