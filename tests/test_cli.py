"""Specification of the ``skpatchcore`` command and of the heat-map overlays it draws."""

from __future__ import annotations

import csv
import functools
import json
import socket
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from PIL import Image

from skpatchcore import cli, make_patchcore
from skpatchcore._demo import make_demo_dataset
from skpatchcore.cli import main
from skpatchcore.datasets import load_mvtec_category
from skpatchcore.metrics import image_auroc, pixel_metrics
from skpatchcore.utils._geometry import Geometry

from .conftest import MPDD, needs

# Small inputs keep the command-line runs fast; 160 px images are resized to
# 128 and centre-cropped to 112, so the overlays must undo both steps.
SMALL_GEOMETRY = ["--image-size", "128", "--crop-size", "112"]
API_PARAMS = {
    "backbone": "efficientnet_lite0",
    "image_size": 128,
    "crop_size": 112,
    "ratio": 0.1,
    "random_state": 0,
}


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    return make_demo_dataset(
        tmp_path_factory.mktemp("data") / "plates", n_train=8, n_test_good=3, n_test_defect=2, size=160
    )


@pytest.fixture(scope="module")
def model_file(plates, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "plates.skpatchcore"
    args = ["fit", str(plates), "-o", str(path), "--backbone", "efficientnet_lite0", *SMALL_GEOMETRY, "-q"]
    assert main(args) == 0
    return path


@pytest.fixture(scope="module")
def api_model(plates):
    return make_patchcore(**API_PARAMS).fit(load_mvtec_category(plates).train_paths)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


# --------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["fit", "predict", "evaluate", "demo", "--traceback"]),
        (
            ["fit"],
            [
                "DATA_DIR",
                "--output",
                "--backbone",
                "--ratio",
                "--image-size",
                "--crop-size",
                "--resize-side",
                "--device",
            ],
        ),
        (["predict"], ["MODEL", "IMAGES_OR_DIR", "--out", "--recursive", "--skip-errors", "scores.csv"]),
        (["evaluate"], ["MODEL", "DATA_DIR", "--out", "report.png"]),
        (["demo"], ["--data", "--out", "efficientnet_lite0"]),
    ],
)
def test_every_command_explains_itself_with_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: skpatchcore")
    for word in expected:
        assert word in out


def test_fit_help_shows_the_package_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: wide_resnet50_2" in out
    assert "default: 0.1" in out and "default: 320" in out and "default: auto" in out


def test_python_dash_m_skpatchcore_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "skpatchcore", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: skpatchcore")
    assert "demo" in result.stdout


@pytest.mark.parametrize(
    "text, value", [("256", 256), ("256x320", (256, 320)), ("none", None), ("None", None)]
)
def test_size_options_accept_a_number_a_height_by_width_pair_or_none(text, value):
    assert cli._size(text) == value


def test_a_malformed_size_is_a_usage_error(plates, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(plates), "-o", str(tmp_path / "m"), "--crop-size", "big"])
    assert exit_info.value.code == 2
    assert "--crop-size" in capsys.readouterr().err


# --------------------------------------------------------------------------
# fit, predict, evaluate: the same numbers as the Python API
# --------------------------------------------------------------------------


def test_fit_writes_the_model_the_python_api_fits(model_file, api_model, plates):
    model = cli._load_model(model_file)
    api_bank = api_model.named_steps["detector"].memory_bank_
    assert np.array_equal(model.named_steps["detector"].memory_bank_, api_bank)
    assert model.named_steps["detector"].threshold_ == api_model.named_steps["detector"].threshold_
    test_paths = load_mvtec_category(plates).test_paths
    assert np.array_equal(model.predict_map(test_paths), api_model.predict_map(test_paths))


def test_fit_on_a_plain_folder_of_good_images_shows_progress(model_file, plates, tmp_path, capsys):
    path = tmp_path / "plain.skpatchcore"
    args = ["fit", str(plates / "train" / "good"), "-o", str(path), "--backbone", "efficientnet_lite0"]
    assert main([*args, *SMALL_GEOMETRY]) == 0
    captured = capsys.readouterr()
    assert "8 good images" in captured.out and str(path) in captured.out
    assert "Extracting features" in captured.err and "Coreset" in captured.err
    same_images = cli._load_model(model_file).named_steps["detector"].memory_bank_
    assert np.array_equal(cli._load_model(path).named_steps["detector"].memory_bank_, same_images)


def test_predict_writes_scores_and_overlays_at_the_original_size(
    model_file, api_model, plates, tmp_path, capsys
):
    # Besides the square test images, one of another size and aspect ratio.
    odd = tmp_path / "odd.png"
    Image.open(plates / "test" / "spot" / "000.png").crop((0, 10, 150, 130)).save(odd)
    out = tmp_path / "predictions"
    assert main(["predict", str(model_file), str(plates / "test"), str(odd), "-r", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Extracting features" in captured.err and "Writing overlays" in captured.err

    rows = read_csv(out / "scores.csv")
    paths = [row["path"] for row in rows]
    assert paths == load_mvtec_category(plates).test_paths + [str(odd)]
    assert list(rows[0]) == ["path", "anomaly_score", "decision", "label", "overlay"]
    scores = np.array([float(row["anomaly_score"]) for row in rows])
    assert np.array_equal(scores, api_model.anomaly_score(paths).astype(np.float64))
    decisions = np.array([float(row["decision"]) for row in rows])
    # decision_function searches the whole set at once, predict streams batches: equal up to
    # float32 rounding of the search, not bit for bit.
    np.testing.assert_allclose(decisions, api_model.decision_function(paths), rtol=1e-5, atol=1e-4)
    assert [int(row["label"]) for row in rows] == list(api_model.predict(paths))
    assert f"{sum(row['label'] == '-1' for row in rows)} of {len(rows)} images" in captured.out

    overlays = [row["overlay"] for row in rows]
    assert len(set(overlays)) == len(overlays)
    for path, overlay in zip(paths, overlays):
        with Image.open(path) as original, Image.open(overlay) as drawn:
            assert drawn.size == original.size and drawn.mode == "RGB"
    assert Image.open(out / "overlays" / "odd.png").size == (150, 120)


def test_skip_errors_scores_the_readable_images_and_names_the_others(
    model_file, api_model, plates, tmp_path, capsys
):
    good = sorted((plates / "test" / "good").glob("*.png"))[:2]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    inputs = [str(good[0]), str(truncated), str(good[1]), str(empty)]
    out = tmp_path / "predictions"

    # Without the option the header check stops the command at the 0-byte file, before any work
    # (the truncated PNG's header is intact: it fails only when decoded).
    assert main(["predict", str(model_file), *inputs, "--out", str(out), "-q"]) == 2
    assert "empty.png" in capsys.readouterr().err and not (out / "scores.csv").exists()
    assert main(["predict", str(model_file), *inputs[:3], "--out", str(out), "-q"]) == 2
    assert "truncated.png" in capsys.readouterr().err and not (out / "scores.csv").exists()

    assert main(["predict", str(model_file), *inputs, "--out", str(out), "--skip-errors", "-q"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 unreadable image(s)" in captured.err
    rows = read_csv(out / "scores.csv")
    assert [row["path"] for row in rows] == inputs
    assert list(rows[0]) == ["path", "anomaly_score", "decision", "label", "overlay", "error"]
    read = [rows[0], rows[2]]
    expected = api_model.anomaly_score([str(good[0]), str(good[1])]).astype(np.float64)
    assert np.array_equal([float(row["anomaly_score"]) for row in read], expected)
    assert all(row["error"] == "" and Path(row["overlay"]).is_file() for row in read)
    for row, name in ((rows[1], "truncated.png"), (rows[3], "empty.png")):
        assert row["anomaly_score"] == row["label"] == row["overlay"] == ""
        assert name in row["error"]
    assert sorted(path.name for path in (out / "overlays").iterdir()) == sorted(p.name for p in good)
    assert "of 2 images flagged" in captured.out


def test_evaluate_reports_the_metrics_of_the_python_api(model_file, api_model, plates, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(model_file), str(plates), "--out", str(out), "-q"]) == 0

    data = load_mvtec_category(plates)
    scores = api_model.anomaly_score(data.test_paths)
    pixels = pixel_metrics(api_model, data.test_paths, data.test_mask_paths)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_auroc"] == image_auroc(data.test_labels, scores)
    assert metrics["pixel_auroc"] == pixels["pixel_auroc"]
    assert metrics["aupro"] == pixels["aupro"]
    assert metrics["n_defective_pixels"] == pixels["n_defective_pixels"] > 0
    assert metrics["threshold"] == api_model.named_steps["detector"].threshold_
    assert set(metrics["image_auroc_by_defect_type"]) == {"crack", "scratch", "spot"}
    assert (metrics["n_good"], metrics["n_defective"]) == (3, 6)
    flagged = api_model.predict(data.test_paths) == -1
    assert metrics["defective_flagged"] == int(flagged[data.test_labels == -1].sum())
    assert metrics["good_flagged"] == int(flagged[data.test_labels == 1].sum())
    assert (metrics["image_size"], metrics["crop_size"]) == (128, 112)

    screen = capsys.readouterr().out
    for name in ("image AUROC", "pixel AUROC", "AUPRO"):
        assert name in screen
    assert f"{metrics['aupro']:.3f}" in screen and str(out / "report.png") in screen
    with Image.open(out / "report.png") as report:
        assert report.format == "PNG" and report.width >= 1000 and report.height >= 800
    rows = read_csv(out / "scores.csv")
    assert [row["defect_type"] for row in rows] == data.test_defect_types
    assert [float(row["anomaly_score"]) for row in rows] == scores.astype(np.float64).tolist()


def test_demo_runs_everything_with_no_arguments(monkeypatch, tmp_path, capsys):
    # The real demo's data set, only smaller, so that the test stays quick.
    smaller = functools.partial(make_demo_dataset, n_train=6, n_test_good=2, n_test_defect=1, size=128)
    monkeypatch.setattr(cli, "make_demo_dataset", smaller)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "-q"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "skpatchcore-demo"
    assert (root / "synthetic_plates" / "SYNTHETIC_DATA.txt").is_file()
    for path in [
        root / "model.skpatchcore",
        root / "evaluation" / "metrics.json",
        root / "evaluation" / "report.png",
        root / "evaluation" / "scores.csv",
        root / "predictions" / "scores.csv",
    ]:
        assert path.is_file()
        assert f" {path.relative_to(tmp_path)}\n" in out, f"{path} is not printed"
    for folder in [root / "synthetic_plates", root / "predictions" / "overlays"]:
        assert f" {folder.relative_to(tmp_path)}\n" in out, f"{folder} is not printed"
    assert len(list((root / "predictions" / "overlays").glob("*.png"))) == 5
    assert "image AUROC" in out and "AUPRO" in out
    metrics = json.loads((root / "evaluation" / "metrics.json").read_text())
    assert metrics["n_defective"] == 3 and 0.0 <= metrics["aupro"] <= 1.0
    assert isinstance(cli._load_model(root / "model.skpatchcore"), type(make_patchcore()))


# --------------------------------------------------------------------------
# Mistakes: one line on stderr, exit status 2, no traceback
# --------------------------------------------------------------------------


def _error_setup(name, tmp, model_file, plates):
    """Arguments for the error case ``name``, with the files it needs created under ``tmp``."""
    good = str(plates / "train" / "good")
    new_model = str(tmp / "new.skpatchcore")
    image = str(plates / "test" / "good" / "000.png")
    if name == "missing data folder":
        return ["fit", str(tmp / "nowhere"), "-o", new_model]
    if name == "data path is a file":
        return ["fit", image, "-o", new_model]
    if name == "empty data folder":
        (tmp / "empty").mkdir()
        return ["fit", str(tmp / "empty"), "-o", new_model]
    if name == "folder without images":
        (tmp / "notes").mkdir()
        (tmp / "notes" / "readme.txt").write_text("no images here")
        return ["fit", str(tmp / "notes"), "-o", new_model]
    if name == "file named .png that is no image":
        (tmp / "fake").mkdir()
        (tmp / "fake" / "000.png").write_text("not a png")
        return ["fit", str(tmp / "fake"), "-o", new_model]
    if name == "unknown backbone":
        return ["fit", good, "-o", new_model, "--backbone", "no_such_net"]
    if name == "model file missing":
        return ["predict", str(tmp / "missing.skpatchcore"), image]
    if name == "model path is a folder":
        return ["predict", str(tmp), image]
    if name == "text file as model":
        (tmp / "model.txt").write_text("hello")
        return ["predict", str(tmp / "model.txt"), image]
    if name == "foreign pickle as model":
        joblib.dump({"weights": [1, 2, 3]}, tmp / "other.joblib")
        return ["predict", str(tmp / "other.joblib"), image]
    if name == "missing image":
        return ["predict", str(model_file), str(tmp / "nothing.png")]
    if name == "non-image file to predict":
        (tmp / "table.csv").write_text("a,b\n")
        return ["predict", str(model_file), str(tmp / "table.csv")]
    if name == "folder whose images are in sub-folders":
        return ["predict", str(model_file), str(plates / "test")]
    if name == "image with transparent pixels":
        clear = Image.open(image).convert("RGBA")
        clear.putalpha(128)
        clear.save(tmp / "clear.png")
        return ["predict", str(model_file), str(tmp / "clear.png")]
    if name == "evaluate on a missing folder":
        return ["evaluate", str(model_file), str(tmp / "nowhere")]
    if name == "demo on a missing folder":
        return ["demo", "--data", str(tmp / "nowhere"), "--out", str(tmp / "demo")]
    if name == "evaluate on a folder that is no MVTec category":
        return ["evaluate", str(model_file), good]
    raise AssertionError(name)


ERROR_CASES = {
    "missing data folder": "does not exist",
    "data path is a file": "is a file",
    "empty data folder": "holds no image files",
    "folder without images": "holds no image files",
    "file named .png that is no image": "not an image file",
    "unknown backbone": "Unknown backbone 'no_such_net'",
    "model file missing": "does not exist",
    "model path is a folder": "is a folder",
    "text file as model": "is not a skpatchcore model file",
    "foreign pickle as model": "is not a skpatchcore model file",
    "missing image": "no such image file or folder",
    "non-image file to predict": "not an image file",
    "folder whose images are in sub-folders": "add --recursive",
    "image with transparent pixels": "transparent",
    "evaluate on a folder that is no MVTec category": "not an MVTec AD category folder",
    "evaluate on a missing folder": "The data folder",
    "demo on a missing folder": "The data folder",
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_a_mistake_gives_one_line_on_stderr_and_exit_status_2(case, model_file, plates, tmp_path, capsys):
    args = _error_setup(case, tmp_path, model_file, plates)
    assert main([*args, "-q"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("skpatchcore: error: ")
    assert ERROR_CASES[case] in lines[0]
    assert not (tmp_path / "new.skpatchcore").exists()


def test_traceback_option_shows_the_full_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--traceback", "fit", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m")])


def test_default_backbone_offline_names_the_offline_alternative(plates, tmp_path, monkeypatch, capsys):
    # Simulate a machine without internet and without cached weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    assert main(["fit", str(plates / "train" / "good"), "-o", str(tmp_path / "m"), "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "wide_resnet50_2" in lines[0] and "--backbone efficientnet_lite0" in lines[0]


# --------------------------------------------------------------------------
# Overlays: the model's maps drawn back on the original images
# --------------------------------------------------------------------------


def forward_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A 0/1 mask through the model's input geometry, as the masks of the metrics go."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    return geometry.apply(image, mask=True)[:, :, 0]


def random_mask(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(6):
        top, left = rng.integers(0, shape[0] - 20), rng.integers(0, shape[1] - 20)
        mask[top : top + rng.integers(8, 20), left : left + rng.integers(8, 20)] = True
    return mask


def near_edges(mask: np.ndarray, reach: int) -> np.ndarray:
    """Pixels within ``reach`` (in each direction) of an edge of ``mask``."""
    edges = mask ^ np.roll(mask, 1, 0) | mask ^ np.roll(mask, 1, 1)
    near = np.zeros_like(edges)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            near |= np.roll(np.roll(edges, dy, 0), dx, 1)
    return near


def test_inverse_geometry_gives_back_the_mask_exactly_when_nothing_is_resized():
    geometry = Geometry(image_size=256, crop_size=224)
    mask = random_mask((256, 256))
    heat, inspected = geometry.to_original(forward_mask(mask, geometry), (256, 256))
    expected_inspected = np.zeros((256, 256), dtype=bool)
    expected_inspected[16:240, 16:240] = True
    assert np.array_equal(inspected, expected_inspected)
    assert np.array_equal(heat[inspected] > 0.5, mask[inspected])


def test_inverse_geometry_undoes_resize_and_crop_of_a_non_square_image():
    geometry = Geometry(image_size=150, crop_size=128)
    mask = random_mask((300, 400), seed=1)
    heat, inspected = geometry.to_original(forward_mask(mask, geometry), (300, 400))
    assert heat.shape == inspected.shape == (300, 400)
    # Resized to 150 x 200; the crop starts at row 11, column 36, i.e. 22 and 72 here.
    rows, cols = np.nonzero(inspected)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (22, 278, 72, 328)
    assert inspected.sum() == 256 * 256
    # Two bilinear resizes blur the edges by a pixel; the regions themselves come back.
    wrong = (heat > 0.5) != mask
    assert not np.any(wrong & inspected & ~near_edges(mask, 2))


def test_inverse_geometry_drops_the_padding_of_a_crop_larger_than_the_image():
    geometry = Geometry(image_size=None, crop_size=(120, 90))
    anomaly_map = np.random.default_rng(2).random((120, 90)).astype(np.float32)
    heat, inspected = geometry.to_original(anomaly_map, (100, 100))
    # torchvision pads 10 rows above and below, and crops 5 columns on each side.
    assert np.array_equal(heat[:, 5:95], anomaly_map[10:110])
    assert inspected[:, 5:95].all() and not inspected[:, :5].any() and not inspected[:, 95:].any()


def test_inverse_geometry_of_a_letterbox_inspects_the_whole_image():
    geometry = Geometry(image_size=128, crop_size=128, resize_side="longer")
    mask = random_mask((100, 250), seed=3)
    forward = forward_mask(mask, geometry)
    # 250 -> 128 wide, 100 -> 51 high, padded by 38 rows above and 39 below.
    assert not forward[:38].any() and not forward[38 + 51 :].any()
    heat, inspected = geometry.to_original(forward, (100, 250))
    assert heat.shape == (100, 250) and inspected.all()
    # Downscaled to 51 rows and back up: edges blur by up to 3 pixels.
    wrong = (heat > 0.5) != mask
    assert not np.any(wrong & ~near_edges(mask, 3))


def test_inverse_geometry_refuses_a_map_of_the_wrong_size():
    with pytest.raises(ValueError, match="reaches the model as 224x224"):
        Geometry(256, 224).to_original(np.zeros((100, 100)), (256, 256))


# --------------------------------------------------------------------------
# Real data: the command line reproduces the Python API
# --------------------------------------------------------------------------


@needs(MPDD)
def test_fit_and_evaluate_on_mpdd_metal_plate_reproduce_the_python_api(tmp_path):
    model = tmp_path / "metal_plate.skpatchcore"
    fit = [
        "fit",
        str(MPDD),
        "-o",
        str(model),
        "--backbone",
        "efficientnet_lite0",
        "--ratio",
        "0.1",
        "--seed",
        "0",
    ]
    assert main([*fit, "-q"]) == 0
    assert main(["evaluate", str(model), str(MPDD), "--out", str(tmp_path / "evaluation"), "-q"]) == 0
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    # The same job through the Python API, default geometry and settings.
    data = load_mvtec_category(MPDD)
    api = make_patchcore(backbone="efficientnet_lite0", ratio=0.1, random_state=0).fit(data.train_paths)
    maps, scores = api.predict_map(data.test_paths, return_scores=True)
    pixels = pixel_metrics(api, data.test_paths, data.test_mask_paths, maps=maps)
    # The tolerance only absorbs float rounding (CUDA distances may move an AUROC by one pair).
    tolerance = 1e-6 if not torch.cuda.is_available() else 2e-3
    assert metrics["image_auroc"] == pytest.approx(image_auroc(data.test_labels, scores), abs=tolerance)
    assert metrics["pixel_auroc"] == pytest.approx(pixels["pixel_auroc"], abs=tolerance)
    assert metrics["aupro"] == pytest.approx(pixels["aupro"], abs=tolerance)
    assert (metrics["n_good"], metrics["n_defective"]) == (26, 71)
