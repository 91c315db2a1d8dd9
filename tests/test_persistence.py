"""Safe model files: skpatchcore.save / skpatchcore.load (no pickle, everything checked)."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from skpatchcore import (
    BackboneError,
    GreedyCoresetSampler,
    ModelFileError,
    PatchCoreDetector,
    PatchCorePipeline,
    PatchFeatureTransformer,
    load,
    make_patchcore,
    save,
)
from skpatchcore._persistence import FORMAT_NAME, FORMAT_VERSION

SMALL = {"backbone": "efficientnet_lite0", "image_size": 64, "crop_size": None, "device": "cpu"}
MEMBERS = ["skpatchcore-model", "arrays.safetensors", "manifest.json", "manifest.sha256"]


@pytest.fixture(scope="module")
def fitted(good_parts):
    return make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(good_parts)


@pytest.fixture(scope="module")
def model_file(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "parts.skpatchcore"
    save(fitted, path)
    return path


def read_members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_members(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return Path(path)


def rewritten(source, target, *, edit=None, replace=None, checksums=True) -> Path:
    """A copy of a model file with its manifest edited and/or members replaced.

    With ``checksums=True`` every checksum is recomputed, as a careful forger would.
    """
    members = read_members(source)
    manifest = json.loads(members["manifest.json"])
    for name, data in (replace or {}).items():
        members[name] = data
        if checksums:
            manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if edit is not None:
        edit(manifest)
    if edit is not None or checksums:
        members["manifest.json"] = json.dumps(manifest).encode()
    if checksums:
        members["manifest.sha256"] = hashlib.sha256(members["manifest.json"]).hexdigest().encode()
    return write_members(target, members)


def step_entry(manifest, name):
    return next(step["estimator"] for step in manifest["model"]["steps"] if step["name"] == name)


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


def test_pipeline_round_trip_gives_bit_identical_scores_and_maps(fitted, model_file, defective_parts):
    loaded = load(model_file)
    assert type(loaded) is PatchCorePipeline
    assert [name for name, _ in loaded.steps] == ["features", "coreset", "detector"]
    assert loaded.get_params(deep=True).keys() == fitted.get_params(deep=True).keys()
    for name, step in fitted.steps:
        assert loaded.named_steps[name].get_params() == step.get_params()
    images = defective_parts[0]
    maps, scores = loaded.predict_map(images, return_scores=True)
    expected_maps, expected_scores = fitted.predict_map(images, return_scores=True)
    np.testing.assert_array_equal(maps, expected_maps)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(loaded.decision_function(images), fitted.decision_function(images))
    np.testing.assert_array_equal(loaded.predict(images), fitted.predict(images))
    detector, expected = loaded.named_steps["detector"], fitted.named_steps["detector"]
    np.testing.assert_array_equal(detector.memory_bank_, expected.memory_bank_)
    np.testing.assert_array_equal(detector.calibration_scores_, expected.calibration_scores_)
    assert (detector.threshold_, detector.offset_) == (expected.threshold_, expected.offset_)
    np.testing.assert_array_equal(
        loaded.named_steps["coreset"].sample_indices_, fitted.named_steps["coreset"].sample_indices_
    )
    features = loaded.named_steps["features"]
    assert features.geometry_ == fitted.named_steps["features"].geometry_
    assert features.backbone_fingerprint_ == fitted.named_steps["features"].backbone_fingerprint_


def test_a_model_file_gets_the_permissions_of_any_new_file(fitted, tmp_path):
    """Not the private 0600 of the temporary file it is written through (a service must read it)."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        save(fitted[-1], tmp_path / "detector.skpatchcore")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "detector.skpatchcore").st_mode) == 0o644


def test_plain_sklearn_pipeline_loads_as_a_patchcore_pipeline(fitted, tmp_path, defective_parts):
    plain = Pipeline(fitted.steps)
    save(plain, tmp_path / "plain.skpatchcore")
    loaded = load(tmp_path / "plain.skpatchcore")
    assert type(loaded) is PatchCorePipeline
    images = defective_parts[0]
    np.testing.assert_array_equal(loaded.score_samples(images), plain.score_samples(images))
    np.testing.assert_array_equal(loaded.predict_map(images), fitted.predict_map(images))


def test_a_passthrough_step_is_kept(fitted, tmp_path, defective_parts):
    pipe = PatchCorePipeline([("features", fitted[0]), ("coreset", "passthrough"), ("detector", fitted[-1])])
    save(pipe, tmp_path / "passthrough.skpatchcore")
    loaded = load(tmp_path / "passthrough.skpatchcore")
    assert loaded.named_steps["coreset"] == "passthrough"
    np.testing.assert_array_equal(
        loaded.anomaly_score(defective_parts[0]), pipe.anomaly_score(defective_parts[0])
    )


def test_each_estimator_round_trips_alone(fitted, tmp_path, defective_parts):
    features, coreset, detector = (step for _, step in fitted.steps)
    images = defective_parts[0]
    patches = features.transform(images)
    for estimator in (features, coreset, detector):
        path = tmp_path / f"{type(estimator).__name__}.skpatchcore"
        save(estimator, path)
        loaded = load(path)
        assert type(loaded) is type(estimator)
        assert loaded.get_params() == estimator.get_params()
    np.testing.assert_array_equal(
        load(tmp_path / "PatchFeatureTransformer.skpatchcore").transform(images), patches
    )
    sampler = load(tmp_path / "GreedyCoresetSampler.skpatchcore")
    np.testing.assert_array_equal(sampler.sample_indices_, coreset.sample_indices_)
    assert (sampler.n_features_in_, sampler.n_patches_seen_) == (
        coreset.n_features_in_,
        coreset.n_patches_seen_,
    )
    np.testing.assert_array_equal(
        load(tmp_path / "PatchCoreDetector.skpatchcore").predict_map(patches, (64, 64)),
        detector.predict_map(patches, (64, 64)),
    )


def test_every_kind_of_parameter_value_round_trips(tmp_path, good_parts):
    features = PatchFeatureTransformer(
        backbone="efficientnet_lite0",
        layers=["blocks.2", "blocks.4"],
        image_size=(64, 48),
        crop_size=(32, 32),
        aggregation="mean",
        target_dim=64,
        batch_size=3,
        device=torch.device("cpu"),
    ).fit(good_parts[:2])
    rng = np.random.default_rng(0)
    detector = PatchCoreDetector(
        n_neighbors=2,
        reweight_neighbors=3,
        distance="squared",
        contamination=0.1,
        sigma=2.5,
        upsampling="nearest",
        index={"kind": "ivf", "nprobe": 2},
        device="cpu",
    ).fit(rng.normal(size=(300, 8)).astype(np.float32))
    for estimator in (features, detector):
        path = tmp_path / "model.skpatchcore"
        save(estimator, path)
        params = load(path).get_params()
        assert params == estimator.get_params()
        assert {key: type(value) for key, value in params.items()} == {
            key: type(value) for key, value in estimator.get_params().items()
        }
    assert load(tmp_path / "model.skpatchcore")._index.options["nprobe"] == 2


def test_a_letterbox_geometry_round_trips(tmp_path, good_parts):
    features = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=64, crop_size=64, resize_side="longer", device="cpu"
    ).fit(good_parts[:1])
    path = tmp_path / "letterbox.skpatchcore"
    save(features, path)
    loaded = load(path)
    assert loaded.resize_side == "longer" and loaded.geometry_ == features.geometry_
    np.testing.assert_array_equal(loaded.transform(good_parts[1:3]), features.transform(good_parts[1:3]))


def test_the_same_model_always_gives_the_same_bytes(fitted, model_file, tmp_path):
    save(fitted, tmp_path / "again.skpatchcore")
    assert (tmp_path / "again.skpatchcore").read_bytes() == model_file.read_bytes()


# --------------------------------------------------------------------------
# What the file holds
# --------------------------------------------------------------------------


def test_the_file_is_a_stored_zip_of_json_and_safetensors_with_checksums(fitted, model_file):
    with zipfile.ZipFile(model_file) as archive:
        infos = archive.infolist()
    assert [info.filename for info in infos] == MEMBERS
    assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)
    members = read_members(model_file)
    assert hashlib.sha256(members["manifest.json"]).hexdigest() == members["manifest.sha256"].decode().strip()
    manifest = json.loads(members["manifest.json"])
    assert (manifest["format"], manifest["format_version"]) == (FORMAT_NAME, FORMAT_VERSION)
    assert set(manifest["written_by"]) == {
        "skpatchcore",
        "python",
        "numpy",
        "torch",
        "faiss",
        "safetensors",
        "scikit-learn",
    }
    for name, record in manifest["members"].items():
        assert record == {"size": len(members[name]), "sha256": hashlib.sha256(members[name]).hexdigest()}
    steps = manifest["model"]["steps"]
    assert [(s["name"], s["estimator"]["class"]) for s in steps] == [
        ("features", "PatchFeatureTransformer"),
        ("coreset", "GreedyCoresetSampler"),
        ("detector", "PatchCoreDetector"),
    ]
    features = step_entry(manifest, "features")
    assert features["params"]["backbone"] == "efficientnet_lite0"
    assert features["params"]["weights"] == "imagenet"
    assert features["fitted"]["geometry_"] == {"image_size": 64, "crop_size": None, "resize_side": "longer"}
    assert features["fitted"]["backbone_fingerprint_"] == fitted[0].backbone_fingerprint_
    assert step_entry(manifest, "detector")["fitted"]["threshold_"] == fitted[-1].threshold_
    from safetensors.numpy import load as load_arrays

    arrays = load_arrays(members["arrays.safetensors"])
    np.testing.assert_array_equal(arrays["steps.2.memory_bank_"], fitted[-1].memory_bank_)


def test_loading_never_unpickles(model_file, monkeypatch, defective_parts):
    def refuse(*args, **kwargs):
        raise AssertionError("load() must not unpickle anything")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(joblib, "load", refuse)
    # The named backbone's ImageNet weights come from its installed package, read
    # with torch's restricted (weights-only) loader; the model file never is.
    torch_load = torch.load

    def weights_only_load(source, *args, **kwargs):
        assert kwargs.get("weights_only") is True and Path(source) != model_file
        return torch_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    assert load(model_file).predict(defective_parts[0]).shape == (6,)


# --------------------------------------------------------------------------
# Files that are refused, each with one line
# --------------------------------------------------------------------------


def _flip_a_bank_byte(source, target):
    data = bytearray(source.read_bytes())
    start = data.index(b"arrays.safetensors") + 400  # inside the stored arrays member
    data[start] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def _bump_threshold(manifest):
    step_entry(manifest, "detector")["fitted"]["threshold_"] += 1.0


def _zero_bank(source):
    from safetensors.numpy import load as load_arrays
    from safetensors.numpy import save as save_arrays

    arrays = load_arrays(read_members(source)["arrays.safetensors"])
    arrays["steps.2.memory_bank_"] = np.zeros_like(arrays["steps.2.memory_bank_"])
    return save_arrays(arrays)


def _set(manifest, step, section, key, value):
    step_entry(manifest, step)[section][key] = value


REFUSED = {
    "a byte of the bank flipped in place": (
        lambda src, dst: _flip_a_bank_byte(src, dst),
        "damaged or was modified",
    ),
    "the bank replaced, zip CRC valid, manifest untouched": (
        lambda src, dst: rewritten(
            src, dst, replace={"arrays.safetensors": _zero_bank(src)}, checksums=False
        ),
        "member 'arrays.safetensors' does not match its SHA-256",
    ),
    "the threshold edited, manifest checksum not updated": (
        lambda src, dst: rewritten(src, dst, edit=_bump_threshold, checksums=False),
        "manifest.json does not match its SHA-256",
    ),
    "truncated to half": (
        lambda src, dst: dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2]) and dst,
        "is truncated or damaged",
    ),
    "the last byte cut": (
        lambda src, dst: dst.write_bytes(src.read_bytes()[:-1]) and dst,
        "is truncated or damaged",
    ),
    "a newer format version": (
        lambda src, dst: rewritten(src, dst, edit=lambda m: m.update(format_version=FORMAT_VERSION + 1)),
        "upgrade skpatchcore",
    ),
    "another format name": (
        lambda src, dst: rewritten(src, dst, edit=lambda m: m.update(format="something-else")),
        "is not a skpatchcore model file",
    ),
    "a text file": (lambda src, dst: dst.write_text("hello") and dst, "is not a skpatchcore model file"),
    "an empty file": (lambda src, dst: dst.write_bytes(b"") or dst, "is not a skpatchcore model file"),
    "a joblib pickle": (
        lambda src, dst: joblib.dump({"weights": [1, 2, 3]}, dst) and dst,
        "is not a skpatchcore model file",
    ),
    "a foreign zip": (
        lambda src, dst: write_members(dst, {"data.csv": b"a,b\n1,2\n"}),
        "is not a skpatchcore model file",
    ),
    "an extra member": (
        lambda src, dst: write_members(dst, {**read_members(src), "payload.pkl": pickle.dumps(1)}),
        "not in the manifest",
    ),
    "compressed members": (
        lambda src, dst: write_members(dst, read_members(src), zipfile.ZIP_DEFLATED),
        "is compressed",
    ),
    "an unknown estimator class": (
        lambda src, dst: rewritten(
            src, dst, edit=lambda m: step_entry(m, "coreset").update({"class": "os.system"})
        ),
        "not one of skpatchcore's",
    ),
    "a parameter of the wrong type": (
        lambda src, dst: rewritten(
            src, dst, edit=lambda m: _set(m, "detector", "params", "n_neighbors", "__import__('os')")
        ),
        "'n_neighbors' parameter",
    ),
    "an unknown parameter": (
        lambda src, dst: rewritten(src, dst, edit=lambda m: _set(m, "detector", "params", "evil", 1)),
        "invalid parameters",
    ),
    "an unknown value tag": (
        lambda src, dst: rewritten(
            src, dst, edit=lambda m: _set(m, "detector", "params", "sigma", {"$pickle": "gASV"})
        ),
        "cannot hold",
    ),
    "a bank shape the manifest does not list": (
        lambda src, dst: rewritten(
            src, dst, edit=lambda m: step_entry(m, "detector")["arrays"]["memory_bank_"].update(shape=[1, 2])
        ),
        "the manifest says",
    ),
    "an unknown device": (
        lambda src, dst: rewritten(
            src, dst, edit=lambda m: _set(m, "detector", "fitted", "device_", "quantum:0")
        ),
        "device_ must name a CPU or CUDA device",
    ),
    "a threshold that disagrees with the offset": (
        lambda src, dst: rewritten(src, dst, edit=_bump_threshold),
        "disagree",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_file_is_refused_with_one_line(case, model_file, tmp_path):
    make, message = REFUSED[case]
    bad = make(model_file, tmp_path / "bad.skpatchcore")
    with pytest.raises(ModelFileError, match=message) as raised:
        load(bad)
    assert "\n" not in str(raised.value)
    assert str(bad) in str(raised.value)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.skpatchcore")
    with pytest.raises(ModelFileError, match="is a folder"):
        load(tmp_path)


def test_a_named_backbone_whose_weights_differ_here_is_refused(model_file, tmp_path):
    bad = rewritten(
        model_file,
        tmp_path / "other-weights.skpatchcore",
        edit=lambda m: _set(m, "features", "fitted", "backbone_fingerprint_", "0" * 64),
    )
    with pytest.raises(BackboneError, match="differ from the ones the model was fitted with"):
        load(bad)
    with pytest.raises(BackboneError, match="do not pass backbone="):
        load(model_file, backbone=nn.Conv2d(3, 3, 1))


# --------------------------------------------------------------------------
# What save() refuses
# --------------------------------------------------------------------------


def test_save_refuses_unfitted_and_foreign_models(tmp_path, fitted):
    with pytest.raises(NotFittedError):
        save(make_patchcore(**SMALL), tmp_path / "unfitted.skpatchcore")
    with pytest.raises(TypeError, match="IsolationForest"):
        save(IsolationForest().fit(np.zeros((4, 2))), tmp_path / "forest.skpatchcore")
    scaled = Pipeline([("scale", StandardScaler().fit(np.zeros((4, 2)))), ("detector", fitted[-1])])
    with pytest.raises(TypeError, match="StandardScaler"):
        save(scaled, tmp_path / "scaled.skpatchcore")
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_save_refuses_a_random_state_instance_naming_the_parameter(tmp_path):
    sampler = GreedyCoresetSampler(ratio=0.5, random_state=np.random.RandomState(0))
    sampler.fit(np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    with pytest.raises(TypeError, match="GreedyCoresetSampler parameter 'random_state'.*an int seed or None"):
        save(sampler, tmp_path / "sampler.skpatchcore")


# --------------------------------------------------------------------------
# A user's own backbone module
# --------------------------------------------------------------------------


class TinyNet(nn.Module):
    """A small CNN with two stages at strides 4 and 8."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.stage1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.stage2 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)

    def forward(self, x):
        return self.stage2(torch.relu(self.stage1(torch.relu(self.stem(x)))))


def tiny_net_model(good_parts):
    torch.manual_seed(0)
    return make_patchcore(
        backbone=TinyNet(),
        layers=["stage1", "stage2"],
        pretrain_dim=64,
        target_dim=64,
        ratio=0.5,
        random_state=0,
        **{key: value for key, value in SMALL.items() if key != "backbone"},
    ).fit(good_parts)


def test_a_user_backbone_is_stored_as_weights_and_needs_its_architecture(
    tmp_path, good_parts, defective_parts
):
    model = tiny_net_model(good_parts)
    path = tmp_path / "tiny.skpatchcore"
    save(model, path)
    assert "backbone.safetensors" in read_members(path)
    with pytest.raises(BackboneError, match=r"user's backbone module \(TinyNet\); pass a module"):
        load(path)
    with pytest.raises(BackboneError, match="does not fit the weights"):
        load(path, backbone=TinyNet(width=4))
    torch.manual_seed(1)  # other random weights: the stored ones must replace them
    loaded = load(path, backbone=TinyNet())
    images = defective_parts[0]
    np.testing.assert_array_equal(loaded.predict_map(images), model.predict_map(images))
    np.testing.assert_array_equal(loaded.decision_function(images), model.decision_function(images))


def test_a_user_backbone_pipeline_survives_joblib_and_deepcopy(good_parts, defective_parts):
    """The stage hooks belong to the extractor they were made for, also in a copy."""
    import copy
    import io

    model = tiny_net_model(good_parts)
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    buffer.seek(0)
    images = defective_parts[0]
    expected = model.decision_function(images)
    np.testing.assert_array_equal(joblib.load(buffer).decision_function(images), expected)
    extractor = model.steps[0][1].backbone_
    twin = copy.deepcopy(extractor)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        for a, b in zip(twin(x), extractor(x)):
            assert torch.equal(a, b)
    np.testing.assert_array_equal(copy.deepcopy(model).decision_function(images), expected)


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def test_a_model_fitted_on_cuda_loads_on_the_cpu_with_a_warning(
    model_file, tmp_path, monkeypatch, fitted, defective_parts
):
    def on_cuda(manifest):
        _set(manifest, "features", "fitted", "device_", "cuda")
        _set(manifest, "detector", "fitted", "device_", "cuda:0")

    gpu_file = rewritten(model_file, tmp_path / "gpu.skpatchcore", edit=on_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="fitted on cuda.*runs on the CPU"):
        loaded = load(gpu_file)
    assert loaded[0].device_ == loaded[-1].device_ == torch.device("cpu")
    images = defective_parts[0]
    np.testing.assert_array_equal(loaded.anomaly_score(images), fitted.anomaly_score(images))


def test_an_explicit_device_is_checked_and_used(model_file, monkeypatch):
    loaded = load(model_file, device="cpu")
    assert loaded[0].device_ == loaded[-1].device_ == torch.device("cpu")
    assert loaded[0].get_params()["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load(model_file, device="cuda")


def test_a_file_from_before_resize_side_keeps_resizing_the_shorter_side(model_file, tmp_path):
    def drop_resize_side(manifest):
        manifest["format_version"] = 1
        entry = step_entry(manifest, "features")
        del entry["params"]["resize_side"]
        del entry["fitted"]["geometry_"]["resize_side"]

    loaded = load(rewritten(model_file, tmp_path / "old.skpatchcore", edit=drop_resize_side))
    features = loaded.named_steps["features"]
    assert features.resize_side == "shorter" and features.geometry_.resize_side == "shorter"


def test_a_pickle_from_before_resize_side_keeps_resizing_the_shorter_side(fitted):
    state = fitted.named_steps["features"].__getstate__()
    del state["resize_side"]
    state["geometry_"] = pickle.loads(pickle.dumps(state["geometry_"]))
    object.__delattr__(state["geometry_"], "resize_side")  # as pickled before the field existed
    restored = PatchFeatureTransformer.__new__(PatchFeatureTransformer)
    restored.__setstate__(state)
    assert restored.get_params()["resize_side"] == "shorter"
    assert restored.geometry_.resize_side == "shorter"


def test_a_rewritten_copy_with_valid_checksums_still_loads(model_file, tmp_path):
    # The helper behind the refused files above changes nothing by itself.
    assert isinstance(load(rewritten(model_file, tmp_path / "copy.skpatchcore")), PatchCorePipeline)
