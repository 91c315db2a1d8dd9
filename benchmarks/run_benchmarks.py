"""Detection quality, time and memory of the pipeline on every shared data set.

For each category folder under the data root (a folder holding ``train/good``),
each coreset ratio and each settings variant, a fresh Python process fits
``make_patchcore(backbone="efficientnet_lite0", ...)`` on the training images,
scores the test images and reports

- image AUROC, pixel AUROC and AUPRO (FPR <= 0.3) on the masks brought to the
  model input geometry (DESIGN section 5);
- fit time split into backbone loading, features, coreset and index (memory
  bank + threshold calibration), each step fitted separately in pipeline order;
- predict time per image (one ``predict_map`` call over all test images:
  features, search and maps, divided by the number of images);
- peak RSS of that process (its own high-water mark, ``VmHWM`` on Linux), so each configuration's memory is
  its own.

Results go to ``<out>/<name>.json`` (all numbers, settings and the machine) and
``<out>/<name>.md`` (the table, also printed). Where the backbone and input
geometry match the anchors measured in issue 7 (reference code and anomalib),
they are printed next to ours.

Examples::

    python benchmarks/run_benchmarks.py                      # everything, defaults
    python benchmarks/run_benchmarks.py --quick              # smoke test: 8 + 8 images
    python benchmarks/run_benchmarks.py --set aggregation=mean --set crop_size=None --name mean-nocrop
    python benchmarks/run_benchmarks.py --sweep aggregation=reference,mean --name aggregation
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    REFERENCE_IMPORTS,
    REFERENCE_SETTINGS,
    apply_threads,
    current_rss_mb,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    parse_assignment,
    parse_value,
    peak_rss_mb,
    thread_env,
    write_results,
)

BACKBONE = "efficientnet_lite0"
QUICK_TRAIN = 8
QUICK_TEST = 8

# Anchors: image AUROC / pixel AUROC / AUPRO@0.3 of other implementations.
# Source: issue 7 ("Detection quality: beat both the reference code and anomalib"),
# measured on this project's machines with EfficientNet-Lite0 (blocks.2 + blocks.4),
# shorter side 256, centre crop 224, mean = std = 0.5, seed 0. "reference code" is
# amazon-science/patchcore-inspection at pretrain/target dims 1024 or 384.
ANCHOR_SOURCE = (
    "../shared/datasets/ANCHORS.md (EfficientNet-Lite0, shorter side 256, centre crop 224, seed 0; "
    "their pixel metrics over the 224 x 224 crop, ours over every pixel of each image)"
)
ANCHOR_GEOMETRY = {
    "backbone": BACKBONE,
    "layers": None,
    "image_size": 256,
    "crop_size": 224,
    "resize_side": "shorter",
}
ANCHORS: dict[tuple[str, float], dict[str, tuple[float, float, float]]] = {
    ("mpdd/metal_plate", 0.1): {
        "reference code, dims 1024": (0.973, 0.982, 0.921),
        "reference code, dims 384": (0.996, 0.985, 0.928),
        "anomalib 2.7": (1.000, 0.990, 0.942),
    },
    ("mpdd/metal_plate", 0.01): {
        "reference code, dims 1024": (0.968, 0.970, 0.886),
        "reference code, dims 384": (0.982, 0.966, 0.869),
        "anomalib 2.7": (1.000, 0.987, 0.921),
    },
    ("magnetic_tile/magnetic_tile", 0.01): {
        "reference code, dims 1024": (0.749, 0.772, 0.647),
        "reference code, dims 384": (0.745, 0.795, 0.658),
        "anomalib 2.7": (0.779, 0.823, 0.671),
    },
    # ../shared/datasets/ANCHORS.md (the reference code only, on the two newer categories).
    ("kolektorsdd/kolektorsdd", 0.01): {
        "reference code, dims 1024": (0.870, 0.894, 0.672),
    },
    ("bsdata/ball_screw_drive", 0.01): {
        "reference code, dims 1024": (0.777, 0.992, 0.794),
    },
}
# How the runs of benchmarks/plain.plain_pipeline (--with-reference) are labelled.
REFERENCE_LABEL = "reference code's steps (plain.py, 256 / 224, dims 1024)"
# Issue 7's bar: each metric >= the best anchor minus this margin.
ANCHOR_MARGIN = 0.005
METRICS = ("image_auroc", "pixel_auroc", "aupro")


# --------------------------------------------------------------------------
# Discovery and configuration
# --------------------------------------------------------------------------


def find_categories(root: Path) -> list[str]:
    """Category folders (holding ``train/good``) under ``root``, as sorted relative paths."""
    if not root.is_dir():
        return []
    found = set()
    for good in root.rglob("train/good"):
        if good.is_dir():
            found.add(good.parent.parent.relative_to(root).as_posix())
    return sorted(found)


def select_categories(available: list[str], wanted: list[str] | None) -> list[str]:
    """Filter by ``--categories``: a name matches the whole relative path or any part of it."""
    if not wanted:
        return available
    chosen = []
    for name in wanted:
        matches = [cat for cat in available if cat == name or name in cat.split("/")]
        if not matches:
            raise SystemExit(f"error: no category matches {name!r}; found: {', '.join(available) or 'none'}")
        chosen += [cat for cat in matches if cat not in chosen]
    return chosen


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, so ``(256, 320),None`` gives two items."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def settings_variants(sets: list[str], sweeps: list[str]) -> list[dict]:
    """The fixed ``--set`` overrides combined with every point of the ``--sweep`` grid."""
    fixed = {}
    for text in sets:
        key, value = parse_assignment(text)
        fixed[key] = parse_value(value)
    axes = []
    for text in sweeps:
        key, values = parse_assignment(text)
        axes.append([(key, parse_value(value)) for value in split_top_level(values)])
    variants = []
    for point in itertools.product(*axes):
        variant = dict(fixed)
        variant.update(point)
        variants.append(variant)
    return variants


def settings_label(settings: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items()) or "defaults"


def check_settings(settings: dict) -> None:
    """Fail early (before any process starts) on a parameter make_patchcore does not know."""
    from skpatchcore import make_patchcore

    reserved = {"backbone", "ratio", "random_state", "device", "verbose"} & set(settings)
    if reserved:
        raise SystemExit(f"error: set {sorted(reserved)} with their own options, not --set/--sweep")
    try:
        make_patchcore(backbone=BACKBONE, **settings)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


# --------------------------------------------------------------------------
# One configuration (runs in its own process)
# --------------------------------------------------------------------------


def _evenly(items: list, count: int) -> list[int]:
    """Indices of ``count`` items spread evenly over ``items`` (all when fewer)."""
    import numpy as np

    if len(items) <= count:
        return list(range(len(items)))
    return sorted({int(i) for i in np.linspace(0, len(items) - 1, count).round()})


def quick_subset(data, n_train: int, n_test: int):
    """A few training images and a test set with both good and defective images."""
    import numpy as np

    train = [data.train_paths[i] for i in _evenly(data.train_paths, n_train)]
    labels = np.asarray(data.test_labels)
    good, bad = np.flatnonzero(labels == 1), np.flatnonzero(labels == -1)
    n_good = min(len(good), max(1, n_test // 2))
    picks = [good[i] for i in _evenly(list(good), n_good)]
    picks += [bad[i] for i in _evenly(list(bad), n_test - n_good)]
    picks = sorted(int(i) for i in picks)
    test = [data.test_paths[i] for i in picks]
    return train, test, labels[picks], [data.test_mask_paths[i] for i in picks]


def _plain_params(estimator) -> dict:
    """JSON-friendly parameters of a step (module backbones and the like become repr)."""
    params = {}
    for key, value in estimator.get_params(deep=False).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            params[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str)) for v in value):
            params[key] = list(value)
        else:
            params[key] = repr(value)
    return params


def run_config(spec: dict) -> dict:
    """Fit, time and evaluate one (category, ratio, settings) configuration in this process."""
    import numpy as np

    from skpatchcore import make_patchcore
    from skpatchcore.datasets import load_mvtec_category
    from skpatchcore.metrics import image_auroc

    apply_threads(spec.get("threads"))
    result = {key: spec[key] for key in ("category", "ratio", "settings", "quick")}
    result["plain"] = bool(spec.get("plain"))
    # What the interpreter, torch, faiss and the package cost before any work (torch alone is 0.5-0.7 GB).
    result["rss_after_imports_mb"] = current_rss_mb()
    data = load_mvtec_category(Path(spec["data_root"]) / spec["category"])
    if spec["quick"]:
        train, test, labels, mask_paths = quick_subset(data, QUICK_TRAIN, QUICK_TEST)
    else:
        train, test = data.train_paths, data.test_paths
        labels, mask_paths = np.asarray(data.test_labels), data.test_mask_paths

    if spec.get("plain"):
        return _run_plain(spec, result, train, test, labels, mask_paths)

    pipe = make_patchcore(
        backbone=spec.get("backbone", BACKBONE),
        ratio=spec["ratio"],
        random_state=spec["seed"],
        device=spec["device"],
        verbose=spec["verbose"],
        **spec["settings"],
    )
    features, coreset, detector = (step for _, step in pipe.steps)
    result["params"] = {name: _plain_params(step) for name, step in pipe.steps}
    result["n_train"], result["n_test"] = len(train), len(test)
    result["n_test_defective"] = int((labels == -1).sum())

    # Fit step by step, in the order Pipeline.fit runs them (fit_transform of the
    # features step is fit then transform), so each step gets its own time.
    times = {}
    start = time.perf_counter()
    features.fit(train)
    times["load_s"] = time.perf_counter() - start
    result["rss_after_load_mb"] = current_rss_mb()  # imports + the backbone's weights
    start = time.perf_counter()
    train_features = features.transform(train)
    times["features_s"] = time.perf_counter() - start
    start = time.perf_counter()
    kept = coreset.fit_transform(train_features)
    times["coreset_s"] = time.perf_counter() - start
    start = time.perf_counter()
    detector.fit(kept)
    times["index_s"] = time.perf_counter() - start
    times["fit_s"] = times["features_s"] + times["coreset_s"] + times["index_s"]
    result["peak_rss_fit_mb"] = peak_rss_mb()
    result["feature_shape"] = list(train_features.shape)
    result["n_patches"] = int(coreset.n_patches_seen_)
    result["bank_size"] = len(detector.memory_bank_)
    result["threshold"] = detector.threshold_
    del kept, train_features

    start = time.perf_counter()
    maps, scores = pipe.predict_map(test, return_scores=True)
    times["predict_s"] = time.perf_counter() - start
    times["predict_ms_per_image"] = 1000.0 * times["predict_s"] / len(test)
    result["peak_rss_mb"] = peak_rss_mb()

    start = time.perf_counter()
    result["input_size"] = list(maps.shape[1:])
    result["image_auroc"] = image_auroc(labels, scores)
    result.update(_pixel_metrics(pipe, test, mask_paths, maps))
    times["evaluate_s"] = time.perf_counter() - start
    result["times"] = times

    if spec.get("verify_fit"):
        # The step-by-step fit must equal a plain Pipeline.fit (after the measurements).
        from sklearn.base import clone

        reference = clone(pipe).fit(train)
        same_bank = np.array_equal(reference.steps[-1][1].memory_bank_, detector.memory_bank_)
        same_threshold = reference.steps[-1][1].threshold_ == detector.threshold_
        result["verify_fit"] = bool(same_bank and same_threshold)
    return result


def _run_plain(spec: dict, result: dict, train, test, labels, mask_paths) -> dict:
    """:func:`benchmarks.plain.plain_pipeline` in this process, measured like :func:`run_config`.

    It runs issue 4's reference settings only (``REFERENCE_SETTINGS`` and the
    default backbone; batch 8, as the reference's table), and the imports it
    counts are the reference code's.
    """
    import importlib
    from types import SimpleNamespace

    from benchmarks import plain
    from skpatchcore.metrics import image_auroc
    from skpatchcore.utils._geometry import Geometry

    for name in REFERENCE_IMPORTS:  # the reference code's imports, so the baseline RSS matches
        importlib.import_module(name)
    result["rss_after_imports_mb"] = current_rss_mb()
    if spec["settings"] != REFERENCE_SETTINGS or spec.get("backbone", BACKBONE) != BACKBONE:
        raise ValueError(
            f"The plain pipeline runs {BACKBONE} with {REFERENCE_SETTINGS} only; got "
            f"{spec.get('backbone', BACKBONE)} with {spec['settings']}."
        )

    def on_step(name):
        if name == "load":
            result["rss_after_load_mb"] = current_rss_mb()
        else:
            result["peak_rss_fit_mb"] = peak_rss_mb()

    done = plain.plain_pipeline(train, test, spec["ratio"], spec["seed"], batch_size=8, on_step=on_step)
    result["peak_rss_mb"] = peak_rss_mb()
    result["n_train"], result["n_test"] = len(train), len(test)
    result["bank_size"] = done["bank_size"]
    result["times"] = done["times"]
    geometry = Geometry(*(REFERENCE_SETTINGS[key] for key in ("image_size", "crop_size", "resize_side")))
    result["image_auroc"] = image_auroc(labels, done["scores"])
    result.update(_pixel_metrics(SimpleNamespace(geometry_=geometry), test, mask_paths, done["maps"]))
    return result


def _pixel_metrics(model, test, mask_paths, maps) -> dict:
    """Pixel AUROC and AUPRO over the images' own pixels (DESIGN section 5), and what the crop cut."""
    from skpatchcore.metrics import pixel_metrics

    pixels = pixel_metrics(model, test, mask_paths, maps=maps)
    keys = ("pixel_auroc", "aupro", "n_defective_pixels", "n_defective_pixels_not_inspected")
    return {key: pixels[key] for key in keys}


def _single_main(spec_json: str, out_path: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = run_config(spec)
        code = 0
    except Exception as exc:  # reported to the parent, which carries on with the next configuration
        result = {key: spec.get(key) for key in ("category", "ratio", "settings", "quick")}
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        code = 1
    Path(out_path).write_text(json.dumps(result, default=repr), encoding="utf-8")
    return code


def run_in_subprocess(spec: dict, timeout: float | None = None) -> dict:
    """Run :func:`run_config` in a fresh interpreter (so its peak RSS is its own)."""
    with tempfile.TemporaryDirectory(prefix="skpatchcore-bench-") as tmp:
        out_path = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--single", json.dumps(spec)]
        command += ["--single-out", str(out_path)]
        try:
            completed = subprocess.run(command, env=thread_env(spec.get("threads")), timeout=timeout)
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        if out_path.exists():
            return json.loads(out_path.read_text(encoding="utf-8"))
    base = {key: spec.get(key) for key in ("category", "ratio", "settings", "quick")}
    reason = f"timed out after {timeout} s" if returncode is None else f"process exited with {returncode}"
    return {**base, "error": f"no result: {reason}"}


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def _fit_cell(times: dict) -> str:
    return (
        f"{times['fit_s']:.2f} ({times['features_s']:.2f} / {times['coreset_s']:.2f} / "
        f"{times['index_s']:.2f})"
    )


def results_table(results: list[dict]) -> str:
    headers = [
        "category",
        "coreset",
        "settings",
        "train / test",
        "bank",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "fit s (features / coreset / index)",
        "predict ms/img",
        "peak RSS MB (after imports)",
    ]
    rows = []
    for r in results:
        label = REFERENCE_LABEL if r.get("plain") else settings_label(r["settings"])
        if "error" in r:
            rows.append([r["category"], f"{100 * r['ratio']:g}%", label, None, None, "failed: " + r["error"]])
            rows[-1] += [None] * (len(headers) - len(rows[-1]))
            continue
        times = r["times"]
        rows.append(
            [
                r["category"],
                f"{100 * r['ratio']:g}%",
                label,
                f"{r['n_train']} / {r['n_test']}",
                r["bank_size"],
                fmt(r["image_auroc"]),
                fmt(r["pixel_auroc"]),
                fmt(r["aupro"]),
                _fit_cell(times),
                fmt(times["predict_ms_per_image"], 1),
                f"{r['peak_rss_mb']:.0f} ({r['rss_after_imports_mb']:.0f})"
                if r.get("rss_after_imports_mb")
                else fmt(r["peak_rss_mb"], 0),
            ]
        )
    return markdown_table(headers, rows)


def anchors_apply(result: dict) -> bool:
    """True for a run of our pipeline (not the plain reference steps) on a row with anchors."""
    key = (result["category"], round(float(result["ratio"]), 6))
    return "error" not in result and not result.get("plain") and key in ANCHORS


def faithful_anchor(result: dict) -> str | None:
    """The reference-code anchor our settings reproduce, if any (reference aggregation, same dims, k=1)."""
    features = result["params"]["features"]
    detector = result["params"]["detector"]
    if features.get("aggregation") != "reference" or detector.get("n_neighbors") != 1:
        return None
    if detector.get("reweight_neighbors") is not None or features.get("patch_size") != 3:
        return None
    dims = (features.get("pretrain_dim"), features.get("target_dim"))
    return {(1024, 1024): "reference code, dims 1024", (384, 384): "reference code, dims 384"}.get(dims)


def anchor_comparison(results: list[dict]) -> tuple[str, list[dict]]:
    """Markdown table of ours next to the anchors, and the per-row verdicts for the JSON."""
    names = ["reference code, dims 1024", "reference code, dims 384", "anomalib 2.7"]
    headers = ["category", "coreset", "settings", "ours (own pixels)"] + names
    headers += [f"target (best - {ANCHOR_MARGIN})", "ours >= target", "same aggregation as"]
    rows, verdicts = [], []

    def triple(values) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    for r in results:
        key = (r["category"], round(float(r["ratio"]), 6))
        anchors = ANCHORS.get(key)
        if anchors is None or not anchors_apply(r):
            continue
        ours = tuple(r[m] for m in METRICS)
        target = tuple(max(a[i] for a in anchors.values()) - ANCHOR_MARGIN for i in range(3))
        met = [o >= t - 1e-12 for o, t in zip(ours, target)]
        faithful = faithful_anchor(r)
        rows.append(
            [
                r["category"],
                f"{100 * r['ratio']:g}%",
                settings_label(r["settings"]),
                triple(ours),
                *(triple(anchors[name]) if name in anchors else "-" for name in names),
                triple(target),
                " / ".join("yes" if m else "NO" for m in met),
                faithful,
            ]
        )
        verdicts.append(
            {
                "category": r["category"],
                "ratio": r["ratio"],
                "settings": r["settings"],
                "ours": ours,
                "anchors": anchors,
                "target": target,
                "met": met,
                "faithful_to": faithful,
            }
        )
    if not rows:
        return "", verdicts
    return markdown_table(headers, rows), verdicts


def speed_comparison(results: list[dict]) -> str:
    """Ours next to the reference code's steps run in the same session: fit, predict, peak RSS."""
    plain = {(r["category"], r["ratio"]): r for r in results if r.get("plain") and "error" not in r}
    headers = [
        "category",
        "coreset",
        "settings",
        "fit s: ours / reference",
        "predict ms/img: ours / reference",
        "peak RSS MB: ours / reference",
        "not slower (fit, predict)",
    ]
    rows = []
    for r in results:
        reference = plain.get((r["category"], r["ratio"]))
        if r.get("plain") or "error" in r or reference is None:
            continue
        ours_t, ref_t = r["times"], reference["times"]
        fit = (ours_t["fit_s"], ref_t["fit_s"])
        predict = (ours_t["predict_ms_per_image"], ref_t["predict_ms_per_image"])
        rows.append(
            [
                r["category"],
                f"{100 * r['ratio']:g}%",
                settings_label(r["settings"]),
                f"{fit[0]:.1f} / {fit[1]:.1f}",
                f"{predict[0]:.1f} / {predict[1]:.1f}",
                f"{r['peak_rss_mb']:.0f} / {reference['peak_rss_mb']:.0f}",
                " / ".join("yes" if a <= b else "NO" for a, b in (fit, predict)),
            ]
        )
    return markdown_table(headers, rows) if rows else ""


def render_markdown(payload: dict) -> str:
    lines = [f"## PatchCore benchmark: {payload['name']}", ""]
    if payload["quick"]:
        lines += [
            f"**Quick smoke test** ({QUICK_TRAIN} train / {QUICK_TEST} test images per category): "
            "numbers are not comparable with the anchors or with full runs.",
            "",
        ]
    lines += [
        f"Backbone `{BACKBONE}`, device `{payload['device']}`, seed {payload['seed']}. "
        f"Machine: {machine_line(payload['machine'])}.",
        "",
        "Fit time excludes loading the backbone (`load_s` in the JSON). Index = memory bank, search "
        "index and threshold calibration. Predict = one `predict_map` call over the test set "
        "(features, search, maps) per image. Peak RSS of the process that ran the configuration; in "
        "brackets its RSS right after importing torch, faiss and the package, before any work.",
        "",
        results_table(payload["results"]),
    ]
    speed_md = speed_comparison(payload["results"])
    if speed_md:
        lines += [
            "",
            "### Speed next to the reference code, same session",
            "",
            "The reference code's steps (`benchmarks/plain.py`: PIL and torchvision transforms, timm's "
            "backbone, the literal unfold and pooling, the torch greedy loop, faiss `IndexFlatL2`, scipy's "
            "Gaussian; batch 8) at its own settings, each in its own process right after ours.",
            "",
            speed_md,
        ]
    anchor_md = payload.get("anchor_markdown")
    if anchor_md:
        lines += [
            "",
            f"### Next to the anchors (image AUROC / pixel AUROC / AUPRO; source: {ANCHOR_SOURCE})",
            "",
            anchor_md,
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Fit and evaluate the PatchCore pipeline (efficientnet_lite0) on every category under the "
            "data root at each coreset ratio; each configuration runs in a fresh process. Writes "
            "<out>/<name>.json and <out>/<name>.md and prints the table."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of data sets")
    parser.add_argument(
        "--categories",
        nargs="+",
        metavar="NAME",
        help="only these categories (relative path such as mpdd/metal_plate, or one of its parts)",
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.1], help="coreset ratios")
    parser.add_argument(
        "--skip-rows",
        nargs="+",
        default=[],
        metavar="NAME@RATIO",
        help="leave these (category, ratio) pairs out, e.g. magnetic_tile@0.1 (a category as for "
        "--categories); the defaults study's rows are every category at 0.01 and MPDD also at 0.1",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a make_patchcore parameter for every run (Python literal or text), repeatable; "
        "e.g. --set aggregation=mean --set crop_size=None",
    )
    parser.add_argument(
        "--sweep",
        dest="sweeps",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="run every listed value of a parameter (repeatable: the grid of all sweeps); "
        "e.g. --sweep aggregation=reference,mean --sweep 'image_size=256,(320, 320)'",
    )
    parser.add_argument("--seed", type=int, default=0, help="random_state of the coreset")
    parser.add_argument("--device", default="cpu", help="device for every step")
    parser.add_argument("--threads", type=int, default=None, help="limit torch/faiss/BLAS threads")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_TRAIN} train / {QUICK_TEST} test images"
    )
    parser.add_argument("--name", default=None, help="results file name (default: latest, or quick)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per configuration")
    parser.add_argument(
        "--with-reference",
        action="store_true",
        help="also run the reference code's steps (benchmarks/plain.py, at its own settings) on every "
        "category and ratio, each in its own process, and compare speed and memory",
    )
    parser.add_argument(
        "--verify-fit",
        action="store_true",
        help="also fit with Pipeline.fit and check it gives the same bank and threshold",
    )
    parser.add_argument("--verbose", action="store_true", help="progress bars inside each run")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--single-out", help=argparse.SUPPRESS)
    return parser


def _skip_row(text: str, categories: list[str]) -> tuple[str, float]:
    """``NAME@RATIO`` of ``--skip-rows`` as a (category, ratio) pair of this run."""
    name, _, ratio = text.rpartition("@")
    try:
        (category,) = select_categories(categories, [name])
        return category, float(ratio)
    except (ValueError, SystemExit):
        raise ValueError(f"--skip-rows takes NAME@RATIO for one category of this run; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.single is not None:
        return _single_main(args.single, args.single_out)

    try:
        variants = settings_variants(args.sets, args.sweeps)
    except ValueError as exc:
        parser.error(str(exc))
    for variant in variants:
        check_settings(variant)
    available = find_categories(args.data_root)
    if not available:
        print(f"No data sets found under {args.data_root} (no */train/good); nothing to do.")
        return 0
    categories = select_categories(available, args.categories)
    name = args.name or ("quick" if args.quick else "latest")

    payload = {
        "name": name,
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "backbone": BACKBONE,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "data_root": os.fspath(args.data_root),
        "categories": categories,
        "ratios": args.ratios,
        "settings_variants": variants,
        "anchor_source": ANCHOR_SOURCE,
        "machine": machine_info(),
        "results": [],
    }
    try:
        skipped = {_skip_row(text, categories) for text in args.skip_rows}
    except ValueError as exc:
        parser.error(str(exc))
    rows = [(c, r) for c in categories for r in args.ratios if (c, r) not in skipped]
    payload["skipped_rows"] = sorted(f"{c}@{r:g}" for c, r in skipped)
    # With the reference code, each row's run of it comes right after ours, so that both
    # meet the machine in the same state (other work on a shared machine comes and goes).
    configs = [
        config
        for category, ratio in rows
        for config in [(variant, category, ratio) for variant in variants]
        + ([(None, category, ratio)] if args.with_reference else [])
    ]
    failed = 0
    for number, (variant, category, ratio) in enumerate(configs, 1):
        shown = REFERENCE_LABEL if variant is None else settings_label(variant)
        print(f"[{number}/{len(configs)}] {category} ratio={ratio:g} {shown}", flush=True)
        spec = {
            "data_root": os.fspath(args.data_root),
            "category": category,
            "ratio": ratio,
            "plain": variant is None,
            "settings": REFERENCE_SETTINGS if variant is None else variant,
            "seed": args.seed,
            "device": args.device,
            "threads": args.threads,
            "quick": args.quick,
            "verbose": int(args.verbose),
            "verify_fit": args.verify_fit,
        }
        result = run_in_subprocess(spec, args.timeout)
        if "error" in result:
            failed += 1
            print(f"    FAILED: {result['error']}", flush=True)
        else:
            if result.get("verify_fit") is False:
                failed += 1
                result["error"] = "step-by-step fit differs from Pipeline.fit"
                print("    FAILED: step-by-step fit differs from Pipeline.fit", flush=True)
            t = result["times"]
            print(
                f"    image/pixel AUROC, AUPRO = {result['image_auroc']:.3f} / {result['pixel_auroc']:.3f} / "
                f"{result['aupro']:.3f}; fit {_fit_cell(t)} s; "
                f"predict {t['predict_ms_per_image']:.1f} ms/img; peak RSS {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        payload["results"].append(result)
        # Written after every configuration, so a long run leaves partial results behind.
        anchor_md, payload["anchor_comparison"] = anchor_comparison(
            [r for r in payload["results"] if "error" not in r]
        )
        payload["anchor_markdown"] = anchor_md
        markdown = render_markdown(payload)
        json_path, md_path = write_results(args.out, name, payload, markdown)

    print()
    print(markdown)
    print(f"\nWrote {json_path} and {md_path}")
    if failed:
        print(f"{failed} configuration(s) failed.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
