"""Deployment without torch: skpatchcore.export_onnx and skpatchcore.runtime.OnnxPatchCore.

The exported file must score and map images as the pipeline it came from
(within 1e-4, relative), read them with the same code, keep its metadata,
refuse a modified file, and run in a process where torch cannot be imported.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError
from torch import nn

import skpatchcore
import skpatchcore._export as export_module
from skpatchcore import ModelFileError, SkippedImagesWarning, export_onnx, make_patchcore, save
from skpatchcore._demo import make_demo_dataset
from skpatchcore.cli import main
from skpatchcore.runtime import DIGEST_KEY, FLOAT_INPUT, METADATA_KEY, UINT8_INPUT, OnnxPatchCore

from .conftest import textured_parts

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "backbone": "efficientnet_lite0",
    "image_size": 64,
    "crop_size": 64,
    "device": "cpu",
    "random_state": 0,
}
RTOL = 1e-4


@pytest.fixture(scope="module")
def fitted(scoring_parts):
    return make_patchcore(ratio=0.1, **SMALL).fit(scoring_parts[0])


@pytest.fixture(scope="module")
def onnx_file(fitted, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "parts.onnx"
    export_onnx(fitted, path)  # with the check after writing
    return path


def assert_same_results(runtime, model, X):
    maps, scores = model.predict_map(X, return_scores=True)
    onnx_maps, onnx_scores = runtime.predict_map(X, return_scores=True)
    np.testing.assert_allclose(onnx_scores, scores, rtol=RTOL)
    np.testing.assert_allclose(onnx_maps, maps, rtol=RTOL)
    return maps, scores


def export_and_load(model, tmp_path, **kwargs) -> OnnxPatchCore:
    path = tmp_path / "model.onnx"
    export_onnx(model, path, check=False, **kwargs)
    return OnnxPatchCore(path)


# --------------------------------------------------------------------------
# The file scores as the pipeline does
# --------------------------------------------------------------------------


def test_scores_and_maps_equal_the_pipeline(fitted, onnx_file, scoring_parts):
    runtime = OnnxPatchCore(onnx_file)
    maps, scores = assert_same_results(runtime, fitted, scoring_parts[1])
    assert maps.shape == (5, 64, 64)
    assert scores[2:].min() > scores[:2].max()  # the defective parts score higher


class TinyNet(nn.Module):
    """A user's own backbone: two stages, stride 2 and 4."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU())
        for parameter in self.parameters():
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, x):
        return self.stage2(self.stage1(self.stem(x)))


@pytest.mark.parametrize(
    "settings",
    [
        {"aggregation": "reference"},
        {"n_neighbors": 3, "reweight_neighbors": 4, "distance": "squared", "sigma": 0.0},
        {"reweight_neighbors": 3, "upsampling": "nearest", "crop_size": (64, 48), "image_size": 80},
        {"backbone": TinyNet(), "layers": ["stage1", "stage2"], "target_dim": 20},
    ],
    ids=["reference", "k3-eq7-squared-sigma0", "eq7-nearest-nonsquare", "user-module"],
)
def test_every_scoring_setting_is_in_the_graph(settings, scoring_parts, tmp_path):
    model = make_patchcore(ratio=0.1, **{**SMALL, **settings}).fit(scoring_parts[0])
    assert_same_results(export_and_load(model, tmp_path), model, scoring_parts[1])


def test_a_bank_searched_in_chunks_gives_the_same_results(scoring_parts, tmp_path, monkeypatch):
    model = make_patchcore(ratio=0.5, n_neighbors=2, reweight_neighbors=3, **SMALL).fit(scoring_parts[0])
    bank_size = len(model.named_steps["detector"].memory_bank_)
    # 64 patches per image: chunks of 50 bank vectors, the last one padded.
    monkeypatch.setattr(export_module, "_BANK_CHUNK_BYTES", 64 * 4 * 50)
    runtime = export_and_load(model, tmp_path)
    graph = onnx.load(runtime.path).graph
    assert [node.op_type for node in graph.node].count("Scan") == 1
    assert bank_size % 50 != 0
    assert_same_results(runtime, model, scoring_parts[1])


def test_a_gray_model_scores_8_and_16_bit_images_as_the_pipeline(tmp_path):
    good = textured_parts(10, seed=4)[..., 0]
    model = make_patchcore(ratio=0.1, **SMALL).fit(good[:8])
    runtime = export_and_load(model, tmp_path)
    assert runtime.n_channels_ == 1
    assert_same_results(runtime, model, good[8:])
    sixteen = [image.astype(np.uint16) * 257 + 3 for image in good[8:]]  # 16 significant bits
    assert_same_results(runtime, model, sixteen)


def test_files_pil_images_and_float_arrays_read_as_the_pipeline_does(
    fitted, onnx_file, scoring_parts, tmp_path
):
    runtime = OnnxPatchCore(onnx_file)
    images = scoring_parts[1]
    paths = []
    for index, image in enumerate(images):  # larger files: resized and cropped on the way in
        path = tmp_path / f"{index}.png"
        Image.fromarray(image).resize((96, 80)).save(path)
        paths.append(str(path))
    assert_same_results(runtime, fitted, paths)
    assert_same_results(runtime, fitted, [Image.open(path) for path in paths])
    assert_same_results(runtime, fitted, images.astype(np.float32) / 255.0)


def test_batch_size_and_the_spread_of_the_work_are_free(fitted, onnx_file, scoring_parts):
    expected = OnnxPatchCore(onnx_file, batch_size=4, parallel="operators").predict_map(scoring_parts[1])
    for batch_size in (1, 2, 5):
        for parallel, n_threads in (("operators", 1), ("images", 1), ("images", 3), ("auto", None)):
            runtime = OnnxPatchCore(onnx_file, batch_size=batch_size, n_threads=n_threads, parallel=parallel)
            np.testing.assert_allclose(runtime.predict_map(scoring_parts[1]), expected, rtol=1e-5)


def test_the_two_ways_of_using_the_cpu_set_the_sessions_threads(onnx_file):
    import skpatchcore.runtime as runtime_module

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 3
    images = OnnxPatchCore(onnx_file, session_options=options)
    assert images.parallel_ == "images" and images.n_workers_ == runtime_module._usable_cpus()
    assert images._session.get_session_options().intra_op_num_threads == 1
    assert options.intra_op_num_threads == 3  # the caller's object is left as it was
    operators = OnnxPatchCore(onnx_file, parallel="operators", n_threads=2, session_options=options)
    assert operators.n_workers_ == 1 and operators._session.get_session_options().intra_op_num_threads == 2
    assert OnnxPatchCore(onnx_file, parallel="images", n_threads=5).n_workers_ == 5
    assert 1 <= runtime_module._usable_cpus() <= (os.cpu_count() or 1)


def test_images_scored_side_by_side_come_back_in_order(onnx_file, scoring_parts):
    order = [3, 0, 4, 1, 2, 2, 4, 0]
    images = scoring_parts[1][order]
    single = OnnxPatchCore(onnx_file, parallel="operators")
    one_by_one = np.concatenate([single.anomaly_score(image[None]) for image in images])
    assert len(np.unique(one_by_one.round(4))) == 5  # five different images, told apart by score
    for batch_size in (1, 3):
        side_by_side = OnnxPatchCore(onnx_file, parallel="images", n_threads=3, batch_size=batch_size)
        np.testing.assert_allclose(side_by_side.anomaly_score(images), one_by_one, rtol=1e-5)


def test_batches_side_by_side_are_yielded_in_order_a_bounded_window_ahead(onnx_file):
    import threading
    import time

    runtime = OnnxPatchCore(onnx_file, parallel="images", n_threads=3)
    started, lock = [], threading.Lock()

    def load_one(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (20 - i % 20))  # early rows are read slowest
        if i == 25:
            raise ValueError("row 25 cannot be read")
        return i, None

    def score(rows, loaded):
        return list(rows)

    batches = [[i] for i in range(40)]
    results = runtime._scored_batches(batches, load_one, score)
    for expected in range(10):
        rows, problems, scored = next(results)
        assert rows == scored == [expected] and problems == [None]
        # At most 2 x 3 batches were handed to the threads ahead of the one yielded.
        assert len(started) <= expected + 1 + 2 * 3
    results.close()  # the caller stops: nothing more is read
    assert len(started) <= 10 + 2 * 3
    with pytest.raises(ValueError, match="row 25"):
        list(runtime._scored_batches(batches, load_one, score))


def test_the_graph_takes_uint8_or_float_pixels_and_either_input_may_be_left_out(onnx_file, scoring_parts):
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    images = scoring_parts[1]
    pixels = images.astype(np.float32) / np.float32(255.0)
    from_uint8 = session.run(None, {UINT8_INPUT: images})
    from_float = session.run(None, {FLOAT_INPUT: pixels})
    for a, b in zip(from_uint8, from_float):
        np.testing.assert_array_equal(a, b)
    scores, maps = session.run(None, {UINT8_INPUT: images[:2], FLOAT_INPUT: pixels[2:]})
    assert maps.shape == (5, 64, 64)  # the uint8 images first, then the float ones
    np.testing.assert_allclose(scores, from_uint8[0], rtol=1e-5)


def test_decisions_and_labels_follow_the_pipeline_and_its_threshold(fitted, onnx_file, scoring_parts):
    runtime = OnnxPatchCore(onnx_file)
    detector = fitted.named_steps["detector"]
    X = scoring_parts[1]
    assert runtime.threshold_ == detector.threshold_ and runtime.offset_ == detector.offset_
    decision = fitted.decision_function(X)
    np.testing.assert_allclose(runtime.decision_function(X), decision, rtol=RTOL, atol=1e-4)
    np.testing.assert_array_equal(runtime.predict(X), fitted.predict(X))
    np.testing.assert_array_equal(runtime.score_samples(X), -runtime.anomaly_score(X))
    assert (runtime.set_threshold(1e6).predict(X) == 1).all()
    assert runtime.offset_ == -1e6


def test_a_runtime_model_pickles_by_path_keeping_its_threshold(onnx_file, scoring_parts):
    import pickle

    runtime = OnnxPatchCore(onnx_file, n_threads=1).set_threshold(12.5)
    copy = pickle.loads(pickle.dumps(runtime))
    assert copy.threshold_ == 12.5 and copy.path == runtime.path
    np.testing.assert_array_equal(
        copy.anomaly_score(scoring_parts[1]), runtime.anomaly_score(scoring_parts[1])
    )


# --------------------------------------------------------------------------
# The file: graph, metadata, checksum
# --------------------------------------------------------------------------


def test_the_backbone_is_plain_convolutions_without_shape_arithmetic(onnx_file):
    ops = Counter(node.op_type for node in onnx.load(onnx_file).graph.node)
    assert ops["Conv"] == 33 and ops["Clip"] == 22  # efficientnet_lite0 up to blocks.4
    assert ops["Shape"] + ops["Range"] + ops["Expand"] + ops["ConstantOfShape"] <= 2


def test_the_metadata_describes_the_model(fitted, onnx_file):
    model = onnx.load(onnx_file)
    props = {prop.key: prop.value for prop in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    features, detector = fitted.named_steps["features"], fitted.named_steps["detector"]
    assert meta["threshold"] == detector.threshold_
    assert meta["geometry"] == {"image_size": 64, "crop_size": 64, "resize_side": features.resize_side}
    assert meta["input_size"] == [64, 64] and meta["n_channels"] == 3 and meta["bit_depth"] == 16
    assert meta["backbone"] == "efficientnet_lite0" and meta["layers"] == ["blocks.2", "blocks.4"]
    assert meta["aggregation"] == "mean" and meta["bank_size"] == len(detector.memory_bank_)
    assert meta["skpatchcore_version"] == skpatchcore.__version__
    assert len(props[DIGEST_KEY]) == 64
    runtime = OnnxPatchCore(onnx_file)
    assert runtime.geometry_ == features.geometry_ and runtime.input_size_ == (64, 64)
    assert runtime.metadata_ == meta
    inputs = {i.name: i for i in model.graph.input}
    assert inputs[UINT8_INPUT].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_the_same_model_gives_the_same_file(fitted, onnx_file, tmp_path):
    export_onnx(fitted, tmp_path / "again.onnx", check=False)
    assert (tmp_path / "again.onnx").read_bytes() == onnx_file.read_bytes()


def change_a_bank_value(data: bytes, fitted) -> bytes:
    bank = fitted.named_steps["detector"].memory_bank_
    mean = bank.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = (bank.astype(np.float64) - mean).astype(np.float32)
    at = data.find(centred[3].tobytes())
    assert at > 0
    return data[:at] + np.float32(centred[3, 0] + 1).tobytes() + data[at + 4 :]


@pytest.mark.parametrize(
    "case, message",
    [
        ("a bank value changed", "was modified or damaged"),
        ("the threshold changed", "was modified or damaged"),
        ("truncated", "was modified or damaged"),
        ("a model file of skpatchcore.save", "written by skpatchcore.save(), not an ONNX export"),
        ("some other ONNX file", "is not an ONNX file exported by skpatchcore"),
        ("text", "is not an ONNX file exported by skpatchcore"),
    ],
)
def test_a_modified_or_foreign_file_is_refused_with_one_line(case, message, fitted, onnx_file, tmp_path):
    data = onnx_file.read_bytes()
    path = tmp_path / "bad.onnx"
    if case == "a bank value changed":
        path.write_bytes(change_a_bank_value(data, fitted))
    elif case == "the threshold changed":
        threshold = json.dumps(fitted.named_steps["detector"].threshold_).encode()
        assert data.count(threshold) == 1
        path.write_bytes(data.replace(threshold, json.dumps(1e6).encode().ljust(len(threshold))))
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2] + data[-200:])
    elif case == "a model file of skpatchcore.save":
        save(fitted, path)
    elif case == "some other ONNX file":
        from onnx import TensorProto, helper

        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [value], [value])
        graph.output[0].name = "y"
        onnx.save(helper.make_model(graph), path)
    else:
        path.write_text("not a model\n")
    with pytest.raises(ModelFileError) as error:
        OnnxPatchCore(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("block", [97, 4096])
def test_the_checksum_is_checked_block_by_block(block, fitted, onnx_file, tmp_path, monkeypatch):
    import skpatchcore.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "_BLOCK", block)  # the checksum straddles blocks
    assert OnnxPatchCore(onnx_file).threshold_ == fitted.named_steps["detector"].threshold_
    path = tmp_path / "bad.onnx"
    path.write_bytes(change_a_bank_value(onnx_file.read_bytes(), fitted))
    with pytest.raises(ModelFileError, match="was modified or damaged"):
        OnnxPatchCore(path)


def test_a_missing_file_and_a_folder_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxPatchCore(tmp_path / "nowhere.onnx")
    with pytest.raises(ModelFileError, match="is a folder"):
        OnnxPatchCore(tmp_path)


# --------------------------------------------------------------------------
# Mistakes
# --------------------------------------------------------------------------


def test_export_refuses_unfitted_and_foreign_models(fitted, tmp_path):
    with pytest.raises(NotFittedError):
        export_onnx(make_patchcore(**SMALL), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="fitted PatchCorePipeline"):
        export_onnx(fitted.named_steps["detector"], tmp_path / "m.onnx")
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    with pytest.raises(TypeError, match=r"got a Pipeline of \['StandardScaler'"):
        export_onnx(Pipeline([("a", StandardScaler()), ("b", StandardScaler())]), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_geometry_that_keeps_the_aspect_ratio_needs_an_input_size(scoring_parts, tmp_path):
    model = make_patchcore(ratio=0.1, **{**SMALL, "crop_size": None}).fit(scoring_parts[0])
    with pytest.raises(ValueError, match=r"pass input_size=\(height, width\)"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="'input_size' parameter must be None or a"):
        export_onnx(model, tmp_path / "m.onnx", input_size=64)
    runtime = export_and_load(model, tmp_path, input_size=(64, 64))
    assert_same_results(runtime, model, scoring_parts[1])
    wide = np.zeros((1, 64, 96, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="takes 64x64 images"):
        runtime.predict_map(wide)
    with pytest.raises(ValueError, match="leave input_size=None"):
        export_onnx(make_patchcore(**SMALL).fit(scoring_parts[0]), tmp_path / "n.onnx", input_size=(32, 32))


def test_a_model_too_large_for_one_onnx_file_is_refused_before_any_work(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_MAX_FILE_BYTES", 100_000)  # ~2 GiB in real life
    monkeypatch.setattr(export_module, "_export_features", None)  # never reached
    with pytest.raises(ValueError, match="beyond the 2 GiB an ONNX file can hold.*index='ivf'"):
        export_onnx(fitted, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_graph_that_disagrees_with_the_pipeline_is_not_written(fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_CHECK_RTOL", -1.0)
    with pytest.raises(RuntimeError, match="differ from the pipeline's"):
        export_onnx(fitted, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("parallel", ["images", "operators"])
def test_unreadable_images_can_be_skipped(onnx_file, scoring_parts, tmp_path, parallel):
    runtime = OnnxPatchCore(onnx_file, parallel=parallel, n_threads=2)
    good = tmp_path / "good.png"
    Image.fromarray(scoring_parts[1][0]).save(good)
    (tmp_path / "broken.png").write_bytes(b"not a png")  # refused when the files are opened
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:300])  # fails later, when decoded
    X = [str(good), str(tmp_path / "broken.png"), str(good), str(tmp_path / "missing.png"), str(good)]
    X += [str(tmp_path / "truncated.png"), str(good)]
    with pytest.warns(SkippedImagesWarning, match="Skipped 3 image"):
        maps, scores = runtime.predict_map(X, return_scores=True, on_error="skip")
    kept = np.array([True, False, True, False, True, False, True])
    assert np.isfinite(scores[kept]).all() and np.isnan(scores[~kept]).all() and np.isnan(maps[~kept]).all()
    np.testing.assert_allclose(scores[kept], scores[0], rtol=1e-6)
    with pytest.raises(ValueError, match="'on_error' parameter must be 'raise' or 'skip'"):
        runtime.anomaly_score(X, on_error="ignore")
    with pytest.raises(ValueError, match="broken.png"):
        runtime.anomaly_score(X)
    with pytest.raises(ValueError, match="truncated.png"):
        runtime.anomaly_score([str(good)] * 4 + [str(tmp_path / "truncated.png"), str(good)])


def test_bad_runtime_parameters_name_what_is_accepted(onnx_file):
    with pytest.raises(ValueError, match="'providers' parameter asks for .*NoSuchExecutionProvider"):
        OnnxPatchCore(onnx_file, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="'batch_size' parameter must be a positive int or 'auto'"):
        OnnxPatchCore(onnx_file, batch_size=0)
    with pytest.raises(ValueError, match="'n_threads' parameter"):
        OnnxPatchCore(onnx_file, n_threads="two")
    with pytest.raises(ValueError, match="'parallel' parameter must be 'auto', 'images' or 'operators'"):
        OnnxPatchCore(onnx_file, parallel="threads")


def test_without_onnxruntime_the_error_says_what_to_install(onnx_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        OnnxPatchCore(onnx_file)


# --------------------------------------------------------------------------
# Without torch
# --------------------------------------------------------------------------

# Prepended to the scripts below: importing torch (or faiss, torchvision, timm)
# fails, as on a machine where only the runtime's dependencies are installed.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm", "faiss"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NotInstalled())
    """
)


def _env() -> dict:
    """This checkout first on the path of a child process."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run_without_torch(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(script)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_runtime_scores_in_a_process_where_torch_cannot_be_imported(
    fitted, onnx_file, scoring_parts, tmp_path
):
    paths = []
    for index, image in enumerate(scoring_parts[1]):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(image).save(paths[-1])
    script = f"""
        import json
        import numpy as np
        from skpatchcore.runtime import OnnxPatchCore

        model = OnnxPatchCore({str(onnx_file)!r})
        maps, scores = model.predict_map({paths!r}, return_scores=True)
        np.save("maps.npy", maps)
        labels = model.predict({paths!r})
        json.dump(
            {{"scores": scores.tolist(), "labels": labels.tolist(),
             "torch": [m for m in sys.modules if m.split(".")[0] in ("torch", "faiss")]}},
            open("out.json", "w"),
        )
        """
    result = run_without_torch(script, tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["torch"] == []
    maps, scores = fitted.predict_map(paths, return_scores=True)
    np.testing.assert_allclose(out["scores"], scores, rtol=RTOL)
    np.testing.assert_allclose(np.load(tmp_path / "maps.npy"), maps, rtol=RTOL)
    assert out["labels"] == fitted.predict(paths).tolist()


def test_importing_the_runtime_and_the_image_reader_leaves_torch_out():
    script = """
        import sys
        import skpatchcore, skpatchcore.runtime, skpatchcore.utils._images, skpatchcore.metrics
        from skpatchcore import ModelFileError, ImageReadError, __version__
        assert "torch" not in sys.modules, "torch was imported"
        """
    command = [sys.executable, "-c", textwrap.dedent(script)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    return make_demo_dataset(
        tmp_path_factory.mktemp("data") / "plates", n_train=8, n_test_good=3, n_test_defect=2, size=128
    )


@pytest.fixture(scope="module")
def cli_models(plates, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    model, exported = folder / "plates.skpatchcore", folder / "plates.onnx"
    fit = ["fit", str(plates), "-o", str(model), "--backbone", "efficientnet_lite0", "--image-size", "96"]
    assert main([*fit, "--crop-size", "96", "-q"]) == 0
    assert main(["export", str(model), "-o", str(exported), "-q"]) == 0
    return model, exported


def read_scores(path) -> dict:
    with open(path, newline="") as stream:
        return {row["path"]: row for row in csv.DictReader(stream)}


def test_cli_export_then_predict_and_evaluate_without_torch(cli_models, plates, tmp_path):
    model, exported = cli_models
    test_images = str(plates / "test")
    assert main(["predict", str(model), test_images, "-r", "--out", str(tmp_path / "torch"), "-q"]) == 0
    assert main(["evaluate", str(model), str(plates), "--out", str(tmp_path / "torch-eval"), "-q"]) == 0
    script = f"""
        from skpatchcore.cli import main
        status = main(["predict", {str(exported)!r}, {str(plates / "test")!r}, "-r", "--out", "onnx", "-q"])
        status += main(["evaluate", {str(exported)!r}, {str(plates)!r}, "--out", "onnx-eval", "-q"])
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "faiss")], "torch was imported"
        sys.exit(status)
        """
    result = run_without_torch(script, tmp_path)
    assert result.returncode == 0, result.stderr
    expected = read_scores(tmp_path / "torch" / "scores.csv")
    got = read_scores(tmp_path / "onnx" / "scores.csv")
    assert expected.keys() == got.keys()
    for path, row in expected.items():
        assert float(got[path]["anomaly_score"]) == pytest.approx(float(row["anomaly_score"]), rel=RTOL)
        assert got[path]["label"] == row["label"]
        assert (tmp_path / got[path]["overlay"]).is_file()
    torch_metrics = json.loads((tmp_path / "torch-eval" / "metrics.json").read_text())
    onnx_metrics = json.loads((tmp_path / "onnx-eval" / "metrics.json").read_text())
    for metric in ("image_auroc", "pixel_auroc", "aupro"):
        assert onnx_metrics[metric] == pytest.approx(torch_metrics[metric], abs=1e-3)
    assert (tmp_path / "onnx-eval" / "report.png").is_file()


def test_cli_export_mistakes_give_one_line(cli_models, tmp_path, capsys):
    model, exported = cli_models
    assert main(["export", str(exported), "-o", str(tmp_path / "x.onnx"), "-q"]) == 2
    assert "is an ONNX file already" in capsys.readouterr().err
    assert main(["export", str(model), "-o", str(tmp_path / "x.onnx"), "--input-size", "64x64", "-q"]) == 2
    assert "leave input_size=None" in capsys.readouterr().err
    (tmp_path / "fake.onnx").write_text("no")
    Image.new("RGB", (96, 96)).save(tmp_path / "image.png")
    assert main(["predict", str(tmp_path / "fake.onnx"), str(tmp_path / "image.png"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an ONNX file exported by skpatchcore" in err[0]


def test_without_torch_the_torch_commands_say_what_is_missing_in_one_line(cli_models, plates, tmp_path):
    model, _ = cli_models
    script = f"""
        import contextlib, io
        from skpatchcore.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            statuses = [
                main(["predict", {str(model)!r}, {str(plates / "test")!r}, "-r", "-q"]),
                main(["fit", {str(plates)!r}, "-o", "m.skpatchcore", "-q"]),
            ]
        print(statuses)
        print(err.getvalue(), end="")
        """
    result = run_without_torch(script, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "[2, 2]" in lines
    errors = lines[lines.index("[2, 2]") + 1 :]
    assert len(errors) == 2
    for line in errors:
        assert line.startswith("skpatchcore: error: ") and "needs the Python package 'torch'" in line
