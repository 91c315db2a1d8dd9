"""Scale-out with skpatchcore.parallel, and concurrency and determinism of the estimators.

Tolerances stated here (measured with efficientnet_lite0 at 64 px on the CPU):

- The same images in the same batches on the same number of threads give
  bit-identical results: from 8 threads calling one model at once, from
  joblib threads, and from a model refitted with the same ``random_state``.
- Changing the feature step's ``batch_size`` changes the features by at most
  ``BATCH_FEATURE_TOL`` of their largest value (batch 1 against the default 4
  measured 5e-7; batches of 2 or more measured identical). Worker processes
  run torch on fewer threads, whose CPU convolutions round differently (also
  ~1e-6). Either way the search's float32 distance products round
  differently too: image scores then move by at most ``SCORE_RTOL``
  (relative; measured up to 1.5e-5 with the default 152-value features) and
  map values by at most ``MAP_TOL`` times the largest map value (measured
  5e-4: faiss computes ``|x|^2 + |y|^2 - 2 x.y``,
  which loses relative precision where a patch is close to the bank, i.e. in
  the smallest map values).
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
import torch
from PIL import Image

from skpatchcore import ImageReadError, PatchCoreDetector, SkippedImagesWarning, make_patchcore
from skpatchcore.parallel import fit_paths, score_paths

from .conftest import textured_parts

SMALL = {"backbone": "efficientnet_lite0", "image_size": 64, "crop_size": None, "device": "cpu"}
BATCH_FEATURE_TOL = 1e-6
SCORE_RTOL = 5e-5
MAP_TOL = 1e-3


@pytest.fixture(scope="module")
def fitted(good_parts):
    return make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(good_parts)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, defective_parts):
    """Ten PNG files: good and defective parts interleaved, each image different."""
    folder = tmp_path_factory.mktemp("images")
    images = np.concatenate([textured_parts(5, seed=7), defective_parts[0][:5]])[
        [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]
    ]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(folder / f"{index:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


def chunked_reference(model, paths, chunk_size, return_maps=False):
    """What score_paths must return: the model on each chunk in turn, concatenated."""
    chunks = [paths[start : start + chunk_size] for start in range(0, len(paths), chunk_size)]
    if return_maps:
        results = [model.predict_map(chunk, return_scores=True) for chunk in chunks]
        return np.concatenate([s for _, s in results]), np.concatenate([m for m, _ in results])
    return np.concatenate([model.anomaly_score(chunk) for chunk in chunks])


# --------------------------------------------------------------------------
# score_paths
# --------------------------------------------------------------------------


def test_loky_workers_return_the_chunked_serial_scores_in_order(fitted, image_files):
    scores = score_paths(fitted, image_files, n_jobs=2, backend="loky", chunk_size=3)
    # Equal up to the rounding of torch's convolutions on the workers' fewer threads.
    np.testing.assert_allclose(scores, chunked_reference(fitted, image_files, 3), rtol=SCORE_RTOL)
    # Interleaved good / defective files: the order is the paths' order.
    assert (scores[1::2] > scores[0::2]).all()


def test_threads_return_scores_and_maps_in_order(fitted, image_files):
    scores, maps = score_paths(
        fitted, image_files, n_jobs=2, backend="threading", chunk_size=4, return_maps=True
    )
    expected_scores, expected_maps = chunked_reference(fitted, image_files, 4, return_maps=True)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(maps, expected_maps)
    assert maps.shape == (10, 64, 64) and maps.dtype == np.float32


def test_one_call_over_all_paths_agrees_within_the_batch_tolerance(fitted, image_files):
    scores, maps = score_paths(fitted, image_files, backend="threading", chunk_size=3, return_maps=True)
    whole_maps, whole_scores = fitted.predict_map(image_files, return_scores=True)
    np.testing.assert_allclose(scores, whole_scores, rtol=SCORE_RTOL)
    assert np.abs(maps - whole_maps).max() <= MAP_TOL * whole_maps.max()


def test_a_plain_pipeline_is_accepted(fitted, image_files):
    from sklearn.pipeline import Pipeline

    scores = score_paths(Pipeline(fitted.steps), image_files[:4], backend="threading", chunk_size=4)
    np.testing.assert_array_equal(scores, fitted.anomaly_score(image_files[:4]))


def test_a_loky_worker_reads_the_model_file_once_for_all_its_chunks(
    fitted, image_files, tmp_path, monkeypatch
):
    from skpatchcore import parallel

    model_file = str(tmp_path / "model.joblib")
    joblib.dump(fitted, model_file)
    reads = []
    monkeypatch.setattr(parallel.joblib, "load", lambda path: reads.append(path) or fitted)
    monkeypatch.setattr(parallel, "_WORKER_MODEL", {})
    for chunk in (image_files[:2], image_files[2:4]):
        parallel._score_chunk_from_file(model_file, chunk, return_maps=False, skip=False)
    assert reads == [model_file]


def test_a_dask_cluster_scores_shards_and_returns_them_in_order(fitted, image_files):
    distributed = pytest.importorskip("distributed")
    # Two worker processes on loopback: the model really travels to them.
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        scores, maps = score_paths(fitted, image_files, client=client, chunk_size=3, return_maps=True)
    expected_scores, expected_maps = chunked_reference(fitted, image_files, 3, return_maps=True)
    # Dask's worker processes run one torch thread each: equal up to that rounding.
    np.testing.assert_allclose(scores, expected_scores, rtol=SCORE_RTOL)
    assert np.abs(maps - expected_maps).max() <= MAP_TOL * expected_maps.max()
    assert (scores[1::2] > scores[0::2]).all()


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_unreadable_files_are_skipped_and_named_by_their_position(fitted, image_files, tmp_path, backend):
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(image_files[0]).tobytes()[:100])  # not a PNG at all
    missing = tmp_path / "missing.png"
    paths = [*image_files[:4], str(broken), *image_files[4:7], str(missing)]
    with pytest.warns(SkippedImagesWarning) as record:
        scores, maps = score_paths(
            fitted, paths, n_jobs=2, backend=backend, chunk_size=3, return_maps=True, on_error="skip"
        )
    skipped = record[0].message.skipped
    assert sorted(skipped) == [4, 8]
    assert skipped[4].startswith("paths[4] (") and "broken.png" in skipped[4]
    assert skipped[8].startswith("paths[8] (") and "missing.png" in skipped[8]
    assert np.isnan(scores[[4, 8]]).all() and np.isnan(maps[[4, 8]]).all()
    kept = [0, 1, 2, 3, 5, 6, 7]
    # The chunks holding a bad file were scored image by image: same values up to batching.
    np.testing.assert_allclose(scores[kept], fitted.anomaly_score(image_files[:7]), rtol=SCORE_RTOL)
    with pytest.raises(ImageReadError, match="broken.png"):
        score_paths(fitted, paths, backend="threading", chunk_size=3)


def test_nothing_readable_is_an_error(fitted, tmp_path):
    with pytest.raises(ImageReadError, match="No image of paths could be read"):
        score_paths(fitted, [str(tmp_path / "a.png"), str(tmp_path / "b.png")], on_error="skip")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"backend": "dask"}, ValueError, "'backend' parameter"),
        ({"chunk_size": 0}, ValueError, "'chunk_size' parameter"),
        ({"on_error": "ignore"}, ValueError, "'on_error' parameter"),
        ({"paths": []}, ValueError, "'paths' parameter is empty"),
        ({"paths": "one.png"}, TypeError, "sequence of paths"),
        ({"paths": [3]}, TypeError, r"paths\[0\]"),
        ({"client": object()}, TypeError, "dask.distributed.Client"),
    ],
)
def test_bad_arguments_are_named(fitted, image_files, kwargs, error, message):
    arguments = {"paths": image_files[:2], **kwargs}
    with pytest.raises(error, match=message):
        score_paths(fitted, **arguments)


def test_an_unfitted_model_or_a_bare_estimator_is_refused(fitted, image_files):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        score_paths(make_patchcore(**SMALL), image_files)
    with pytest.raises(TypeError, match="'model' parameter"):
        score_paths(fitted[-1], image_files)


# --------------------------------------------------------------------------
# Concurrency and determinism of the estimators
# --------------------------------------------------------------------------


def test_predict_and_predict_map_from_8_threads_at_once_equal_serial_calls(
    fitted, good_parts, defective_parts
):
    batches = [defective_parts[0], good_parts[:6], defective_parts[0][::-1], good_parts[6:]]
    serial = [(fitted.predict(X), *fitted.predict_map(X, return_scores=True)) for X in batches]
    start = threading.Barrier(8)

    def work(worker):
        start.wait()  # all eight threads call into the same model at the same moment
        X = batches[worker % len(batches)]
        return fitted.predict(X), *fitted.predict_map(X, return_scores=True)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    for worker, (labels, maps, scores) in enumerate(results):
        expected_labels, expected_maps, expected_scores = serial[worker % len(batches)]
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_array_equal(maps, expected_maps)
        np.testing.assert_array_equal(scores, expected_scores)


def test_fitting_twice_with_the_same_random_state_gives_identical_banks(fitted, good_parts):
    again = make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(good_parts)
    first, second = fitted.named_steps["detector"], again.named_steps["detector"]
    np.testing.assert_array_equal(second.memory_bank_, first.memory_bank_)
    np.testing.assert_array_equal(second.calibration_scores_, first.calibration_scores_)
    assert second.threshold_ == first.threshold_
    np.testing.assert_array_equal(again[1].sample_indices_, fitted[1].sample_indices_)
    other_seed = make_patchcore(ratio=0.25, random_state=1, **SMALL).fit(good_parts)
    assert not np.array_equal(other_seed[1].sample_indices_, fitted[1].sample_indices_)


@pytest.mark.parametrize("batch_size", [1, 3, 18])
def test_results_do_not_depend_on_the_batch_size_beyond_the_stated_tolerance(
    fitted, good_parts, defective_parts, batch_size
):
    X = np.concatenate([good_parts, defective_parts[0]])
    reference_features = fitted[0].transform(X)
    reference_maps, reference_scores = fitted.predict_map(X, return_scores=True)
    model = copy.deepcopy(fitted).set_params(features__batch_size=batch_size)
    features = model[0].transform(X)
    assert np.abs(features - reference_features).max() <= BATCH_FEATURE_TOL * np.abs(reference_features).max()
    maps, scores = model.predict_map(X, return_scores=True)
    np.testing.assert_allclose(scores, reference_scores, rtol=SCORE_RTOL)
    assert np.abs(maps - reference_maps).max() <= MAP_TOL * reference_maps.max()


# --------------------------------------------------------------------------
# fit_paths
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_files(tmp_path_factory):
    """Twelve good parts and two defective ones (positions 5 and 10), as PNG files."""
    folder = tmp_path_factory.mktemp("train")
    images = textured_parts(14, seed=9)
    images[[5, 10]] = textured_parts(2, defect=True, seed=10)[0]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(folder / f"{index:02d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths, np.where(np.isin(np.arange(14), [5, 10]), -1, 1)


@pytest.mark.parametrize("strategy", ["stream", "exact"])
def test_a_dask_cluster_fits_the_model_of_a_local_fit_with_the_same_chunks(training_files, strategy):
    """Workers compute the chunks' features and coresets, the client reduces them: the very
    model of a fit in this process with the same chunks (streamed: chunks of 3 good images;
    exact: the workers compute all the features). Dask's workers run torch on one thread,
    whose convolutions round differently (~1e-6): the local fit here does too."""
    distributed = pytest.importorskip("distributed")
    paths, y = training_files
    settings = {"ratio": 0.1, "strategy": strategy, "chunk_size": 3 * 64, "random_state": 0, **SMALL}
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            worker_dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        remote = fit_paths(make_patchcore(**settings), paths, y, client=client)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = make_patchcore(**settings).fit(paths, y)
    finally:
        torch.set_num_threads(threads)
    _, sampler, detector = (step for _, step in remote.steps)
    _, expected_sampler, expected = (step for _, step in local.steps)
    np.testing.assert_array_equal(sampler.sample_indices_, expected_sampler.sample_indices_)
    np.testing.assert_array_equal(detector.memory_bank_, expected.memory_bank_)
    np.testing.assert_array_equal(detector.calibration_scores_, expected.calibration_scores_)
    assert detector.threshold_ == expected.threshold_
    assert sampler.coreset_ is detector.memory_bank_
    assert not np.isin(sampler.sample_indices_ // 64, [5, 10]).any()
    assert len(detector.memory_bank_) == int(0.1 * 12 * 64)


def test_fit_paths_without_a_client_is_fit_and_refuses_other_models(training_files):
    paths, _ = training_files
    model = fit_paths(make_patchcore(ratio=0.1, random_state=0, **SMALL), paths[:4])
    expected = make_patchcore(ratio=0.1, random_state=0, **SMALL).fit(paths[:4])
    np.testing.assert_array_equal(model[-1].memory_bank_, expected[-1].memory_bank_)
    with pytest.raises(TypeError, match="'model' parameter must be a PatchCorePipeline"):
        fit_paths(PatchCoreDetector(), paths)
    with pytest.raises(TypeError, match="'client' parameter must be a dask.distributed.Client"):
        fit_paths(make_patchcore(**SMALL), paths, client=object())
