"""The ``skpatchcore`` command: fit, predict, evaluate and demo, without writing code.

::

    skpatchcore fit DATA_DIR -o MODEL          fit on the good images of a folder
    skpatchcore predict MODEL IMAGES_OR_DIR    scores.csv and heat-map overlays
    skpatchcore evaluate MODEL DATA_DIR        metrics, metrics.json and report.png
    skpatchcore export MODEL -o model.onnx     one ONNX file for torch-free deployment
    skpatchcore demo                           all of the above on generated data

``predict`` and ``evaluate`` also take an exported ``.onnx`` model: they then
run it with onnxruntime and never import torch (this module imports the torch
stack only in the commands that need it).

``python -m skpatchcore`` is the same command. Mistakes in the input (a
missing folder, a file that is not an image, a model file that is not ours,
an unknown backbone, ...) end with one line ``skpatchcore: error: ...`` on
stderr and exit status 2; ``--traceback`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import _report
from ._demo import make_demo_dataset
from ._version import __version__
from .datasets import _reworded, load_mvtec_category
from .metrics import image_auroc, pixel_metrics
from .utils._errors import ModelFileError
from .utils._images import ImageReadError, SkippedImagesWarning, image_paths_in, open_image

__all__ = ["main"]

_PROG = "skpatchcore"
_IMAGE_SUFFIXES = ".png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp"
_DEMO_BACKBONE = "efficientnet_lite0"
_DEMO_MODEL_NAME = "model.skpatchcore"
_DEMO_DATA_NAME = "synthetic_plates"
_ONNX_SUFFIX = ".onnx"
_MODEL_HELP = (
    "a model file written by 'fit' (load only files you trust), or an ONNX file written by 'export' "
    "(run with onnxruntime, without torch)"
)
# Errors that come from what the user gave us (BackboneError and
# ModelFileError are ValueErrors); anything else is a bug and keeps its
# traceback.
_USER_ERRORS = (ValueError, TypeError, OSError, ImageReadError)


# --------------------------------------------------------------------------
# Model files: the only place that reads or writes them.
# --------------------------------------------------------------------------


def _save_model(model, path) -> None:
    """Write a fitted pipeline to ``path`` (creating its folder) with :func:`skpatchcore.save`."""
    from ._persistence import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, path)


def _load_model(path):
    """Read a pipeline written by :func:`_save_model` with :func:`skpatchcore.load`.

    The file format holds no pickle, so loading cannot run code; a file that is not a model
    file, or is truncated, modified or of a newer format, is refused with a one-line error.
    """
    from ._persistence import load
    from ._pipeline import PatchCorePipeline

    model = load(path)
    if not isinstance(model, PatchCorePipeline):
        raise ModelFileError(
            f"{os.fspath(path)!r} holds a single {type(model).__name__}, not a pipeline; give a file "
            "written by 'skpatchcore fit'."
        )
    return model


def _is_onnx(path) -> bool:
    """Whether ``path`` names an exported ONNX model (by its suffix)."""
    return Path(path).suffix.lower() == _ONNX_SUFFIX


def _model_facts(model) -> tuple[float, object, int]:
    """Threshold, fitted geometry and bit depth of a pipeline or an :class:`OnnxPatchCore`."""
    named_steps = getattr(model, "named_steps", None)
    if named_steps is None:  # skpatchcore.runtime.OnnxPatchCore
        return model.threshold_, model.geometry_, model.bit_depth_
    features = named_steps["features"]
    return named_steps["detector"].threshold_, features.geometry_, features.bit_depth


# --------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------


def _check_readable(paths) -> None:
    """Open every image's header, so that a bad file is named before any work starts."""
    for path in paths:
        try:
            open_image(path).close()
        except ImageReadError as exc:
            raise _reworded(exc, path, "image") from None


def _data_folder(data_dir) -> Path:
    """``data_dir`` as a Path, once it is known to be an existing folder."""
    folder = Path(data_dir)
    if not folder.exists():
        raise FileNotFoundError(f"The data folder {os.fspath(data_dir)!r} does not exist.")
    if not folder.is_dir():
        raise ValueError(f"The data folder {os.fspath(data_dir)!r} is a file; give a folder.")
    return folder


def _training_images(data_dir) -> tuple[list[str], Path]:
    """Good images to fit on: ``train/good`` of a category folder, else the folder's own images."""
    folder = _data_folder(data_dir)
    if (folder / "train" / "good").is_dir():
        folder = folder / "train" / "good"
    paths = [os.fspath(path) for path in image_paths_in(folder)]
    if not paths:
        raise ValueError(
            f"The folder {os.fspath(folder)!r} holds no image files ({_IMAGE_SUFFIXES}); give an MVTec AD "
            "category folder (with train/good) or a folder of good images."
        )
    _check_readable(paths)
    return paths, folder


def _images_to_predict(inputs, recursive: bool, check: bool = True) -> list[tuple[str, str]]:
    """``(image path, overlay file name)`` for every image file given or found in a given folder.

    With ``check`` every image's header is opened first, so that a bad file
    stops the command before any work; without it bad files are left to
    ``predict_map(on_error="skip")``.
    """
    found: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = image_paths_in(path, recursive=recursive)
            if not images:
                hint = ""
                if not recursive and image_paths_in(path, recursive=True):
                    hint = "; its sub-folders do: add --recursive"
                raise ValueError(f"The folder {item!r} holds no image files ({_IMAGE_SUFFIXES}){hint}.")
            found.extend((os.fspath(image), image.relative_to(path)) for image in images)
        elif path.exists():
            found.append((os.fspath(item), Path(path.name)))
        else:
            raise FileNotFoundError(f"{item!r}: no such image file or folder.")
    if check:
        _check_readable([image for image, _ in found])

    named, used = [], set()
    for image, relative in found:
        stem = "_".join(relative.with_suffix("").parts)
        name, copy = f"{stem}.png", 1
        while name in used:
            name, copy = f"{stem}_{copy}.png", copy + 1
        used.add(name)
        named.append((image, name))
    return named


# --------------------------------------------------------------------------
# The work behind each command
# --------------------------------------------------------------------------


def _fit(paths, params: dict, verbose: int):
    from ._backbones import OFFLINE_BACKBONES, BackboneError
    from ._pipeline import make_patchcore

    backbone = params["backbone"]
    model = make_patchcore(**params, verbose=verbose)
    try:
        model.fit(paths)
    except BackboneError as exc:
        if backbone in OFFLINE_BACKBONES:
            raise
        raise BackboneError(
            f"{exc} On the command line: --backbone {_DEMO_BACKBONE} needs no download, "
            "or give --weights PATH."
        ) from None
    return model


def _describe_fit(model) -> str:
    features, detector = model.named_steps["features"], model.named_steps["detector"]
    bank = detector.memory_bank_
    return (
        f"Memory bank: {bank.shape[0]} patch vectors of {bank.shape[1]} values "
        f"(backbone {features.backbone}, layers {list(features.layers_)}); "
        f"threshold on the anomaly score: {detector.threshold_:.4g}"
    )


def _decisions(model, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``decision_function`` and ``predict`` values from anomaly scores, as the detector computes them."""
    threshold = _model_facts(model)[0]
    decision = -scores + threshold
    return decision, np.where(decision >= 0, 1, -1)


def _predict(
    model,
    images: list[tuple[str, str]],
    out: Path,
    verbose: int,
    skip_errors: bool = False,
) -> tuple[Path, int, dict]:
    """Write ``scores.csv`` and one overlay per image under ``out``.

    With ``skip_errors`` an image that cannot be read gets a row with empty
    score, decision, label and overlay and the reason in an extra ``error``
    column, instead of stopping the command.

    Returns the CSV path, the number of images predicted anomalous and the
    skipped images (position -> reason).
    """
    paths = [image for image, _ in images]
    skipped: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImagesWarning)
        maps, scores = model.predict_map(
            paths, return_scores=True, on_error="skip" if skip_errors else "raise"
        )
    for warning in caught:
        if isinstance(warning.message, SkippedImagesWarning):
            skipped.update(warning.message.skipped)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    decision, labels = _decisions(model, scores)
    threshold, geometry, bit_depth = _model_facts(model)
    overlay_dir = out / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out / "scores.csv"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "anomaly_score", "decision", "label", "overlay"] + ["error"] * skip_errors)
        progress = tqdm(images, desc="Writing overlays", unit="img", disable=not verbose)
        for index, (image, name) in enumerate(progress):
            if index in skipped:
                writer.writerow([image, "", "", "", "", skipped[index]])
                continue
            overlay_path = overlay_dir / name
            _report.write_overlay(overlay_path, image, maps[index], geometry, threshold, bit_depth)
            row = [
                image,
                repr(float(scores[index])),
                repr(float(decision[index])),
                int(labels[index]),
                overlay_path,
            ]
            writer.writerow(row + [""] * skip_errors)
    flagged = int(np.sum(labels[np.isfinite(scores)] == -1))
    return csv_path, flagged, skipped


def _evaluate(model, data_dir, out: Path, model_name: str) -> dict:
    """Metrics on an MVTec AD category; writes metrics.json, scores.csv and report.png under ``out``."""
    data = load_mvtec_category(_data_folder(data_dir))
    _check_readable(data.test_paths)
    labels = data.test_labels
    n_good, n_defective = int(np.sum(labels == 1)), int(np.sum(labels == -1))
    if n_good == 0 or n_defective == 0:
        raise ValueError(
            f"Evaluating needs good and defective test images; {os.path.join(data.path, 'test')!r} holds "
            f"{n_good} good and {n_defective} defective images."
        )
    maps, scores = model.predict_map(data.test_paths, return_scores=True)
    # Over the images' own pixels: maps taken back to each original image (see metrics.pixel_metrics).
    pixels = pixel_metrics(model, data.test_paths, data.test_mask_paths, maps=maps)
    decision, predicted = _decisions(model, scores)
    threshold, geometry, bit_depth = _model_facts(model)

    by_type = {}
    for defect_type in sorted(set(data.test_defect_types) - {"good"}):
        keep = np.isin(data.test_defect_types, ["good", defect_type])
        by_type[defect_type] = image_auroc(labels[keep], scores[keep])
    metrics = {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixels["pixel_auroc"],
        "aupro": pixels["aupro"],
        "pixels": "each image's own pixels at its original size; pixels cut away by a crop count as "
        "never flagged",
        "n_defective_pixels": pixels["n_defective_pixels"],
        "n_defective_pixels_not_inspected": pixels["n_defective_pixels_not_inspected"],
        "image_auroc_by_defect_type": by_type,
        "threshold": threshold,
        "defective_flagged": int(np.sum(predicted[labels == -1] == -1)),
        "good_flagged": int(np.sum(predicted[labels == 1] == -1)),
        "n_good": n_good,
        "n_defective": n_defective,
        "category": data.name,
        "data": os.fspath(data.path),
        "model": model_name,
        "image_size": geometry.image_size,
        "crop_size": geometry.crop_size,
        "resize_side": geometry.resize_side,
        "skpatchcore_version": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / "scores.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "defect_type", "true_label", "anomaly_score", "decision", "label"])
        for row in zip(data.test_paths, data.test_defect_types, labels, scores, decision, predicted):
            path, defect_type, truth, score, value, label = row
            writer.writerow(
                [path, defect_type, int(truth), repr(float(score)), repr(float(value)), int(label)]
            )
    _report.write_report(
        out / "report.png",
        title=f"skpatchcore evaluation: {data.name} ({n_good} good, {n_defective} defective test images)",
        labels=labels,
        scores=scores,
        threshold=threshold,
        metrics={
            "image AUROC": metrics["image_auroc"],
            "pixel AUROC": metrics["pixel_auroc"],
            "AUPRO (FPR 0.3)": metrics["aupro"],
            "threshold": threshold,
            "defective flagged": f"{metrics['defective_flagged']} / {n_defective}",
            "good flagged": f"{metrics['good_flagged']} / {n_good}",
        },
        image_paths=data.test_paths,
        maps=maps,
        mask_paths=data.test_mask_paths,
        geometry=geometry,
        bit_depth=bit_depth,
    )
    return metrics


def _metrics_table(metrics: dict) -> str:
    rows = [
        ("image AUROC", metrics["image_auroc"]),
        ("pixel AUROC", metrics["pixel_auroc"]),
        ("AUPRO", metrics["aupro"]),
    ]
    rows += [
        (f"  image AUROC, {name}", value) for name, value in metrics["image_auroc_by_defect_type"].items()
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{name:<{width}}  {value:.3f}" for name, value in rows]
    lines.append("Pixel metrics over each image's own pixels, at its original size.")
    if metrics["n_defective_pixels_not_inspected"]:
        lines.append(
            f"The crop cut away {metrics['n_defective_pixels_not_inspected']} of the "
            f"{metrics['n_defective_pixels']} defective pixels: they count as missed."
        )
    lines.append(
        f"At the threshold {metrics['threshold']:.4g}: {metrics['defective_flagged']} of "
        f"{metrics['n_defective']} defective and {metrics['good_flagged']} of {metrics['n_good']} good "
        "images flagged as anomalous."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def _verbosity(args) -> int:
    return 0 if args.quiet else 1


def _loaded(path, verbose: int):
    """The model in ``path``: a pipeline (torch), or for an ``.onnx`` file an
    :class:`~skpatchcore.runtime.OnnxPatchCore` (onnxruntime, no torch)."""
    if _is_onnx(path):
        from .runtime import OnnxPatchCore

        return OnnxPatchCore(path)
    model = _load_model(path)
    return model.set_params(features__verbose=verbose)


def _command_fit(args) -> None:
    start = time.perf_counter()
    paths, folder = _training_images(args.data_dir)
    params = {
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "crop_size": args.crop_size,
        "resize_side": args.resize_side,
        "ratio": args.ratio,
        "device": args.device,
        "random_state": args.seed,
    }
    if args.layers is not None:
        params["layers"] = args.layers
    _say(f"Fitting PatchCore on {len(paths)} good images from {os.fspath(folder)}")
    model = _fit(paths, params, _verbosity(args))
    _save_model(model, args.output)
    _say(_describe_fit(model))
    _say(f"Model written to {args.output} ({time.perf_counter() - start:.1f} s)")


def _command_predict(args) -> None:
    images = _images_to_predict(args.images, args.recursive, check=not args.skip_errors)
    model = _loaded(args.model, _verbosity(args))
    csv_path, n_flagged, skipped = _predict(
        model, images, Path(args.out), _verbosity(args), skip_errors=args.skip_errors
    )
    if skipped:
        print(
            f"{_PROG}: warning: skipped {len(skipped)} unreadable image(s); see the 'error' column of "
            f"{csv_path}",
            file=sys.stderr,
        )
    _say(f"{n_flagged} of {len(images) - len(skipped)} images flagged as anomalous.")
    _say(f"Scores: {csv_path}")
    _say(f"Heat-map overlays: {Path(args.out) / 'overlays'}")


def _command_evaluate(args) -> None:
    model = _loaded(args.model, _verbosity(args))
    out = Path(args.out)
    metrics = _evaluate(model, args.data_dir, out, os.fspath(args.model))
    _say(_metrics_table(metrics))
    for name in ("metrics.json", "report.png", "scores.csv"):
        _say(f"Wrote {out / name}")


def _command_export(args) -> None:
    from ._export import export_onnx

    start = time.perf_counter()
    if _is_onnx(args.model):
        raise ValueError(f"{args.model!r} is an ONNX file already; give a model file written by 'fit'.")
    model = _load_model(args.model)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, output, input_size=args.input_size, check=not args.no_check)
    size_mb = output.stat().st_size / 2**20
    _say(f"ONNX model written to {output} ({size_mb:.1f} MB, {time.perf_counter() - start:.1f} s)")
    _say(
        f"Run it without torch: 'skpatchcore predict {output} IMAGES', or in Python "
        f"skpatchcore.runtime.OnnxPatchCore({os.fspath(output)!r})."
    )


def _command_demo(args) -> None:
    start = time.perf_counter()
    verbose = _verbosity(args)
    out = Path(args.out)
    if args.data is None:
        data_dir = make_demo_dataset(out / _DEMO_DATA_NAME)
        _say(f"Generated synthetic demo images (textured metal with scratches, spots, cracks) in {data_dir}")
    else:
        data_dir = _data_folder(args.data)
    data = load_mvtec_category(data_dir)
    _check_readable(data.train_paths)
    _say(
        f"Fitting PatchCore ({_DEMO_BACKBONE}, coreset ratio 0.1, seed 0) on "
        f"{len(data.train_paths)} good images of {data.name}"
    )
    model = _fit(data.train_paths, {"backbone": _DEMO_BACKBONE, "ratio": 0.1, "random_state": 0}, verbose)
    _say(_describe_fit(model))
    model_path = out / _DEMO_MODEL_NAME
    _save_model(model, model_path)

    _say(f"Evaluating on {len(data.test_paths)} test images")
    metrics = _evaluate(model, data_dir, out / "evaluation", os.fspath(model_path))
    _say(_metrics_table(metrics))

    _say("Predicting the test folder")
    images = _images_to_predict([os.path.join(data_dir, "test")], recursive=True)
    csv_path, _, _ = _predict(model, images, out / "predictions", verbose)

    _say(f"\nDone in {time.perf_counter() - start:.0f} s. Outputs:")
    outputs = [("data", data_dir), ("model", model_path)]
    outputs += [(name, out / "evaluation" / name) for name in ("metrics.json", "report.png", "scores.csv")]
    outputs += [("scores", csv_path), ("overlays", out / "predictions" / "overlays")]
    for name, path in outputs:
        _say(f"  {name:<12} {os.fspath(path)}")
    _say(
        "Next: 'skpatchcore fit YOUR_DATA -o model.skpatchcore --backbone efficientnet_lite0', then "
        "'skpatchcore predict model.skpatchcore IMAGES'."
    )


# --------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------


def _size(text: str):
    """``--image-size`` / ``--crop-size`` values: N, HEIGHTxWIDTH or none."""
    if text.strip().lower() == "none":
        return None
    try:
        values = [int(part) for part in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) in (1, 2) and all(value >= 1 for value in values):
        return values[0] if len(values) == 1 else tuple(values)
    raise argparse.ArgumentTypeError(f"expected N, HEIGHTxWIDTH (e.g. 256x320) or 'none'; got {text!r}")


def _crop(text: str):
    """``--crop-size`` values: N, HEIGHTxWIDTH, auto or none."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _size(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected N, HEIGHTxWIDTH (e.g. 256x320), 'auto' or 'none'; got {text!r}"
        ) from None


def _layers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names; got {text!r}")
    return names


_FIT_DEFAULTS = ("backbone", "weights", "image_size", "crop_size", "resize_side", "ratio")


def _fit_defaults() -> dict:
    """The package defaults that ``fit``'s options show (importing the estimators: torch)."""
    from ._backbones import OFFLINE_BACKBONES
    from ._coreset import GreedyCoresetSampler
    from ._features import PatchFeatureTransformer

    features, coreset = PatchFeatureTransformer(), GreedyCoresetSampler()
    defaults = {name: getattr(features, name) for name in _FIT_DEFAULTS if name != "ratio"}
    return {**defaults, "ratio": coreset.ratio, "offline": OFFLINE_BACKBONES}


def build_parser(*, fit_defaults: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the ``skpatchcore`` command.

    ``fit_defaults=False`` leaves the package defaults out of ``fit``'s options
    (they are resolved when ``fit`` runs), so that parsing another command
    does not import torch.
    """
    defaults = {**dict.fromkeys(_FIT_DEFAULTS), "offline": ()}
    if fit_defaults:
        try:
            defaults = _fit_defaults()
        except ImportError:  # a runtime-only installation: 'fit' says so when it runs
            pass
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="PatchCore anomaly detection: fit on photos of good parts, then score new photos "
        "and see where they differ.",
        epilog="Start with 'skpatchcore demo'. Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="on an error, show the full traceback (for bug reports)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = commands.add_parser(
        "fit",
        parents=[common],
        help="fit a model on good images",
        description="Fit PatchCore on defect-free images and save the model.",
    )
    fit.add_argument(
        "data_dir",
        metavar="DATA_DIR",
        help="an MVTec AD category folder (its train/good images are used) or a folder of good images",
    )
    fit.add_argument("-o", "--output", metavar="MODEL", required=True, help="model file to write")
    fit.add_argument(
        "--backbone",
        default=defaults["backbone"],
        help=f"CNN backbone (default: %(default)s, downloads ImageNet weights once; "
        f"{', '.join(defaults['offline'])} need no download)",
    )
    fit.add_argument(
        "--layers", type=_layers, metavar="A,B", help="backbone layers to tap (default: the backbone's own)"
    )
    fit.add_argument(
        "--weights",
        default=defaults["weights"],
        metavar="PATH",
        help="local state_dict file of the backbone, instead of the ImageNet weights (default: %(default)s)",
    )
    fit.add_argument(
        "--ratio",
        type=float,
        default=defaults["ratio"],
        help="share of training patches kept in the memory bank, in (0, 1] (default: %(default)s)",
    )
    fit.add_argument(
        "--image-size",
        type=_size,
        default=defaults["image_size"],
        metavar="N|HxW|none",
        help="resize the side chosen by --resize-side to N pixels, or to exactly HxW; none: keep it "
        "(default: %(default)s)",
    )
    fit.add_argument(
        "--crop-size",
        type=_crop,
        default=defaults["crop_size"],
        metavar="N|HxW|auto|none",
        help="centre crop after resizing, padded with black where larger than the image; auto: a box "
        "shaped like the training images, of about N x N pixels for --image-size N, that every image "
        "is fitted into whole; none inspects the whole resized image (default: %(default)s)",
    )
    fit.add_argument(
        "--resize-side",
        choices=["shorter", "longer", "fit"],
        default=defaults["resize_side"],
        help="the side an --image-size N sets; 'longer' with --crop-size equal to N letterboxes: the "
        "whole part is kept and the short side padded; 'fit' letterboxes into --crop-size itself "
        "(with --image-size none); ignored with --crop-size auto (default: %(default)s)",
    )
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    fit.add_argument(
        "--seed", type=int, default=0, help="seed of the coreset sampling (default: %(default)s)"
    )
    fit.set_defaults(handler=_command_fit)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="score images and draw heat maps",
        description="Score images with a fitted model. Writes scores.csv (path, anomaly_score, decision, "
        "label: +1 good / -1 anomalous) and, per image, a heat-map overlay at the image's original size.",
    )
    predict.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    predict.add_argument(
        "images", metavar="IMAGES_OR_DIR", nargs="+", help="image files and/or folders of images"
    )
    predict.add_argument(
        "--out", default="skpatchcore-predictions", metavar="DIR", help="output folder (default: %(default)s)"
    )
    predict.add_argument("-r", "--recursive", action="store_true", help="also take images in sub-folders")
    predict.add_argument(
        "--skip-errors",
        action="store_true",
        help="score the readable images when some cannot be read, instead of stopping: the unreadable "
        "ones get empty scores and the reason in an extra 'error' column of scores.csv",
    )
    predict.set_defaults(handler=_command_predict)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[common],
        help="metrics and a report on a labelled test set",
        description="Evaluate a fitted model on the test images of an MVTec AD category folder: image AUROC, "
        "pixel AUROC and AUPRO on screen, plus metrics.json, scores.csv and a one-page report.png.",
    )
    evaluate.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    evaluate.add_argument(
        "data_dir", metavar="DATA_DIR", help="an MVTec AD category folder (test/ and ground_truth/)"
    )
    evaluate.add_argument(
        "--out", default="skpatchcore-evaluation", metavar="DIR", help="output folder (default: %(default)s)"
    )
    evaluate.set_defaults(handler=_command_evaluate)

    export = commands.add_parser(
        "export",
        parents=[common],
        help="write a fitted model as one ONNX file",
        description="Export a model written by 'fit' as one self-contained ONNX file holding its whole "
        "predict path (backbone, aggregation, nearest-neighbour search of the memory bank, maps) and its "
        "threshold and geometry. 'predict' and 'evaluate' run such a file with onnxruntime, without torch; "
        "in Python, skpatchcore.runtime.OnnxPatchCore does. Needs onnx, onnxscript and onnxruntime.",
    )
    export.add_argument("model", metavar="MODEL", help="a model file written by 'fit'")
    export.add_argument("-o", "--output", metavar="ONNX", required=True, help="the .onnx file to write")
    export.add_argument(
        "--input-size",
        type=_size,
        metavar="HxW",
        help="size of the images the file takes; needed only when the model keeps each image's aspect "
        "ratio (no crop), else the fitted geometry sets it",
    )
    export.add_argument(
        "--no-check",
        action="store_true",
        help="do not compare the written file with the model on two synthetic images",
    )
    export.set_defaults(handler=_command_export)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run everything on generated demo data",
        description=f"Generate a small synthetic data set (textured metal parts with scratches, spots and "
        f"cracks), fit with the offline backbone {_DEMO_BACKBONE}, evaluate, predict the test images and "
        "save the model. No download needed.",
    )
    demo.add_argument(
        "--data", metavar="DIR", help="use this MVTec AD category folder instead of generated data"
    )
    demo.add_argument(
        "--out", default="skpatchcore-demo", metavar="DIR", help="output folder (default: %(default)s)"
    )
    demo.set_defaults(handler=_command_demo)
    return parser


def _say(*lines) -> None:
    """Print to stdout now, so that messages and the progress bars on stderr stay in order."""
    print(*lines, sep="\n", flush=True)


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _missing_dependency(error: ImportError, command: str) -> str:
    """One line for a package that is not installed, saying what to do."""
    name = getattr(error, "name", None)
    if not isinstance(error, ModuleNotFoundError) or not name:
        return _one_line(error)
    package = name.split(".")[0]
    return (
        f"'{command}' needs the Python package '{package}', which is not installed here "
        f"({_one_line(error)}). Without torch, 'predict' and 'evaluate' run exported .onnx models (made "
        "by 'skpatchcore export' where skpatchcore is installed with its dependencies)."
    )


def _command_word(argv) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option)."""
    words = sys.argv[1:] if argv is None else list(argv)
    return next((word for word in words if not word.startswith("-")), None)


def main(argv=None) -> int:
    """Run the ``skpatchcore`` command; return the exit status."""
    # Only 'fit' shows the package defaults, which takes importing torch.
    parser = build_parser(fit_defaults=_command_word(argv) in (None, "fit"))
    args = parser.parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{_PROG}: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            args.handler(args)
        except _USER_ERRORS as exc:
            if args.traceback:
                raise
            print(f"{_PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except ImportError as exc:  # a dependency missing, e.g. torch in a runtime-only install
            if args.traceback:
                raise
            print(f"{_PROG}: error: {_missing_dependency(exc, args.command)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{_PROG}: interrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
