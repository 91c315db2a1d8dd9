"""The three steps together: make_patchcore, Pipeline, GridSearchCV, clone, joblib."""

from __future__ import annotations

import io
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

from skpatchcore import (
    GreedyCoresetSampler,
    ModelVersionWarning,
    PatchCoreDetector,
    PatchCorePipeline,
    PatchFeatureTransformer,
    make_patchcore,
)

from ._precision import PER_BACKEND, bfloat16_settings, cpu_matmul_precision
from .conftest import textured_parts

SMALL = {"backbone": "efficientnet_lite0", "image_size": 64, "crop_size": None, "device": "cpu"}


@pytest.fixture(scope="module")
def fitted(good_parts):
    return make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(good_parts)


def test_make_patchcore_routes_each_parameter_to_its_step():
    model = make_patchcore(
        backbone="resnet18", crop_size=None, ratio=0.02, random_state=7, n_neighbors=3, device="cpu"
    )
    assert isinstance(model, PatchCorePipeline)
    assert [name for name, _ in model.steps] == ["features", "coreset", "detector"]
    params = model.get_params()
    assert params["features__backbone"] == "resnet18" and params["features__crop_size"] is None
    assert params["coreset__ratio"] == 0.02 and params["coreset__random_state"] == 7
    assert params["detector__n_neighbors"] == 3
    assert params["features__device"] == params["coreset__device"] == params["detector__device"] == "cpu"


def test_make_patchcore_rejects_unknown_parameters_listing_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['ration'\].*ratio"):
        make_patchcore(ration=0.1)


def test_set_params_and_clone_reach_nested_steps():
    model = make_patchcore(**SMALL)
    model.set_params(coreset__ratio=0.3)
    copy = clone(model)
    assert copy.get_params()["coreset__ratio"] == 0.3
    assert copy.named_steps["coreset"] is not model.named_steps["coreset"]


def test_maps_from_images_are_at_the_model_input_size_and_find_the_defect(fitted, defective_parts):
    images, masks = defective_parts
    maps, scores = fitted.predict_map(images, return_scores=True)
    assert maps.shape == (len(images), 64, 64)
    np.testing.assert_array_equal(scores, fitted.anomaly_score(images))
    for heat, mask in zip(maps, masks):
        assert (
            mask[np.unravel_index(heat.argmax(), heat.shape)] or heat[mask].mean() > heat[~mask].mean() * 1.5
        )


def test_defective_parts_score_higher_than_good_ones(fitted, defective_parts):
    good = textured_parts(6, seed=20)
    assert fitted.anomaly_score(defective_parts[0]).min() > fitted.anomaly_score(good).max()
    assert (fitted.predict(defective_parts[0]) == -1).all()
    # decision_function searches all features at once, anomaly_score batch by batch: BLAS
    # blocking differs, so the two agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(
        fitted.decision_function(good),
        fitted.named_steps["detector"].threshold_ - fitted.anomaly_score(good),
        rtol=1e-5,
    )


def test_plain_sklearn_pipeline_gives_the_same_scores(fitted, good_parts, defective_parts):
    plain = Pipeline(
        [
            (
                "features",
                PatchFeatureTransformer(
                    image_size=64, crop_size=None, backbone="efficientnet_lite0", device="cpu"
                ),
            ),
            ("coreset", GreedyCoresetSampler(ratio=0.25, random_state=0, device="cpu")),
            ("detector", PatchCoreDetector(device="cpu")),
        ]
    ).fit(good_parts)
    images = defective_parts[0]
    np.testing.assert_array_equal(plain.score_samples(images), fitted.score_samples(images))


def test_only_good_images_enter_the_bank_when_labels_are_given(good_parts, defective_parts):
    X = np.concatenate([good_parts, defective_parts[0]])
    y = np.r_[np.ones(len(good_parts)), -np.ones(len(defective_parts[0]))].astype(int)
    labelled = make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(X, y)
    good_only = make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(good_parts)
    np.testing.assert_array_equal(
        labelled.named_steps["detector"].memory_bank_, good_only.named_steps["detector"].memory_bank_
    )


def test_grid_search_over_coreset_ratio_with_roc_auc(good_parts, defective_parts):
    X = np.concatenate([good_parts, textured_parts(6, seed=30), defective_parts[0]])
    y = np.r_[np.ones(18), -np.ones(6)].astype(int)
    search = GridSearchCV(
        make_patchcore(random_state=0, **SMALL),
        {"coreset__ratio": [0.05, 0.5]},
        scoring="roc_auc",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
    ).fit(X, y)
    assert search.best_params_["coreset__ratio"] in (0.05, 0.5)
    assert search.cv_results_["mean_test_score"].min() > 0.9


def test_feature_caching_with_pipeline_memory(tmp_path, good_parts):
    model = make_patchcore(ratio=0.25, random_state=0, memory=str(tmp_path), **SMALL)
    first = model.fit(good_parts).named_steps["detector"].memory_bank_
    second = model.set_params(coreset__ratio=0.5).fit(good_parts).named_steps["detector"].memory_bank_
    assert len(second) == 2 * len(first)
    assert any(tmp_path.rglob("*.pkl")) or any(tmp_path.rglob("output.pkl")) or any(tmp_path.iterdir())


def test_joblib_round_trip_gives_bit_identical_scores_and_maps(fitted, defective_parts):
    buffer = io.BytesIO()
    joblib.dump(fitted, buffer)
    buffer.seek(0)
    loaded = joblib.load(buffer)
    images = defective_parts[0]
    np.testing.assert_array_equal(loaded.predict_map(images), fitted.predict_map(images))
    np.testing.assert_array_equal(loaded.decision_function(images), fitted.decision_function(images))


def test_pickles_hold_no_native_index_or_named_backbone_weights(fitted):
    state = fitted.named_steps["detector"].__getstate__()
    assert "_index" not in state
    assert fitted.named_steps["features"].__getstate__()["backbone_"] is None


def test_model_fitted_on_cuda_loads_on_a_cpu_only_machine(fitted, defective_parts, monkeypatch):
    # Simulate a GPU fit: the pickled state records CUDA devices, as a real GPU fit would.
    features, detector = fitted.named_steps["features"], fitted.named_steps["detector"]
    monkeypatch.setattr(features, "device_", torch.device("cuda"))
    monkeypatch.setattr(detector, "device_", torch.device("cuda:0"))
    blob = io.BytesIO()
    joblib.dump(fitted, blob)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    blob.seek(0)
    with pytest.warns(UserWarning, match="fitted on cuda.*runs on the CPU"):
        loaded = joblib.load(blob)
    assert loaded.named_steps["detector"].device_.type == "cpu"
    assert loaded.named_steps["features"].device_.type == "cpu"
    images = defective_parts[0]
    np.testing.assert_array_equal(loaded.score_samples(images), fitted.score_samples(images))


def test_loading_a_pickle_from_another_version_warns(fitted):
    state = fitted.named_steps["coreset"].__getstate__()
    state["_skpatchcore_version"] = "0.0.1"
    restored = GreedyCoresetSampler.__new__(GreedyCoresetSampler)
    with pytest.warns(ModelVersionWarning, match="from skpatchcore 0.0.1"):
        restored.__setstate__(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        joblib.load(_dumped(fitted.named_steps["coreset"]))


def _dumped(obj):
    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    buffer.seek(0)
    return buffer


def test_predict_map_needs_the_feature_step_first(fitted):
    broken = PatchCorePipeline([("coreset", GreedyCoresetSampler()), ("detector", PatchCoreDetector())])
    broken.fit(np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    with pytest.raises(TypeError, match="PatchFeatureTransformer as the first step"):
        broken.predict_map(np.zeros((1, 4), np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_scores_and_maps(good_parts, defective_parts):
    images = defective_parts[0]
    cpu = make_patchcore(ratio=1.0, **SMALL).fit(good_parts)
    cuda = make_patchcore(ratio=1.0, **{**SMALL, "device": "cuda"}).fit(good_parts)
    cpu_maps, cpu_scores = cpu.predict_map(images, return_scores=True)
    cuda_maps, cuda_scores = cuda.predict_map(images, return_scores=True)
    np.testing.assert_allclose(cuda_scores, cpu_scores, rtol=1e-4)
    assert np.abs(cuda_maps - cpu_maps).max() <= 1e-4 * np.abs(cpu_maps).max()


@pytest.mark.parametrize("setting", bfloat16_settings(), ids=lambda s: s[0])
def test_bfloat16_set_elsewhere_in_the_process_changes_no_result(
    setting, clean_precision, good_parts, defective_parts
):
    """A process-wide bfloat16 setting (made for some other model) must not reach our CPU
    products: fitted again, the model gives bit-identical scores and maps, and the user's
    setting is still in place afterwards."""
    images = defective_parts[0][:3]
    expected_maps, expected_scores = (
        make_patchcore(ratio=0.25, random_state=0, **SMALL)
        .fit(good_parts)
        .predict_map(images, return_scores=True)
    )
    a = torch.from_numpy(np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32))

    def probe():  # a product and a convolution, as torch runs them now
        return a @ a, torch.nn.functional.conv2d(a[None, None], a[None, None, :5, :5])

    exact = probe()
    setting[1]()
    chosen = _readable_settings()
    if all(torch.equal(now, then) for now, then in zip(probe(), exact)):
        pytest.skip("this CPU runs float32 products in float32 whatever the setting")
    model = make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(good_parts)
    maps, scores = model.predict_map(images, return_scores=True)
    assert _readable_settings() == chosen  # the user's setting, untouched
    assert not all(torch.equal(now, then) for now, then in zip(probe(), exact))
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(maps, expected_maps)


def _readable_settings():
    backends = torch.backends
    owners = [backends, backends.mkldnn, getattr(backends.mkldnn, "matmul", None)]
    owners += [getattr(backends.mkldnn, "conv", None), getattr(backends.cuda, "matmul", None)]
    values = [getattr(owner, "fp32_precision", None) for owner in owners]
    return values + [torch.get_float32_matmul_precision()]


@pytest.mark.skipif(not PER_BACKEND, reason="torch < 2.9 has one global precision setting")
def test_settings_left_to_follow_their_parent_still_follow_it_afterwards(clean_precision):
    """A per-operation setting the user left at "none" reads as its parent's value; after our
    pin it must still follow the parent (not stay at the value it read), while one the user
    set explicitly keeps that value."""
    from skpatchcore.utils._device import float32_precision

    backends = torch.backends
    backends.fp32_precision = "bf16"
    with float32_precision():
        assert cpu_matmul_precision() == "ieee"
    backends.fp32_precision = "ieee"  # the user changes their mind
    assert backends.mkldnn.matmul.fp32_precision == "ieee"
    assert backends.mkldnn.conv.fp32_precision == "ieee"
    backends.fp32_precision = "none"
    backends.mkldnn.matmul.fp32_precision = "bf16"  # explicit: stays
    with float32_precision():
        pass
    backends.fp32_precision = "ieee"
    assert backends.mkldnn.matmul.fp32_precision == "bf16"
    assert backends.mkldnn.conv.fp32_precision == "ieee"


@pytest.mark.skipif(not PER_BACKEND, reason="torch < 2.9: the legacy allow_tf32 flags")
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_cuda_precision_is_set_and_given_back_per_backend(monkeypatch, clean_precision, allow_tf32):
    """On a CUDA machine (faked: the settings are plain flags) the pin sets CUDA's matmul and
    cuDNN's convolutions to float32 or TF32 and gives the user's settings back, legacy
    getter included."""
    from skpatchcore.utils._device import float32_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.set_float32_matmul_precision("medium")
    before = _readable_settings() + [torch.backends.cudnn.conv.fp32_precision]
    with float32_precision(allow_tf32):
        wanted = "tf32" if allow_tf32 else "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == wanted
        assert torch.backends.cudnn.conv.fp32_precision == wanted
        assert cpu_matmul_precision() == "ieee"
    assert _readable_settings() + [torch.backends.cudnn.conv.fp32_precision] == before
    assert torch.get_float32_matmul_precision() == "medium"


def test_float32_pin_holds_while_any_thread_is_inside_and_then_restores(clean_precision):
    """Threads compute side by side inside float32_precision: the first one in sets float32,
    the last one out restores the user's setting (not the first one out)."""
    import threading

    from skpatchcore.utils._device import float32_precision

    inside, leave_first, first_left = threading.Barrier(2), threading.Event(), threading.Event()
    seen = {}

    def worker(name, wait_for):
        with float32_precision():
            inside.wait()
            wait_for.wait()
            seen[name] = cpu_matmul_precision()
        if name == "first":
            first_left.set()

    torch.set_float32_matmul_precision("medium")
    first = threading.Thread(target=worker, args=("first", leave_first))
    second = threading.Thread(target=worker, args=("second", first_left))
    first.start(), second.start()
    leave_first.set()
    first.join(), second.join()
    assert seen == {"first": "ieee", "second": "ieee"}  # still float32 after the first left
    assert cpu_matmul_precision() != "ieee"  # the user's "medium" is back
    assert torch.get_float32_matmul_precision() == "medium"
