"""Deployment without torch (issue 21): the exported ONNX file against the torch path and the reference code.

Two parts, written together to ``<out>/runtime.json`` and ``<out>/runtime.md``:

1. **Equality.** For each category (mpdd metal_plate, Magnetic Tile), each
   setting (the package defaults; the reference code's settings,
   ``REFERENCE_SETTINGS``) and each coreset ratio (1%, 10%): fit
   ``make_patchcore(backbone="efficientnet_lite0", ...)``, score the test
   images with the pipeline (``predict_map``), export it with
   ``skpatchcore.export_onnx`` and score the same images with
   ``skpatchcore.runtime.OnnxPatchCore``. Reported: the largest relative
   difference of the image scores and of the map pixels (each pixel against
   the pipeline's value), against the target 1e-4, and both image AUROCs.
2. **Speed and memory.** On mpdd metal_plate at 1% and 10%, three fresh
   processes score the same test images: the runtime alone (``import
   skpatchcore.runtime``, nothing else of the package; torch is checked to
   stay out of ``sys.modules``), the torch path (``skpatchcore.load`` +
   ``predict_map``) and the reference code (``benchmarks.plain.plain_pipeline``:
   its fit, then its predict, after the reference code's imports). Predict
   ms/img (after a warm-up on two images for ours; the reference code's
   predict follows its own fit), the time to load the model, and the peak
   RSS of each process. Runs are repeated (``--repeats``) with the three
   kinds interleaved; medians are reported. With the reference settings the
   three compute the same thing; with the defaults (``--speed-settings
   both``) the runtime is compared with the torch path only.

Models fitted in the equality part are saved (``skpatchcore.save``) and
exported into ``--work`` (a temporary folder by default) for the speed part.
The machine this runs on may be shared: the load average at the start is in
the header, and only ratios measured in the same run should be compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402 (torch-free: the runtime child imports it too)
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    REFERENCE_IMPORTS,
    REFERENCE_SETTINGS,
    current_rss_mb,
    fmt,
    fmt_ratio,
    markdown_table,
    peak_rss_mb,
    thread_env,
)

BACKBONE = "efficientnet_lite0"
MPDD = "mpdd/metal_plate"
MAGNETIC_TILE = "magnetic_tile/magnetic_tile"
SETTINGS = {"defaults": {}, "reference": dict(REFERENCE_SETTINGS)}
EQUALITY_RTOL = 1e-4
# Issue 21's targets for the runtime process.
RSS_SHARE_TARGET = 0.25  # of the reference code's peak RSS
SPEEDUP_TARGET = 3.0  # over the reference code's predict at 1%
PROCESSES = (
    ("onnx", "runtime (ONNX)"),
    ("onnx_operators", 'runtime, parallel="operators"'),
    ("torch", "torch path"),
    ("plain", "reference code"),
)
LATENCY_IMAGES = 20  # one call per image, for the wait of a single photo
EQUALITY_NOTE = (
    "Same fitted model, same images: `PatchCorePipeline.predict_map` (torch) against "
    "`skpatchcore.runtime.OnnxPatchCore.predict_map` (onnxruntime, CPU) on the test images. "
    "*max rel. diff*: the largest of |ONNX - torch| / |torch| over all image scores, and over "
    "all map pixels (each pixel against its own value); *max diff / max*: the largest difference "
    "of a map pixel over the largest map value. *worst image vs float64*: on the image whose map "
    "differs most, the largest relative difference of each path's map from a float64 yardstick "
    "(the pipeline's features, every distance to the bank in float64, the maps' matrices in "
    "float64): it says which side the difference comes from. Settings: *defaults* are the "
    "package's, *reference* the reference code's ({settings}). {images}"
)
SPEED_NOTE = (
    "*runtime (ONNX)*: a process that imports `skpatchcore.runtime` only and scores the images "
    'with `OnnxPatchCore.predict_map` at its defaults (CPU: `parallel="images"`, images read '
    "and scored side by side, one per thread, each run single-threaded); *runtime, "
    'parallel="operators"*: the same, one image at a time, each run spread over onnxruntime\'s '
    "threads; *torch path*: `skpatchcore.load` then `PatchCorePipeline.predict_map`; *reference "
    "code*: `benchmarks.plain.plain_pipeline`, the reference code's steps (its fit, then its "
    "predict, batch 8), after the reference code's imports; it runs the reference settings only. "
    "Predict ms/img over the test set in one call (ours after a warm-up on two images; the "
    "reference code's predict follows its fit); *one call per image*: ms per call over the "
    "first {latency} test images, one image per call (the wait for a single photo); load s: "
    "reading the model (onnxruntime session, or `skpatchcore.load` with the backbone); peak RSS: "
    "the whole process (the reference code's includes its fit, which the deployed model never runs)."
    " Medians of {repeats} runs, the processes "
    "interleaved. *ONNX speed-up* and *peak RSS share* compare the runtime with that row. "
    "Targets (issue 21): at least as fast as the torch path; peak RSS <= {share:g}x the "
    "reference code's, and >= {speedup:g}x its predict speed at 1%."
)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def category_paths(data_root: Path, category: str, max_train: int | None, max_test: int | None):
    """Train paths and (test paths, labels), each subset spread evenly when a maximum is given."""
    import numpy as np

    from skpatchcore.datasets import load_mvtec_category

    data = load_mvtec_category(data_root / category)
    train = _spread(data.train_paths, max_train)
    labels = np.asarray(data.test_labels)
    picks = np.arange(len(labels))
    if max_test is not None and max_test < len(labels):  # both labels, in proportion
        good, bad = np.flatnonzero(labels == 1), np.flatnonzero(labels == -1)
        n_good = max(1, round(max_test * len(good) / len(labels)))
        picks = np.sort(np.concatenate([_spread(good, n_good), _spread(bad, max_test - n_good)]))
    return train, [data.test_paths[i] for i in picks], labels[picks]


def _spread(items, count):
    import numpy as np

    items = list(items)
    if count is None or len(items) <= count:
        return items
    return [items[int(i)] for i in np.unique(np.linspace(0, len(items) - 1, count).round())]


# --------------------------------------------------------------------------
# 1. Equality
# --------------------------------------------------------------------------


def float64_maps(model, paths, size) -> tuple:
    """Maps (at ``size``) and scores of ``paths``: the pipeline's features, searched and mapped in float64.

    The yardstick for both paths' float32 rounding: the pipeline's features
    (so the backbone's rounding is the torch path's), every (patch, bank
    vector) distance in float64, the k nearest averaged, and the maps made
    with the detector's upsampling and Gaussian matrices in float64.
    """
    import numpy as np

    from skpatchcore._maps import blur_matrix, upsampling_matrix

    features, detector = model.named_steps["features"], model.named_steps["detector"]
    if detector.reweight_neighbors is not None:
        raise ValueError("the float64 yardstick does not do eq. 7 re-weighting")
    vectors = features.transform(paths).astype(np.float64)
    n_images, height, width, n_dims = vectors.shape
    queries = vectors.reshape(-1, n_dims)
    bank = detector.memory_bank_.astype(np.float64)
    k = min(detector.n_neighbors, len(bank))
    nearest = np.full((len(queries), k), np.inf)
    query_norms = np.einsum("ij,ij->i", queries, queries)
    for start in range(0, len(bank), 4096):
        chunk = bank[start : start + 4096]
        squared = query_norms[:, None] + np.einsum("ij,ij->i", chunk, chunk)[None, :] - 2 * queries @ chunk.T
        merged = np.concatenate([nearest, squared], axis=1)
        nearest = np.partition(merged, k - 1, axis=1)[:, :k] if merged.shape[1] > k else merged
    squared = np.maximum(nearest, 0.0)
    distances = squared if detector.distance == "squared" else np.sqrt(squared)
    patches = distances.mean(axis=1).reshape(n_images, height, width)
    operators = [
        (blur_matrix(length, detector.sigma) @ upsampling_matrix(grid, length, detector.upsampling)).numpy()
        for grid, length in zip((height, width), size)
    ]
    maps = operators[0] @ patches @ operators[1].T
    return maps, patches.reshape(n_images, -1).max(axis=1)


def _max_rel(values, reference) -> float:
    import numpy as np

    return float(np.max(np.abs(values - reference) / np.abs(reference)))


def equality_run(data_root, category, setting, ratio, seed, work: Path, limits: dict, reuse=False) -> dict:
    """Fit, score with the pipeline, export, score with the runtime; save the model for the speed part.

    With ``reuse``, a model already saved in ``work`` for this configuration
    is loaded instead of fitted (its fit time is the earlier run's); it is
    exported again, so the file is always this code's.
    """
    import numpy as np

    from skpatchcore import export_onnx, load, make_patchcore, save
    from skpatchcore.metrics import image_auroc
    from skpatchcore.runtime import OnnxPatchCore

    max_train, max_test = limits.get(category, (None, None))
    train, test, labels = category_paths(data_root, category, max_train, max_test)
    result = {
        "category": category,
        "settings": setting,
        "ratio": ratio,
        "n_train": len(train),
        "n_test": len(test),
    }
    stem = f"{category.split('/')[-1]}-{setting}-{ratio:g}"
    onnx_path, model_path = work / f"{stem}.onnx", work / f"{stem}.skpatchcore"
    times_path = work / f"{stem}.json"  # the fit time, for a run that reuses the model
    reused = reuse and model_path.is_file()
    if reused:
        model = load(model_path)
        if times_path.is_file():
            result.update(json.loads(times_path.read_text(encoding="utf-8")))
    else:
        params = {"backbone": BACKBONE, "ratio": ratio, "random_state": seed, "device": "cpu"}
        model = make_patchcore(**params, **SETTINGS[setting])
        start = time.perf_counter()
        model.fit(train)
        result["fit_s"] = time.perf_counter() - start
        save(model, model_path)
    result["reused_model"] = reused
    detector = model.named_steps["detector"]
    result["bank"] = list(detector.memory_bank_.shape)
    start = time.perf_counter()
    maps, scores = model.predict_map(test, return_scores=True)
    result["torch_predict_s"] = time.perf_counter() - start
    start = time.perf_counter()
    export_onnx(model, onnx_path)
    result["export_s"] = time.perf_counter() - start
    if not reused:
        times_path.write_text(json.dumps({"fit_s": result["fit_s"]}), encoding="utf-8")
    result["onnx_mb"] = onnx_path.stat().st_size / 2**20
    runtime = OnnxPatchCore(onnx_path)
    start = time.perf_counter()
    onnx_maps, onnx_scores = runtime.predict_map(test, return_scores=True)
    result["onnx_predict_s"] = time.perf_counter() - start

    result["score_max_rel"] = _max_rel(onnx_scores, scores)
    result["map_max_rel"] = _max_rel(onnx_maps, maps)
    result["map_max_rel_of_max"] = float(np.max(np.abs(onnx_maps - maps)) / np.max(np.abs(maps)))
    # Both paths against float64 on the image where they differ most.
    worst = int(np.argmax(np.max(np.abs(onnx_maps - maps) / np.abs(maps), axis=(1, 2))))
    exact_maps, exact_scores = float64_maps(model, [test[worst]], maps.shape[1:])
    result["worst_image"] = test[worst]
    result["worst_image_map_vs_float64"] = {
        "torch": _max_rel(maps[worst], exact_maps[0]),
        "onnx": _max_rel(onnx_maps[worst], exact_maps[0]),
    }
    result["worst_image_score_vs_float64"] = {
        "torch": _max_rel(scores[worst], exact_scores[0]),
        "onnx": _max_rel(onnx_scores[worst], exact_scores[0]),
    }
    result["same_labels"] = bool(np.array_equal(runtime.predict(test), model.predict(test)))
    result["image_auroc"] = image_auroc(labels, scores)
    result["onnx_image_auroc"] = image_auroc(labels, onnx_scores)
    result["met"] = bool(max(result["score_max_rel"], result["map_max_rel"]) <= EQUALITY_RTOL)
    result["model_path"], result["onnx_path"] = str(model_path), str(onnx_path)
    return result


def equality_table(results: list[dict]) -> str:
    headers = [
        "category",
        "settings",
        "coreset",
        "train / test",
        "bank",
        "scores: max rel. diff",
        "maps: max rel. diff",
        f"<= {EQUALITY_RTOL:g}",
        "maps: max diff / max",
        "worst image vs float64: torch / ONNX",
        "same labels",
        "image AUROC torch / ONNX",
        "ONNX file MB",
        "export s",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["category"], r["settings"], f"{100 * r['ratio']:g}%", "failed: " + r["error"]])
            rows[-1] += [None] * (len(headers) - len(rows[-1]))
            continue
        rows.append(
            [
                r["category"],
                r["settings"],
                f"{100 * r['ratio']:g}%",
                f"{r['n_train']} / {r['n_test']}",
                f"{r['bank'][0]} x {r['bank'][1]}",
                f"{r['score_max_rel']:.1e}",
                f"{r['map_max_rel']:.1e}",
                "yes" if r["met"] else "NO",
                f"{r['map_max_rel_of_max']:.1e}",
                "{torch:.1e} / {onnx:.1e}".format(**r["worst_image_map_vs_float64"]),
                "yes" if r["same_labels"] else "NO",
                f"{r['image_auroc']:.3f} / {r['onnx_image_auroc']:.3f}",
                fmt(r["onnx_mb"], 1),
                fmt(r.get("export_s"), 1),
            ]
        )
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------
# 2. Speed and memory (each measurement in a fresh process)
# --------------------------------------------------------------------------


def _child(spec: dict) -> dict:
    """One measurement in this (fresh) process: kind "onnx", "onnx_operators", "torch" or "plain"."""
    kind = spec["kind"]
    result = {"kind": kind, "rss_start_mb": current_rss_mb()}
    if kind == "plain":
        import importlib

        for name in REFERENCE_IMPORTS:  # the reference code's imports, as speed.py counts them
            importlib.import_module(name)
    elif kind == "torch":
        import skpatchcore

        skpatchcore.load  # noqa: B018 - imports the torch stack, as loading a model does
    else:
        import skpatchcore.runtime  # noqa: F401
    result["rss_after_imports_mb"] = current_rss_mb()
    data_root, category = Path(spec["data_root"]), spec["category"]
    train, test, _ = category_paths(data_root, category, spec.get("max_train"), spec.get("max_test"))
    if kind == "plain":
        from benchmarks import plain

        done = plain.plain_pipeline(train, test, spec["ratio"], spec["seed"], batch_size=8)
        result["predict_ms_per_image"] = done["times"]["predict_ms_per_image"]
        result["fit_s"] = done["times"]["fit_s"]
    else:
        start = time.perf_counter()
        if kind == "torch":
            import skpatchcore

            model = skpatchcore.load(spec["model_path"])
        else:
            from skpatchcore.runtime import OnnxPatchCore

            parallel = "operators" if kind == "onnx_operators" else "auto"
            model = OnnxPatchCore(spec["onnx_path"], n_threads=spec.get("threads"), parallel=parallel)
        result["load_s"] = time.perf_counter() - start
        result["rss_after_load_mb"] = current_rss_mb()
        start = time.perf_counter()
        model.predict_map(test[:2])  # warm-up
        result["warm_up_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model.predict_map(test)
        result["predict_ms_per_image"] = 1000.0 * (time.perf_counter() - start) / len(test)
        start = time.perf_counter()
        for path in test[:LATENCY_IMAGES]:
            model.predict_map([path])
        result["ms_per_call"] = 1000.0 * (time.perf_counter() - start) / len(test[:LATENCY_IMAGES])
    result["n_test"] = len(test)
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_imported"] = "torch" in sys.modules
    result["modules"] = sorted({name.split(".")[0] for name in sys.modules if not name.startswith("_")})
    return result


def run_child(spec: dict, timeout: float | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="skpatchcore-runtime-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-out"]
        try:
            done = subprocess.run([*command, str(out)], env=thread_env(spec.get("threads")), timeout=timeout)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = None
        if out.exists():
            return json.loads(out.read_text(encoding="utf-8"))
    return {"kind": spec["kind"], "error": f"no result ({'timed out' if code is None else f'exit {code}'})"}


def speed_runs(models: dict, data_root: Path, seed: int, threads, repeats: int, limit) -> dict:
    """``models[(setting, ratio)] = (model_path, onnx_path)``: medians over interleaved fresh processes."""
    import numpy as np

    found: dict = {}
    for _ in range(max(1, repeats)):
        for (setting, ratio), (model_path, onnx_path) in models.items():
            kinds = ("onnx", "onnx_operators", "torch") + (("plain",) if setting == "reference" else ())
            for kind in kinds:
                spec = {
                    "kind": kind,
                    "data_root": str(data_root),
                    "category": MPDD,
                    "ratio": ratio,
                    "seed": seed,
                    "threads": threads,
                    "max_train": limit[0],
                    "max_test": limit[1],
                    "model_path": model_path,
                    "onnx_path": onnx_path,
                }
                found.setdefault((setting, ratio, kind), []).append(run_child(spec))
    merged = {}
    for key, runs in found.items():
        failed = [run for run in runs if "error" in run]
        if failed:
            merged[key] = failed[0]
            continue
        median = dict(runs[0])
        for field in ("predict_ms_per_image", "ms_per_call", "peak_rss_mb", "load_s", "rss_after_imports_mb"):
            if field in runs[0]:
                median[field] = float(np.median([run[field] for run in runs]))
        median["runs"] = [
            {k: run.get(k) for k in ("predict_ms_per_image", "ms_per_call", "peak_rss_mb", "load_s")}
            for run in runs
        ]
        median["torch_imported"] = any(run["torch_imported"] for run in runs)
        merged[key] = median
    return merged


def speed_table(merged: dict, ratios: list[float], settings: list[str]) -> str:
    headers = [
        "settings",
        "coreset",
        "process",
        "predict ms/img",
        "one call per image ms",
        "load s",
        "peak RSS MB",
        "RSS after imports MB",
        "torch imported",
        "ONNX speed-up",
        "ONNX peak RSS share",
        "target",
        "met",
    ]
    rows = []
    for setting in settings:
        for ratio in ratios:
            onnx = merged.get((setting, ratio, "onnx"), {})
            for kind, label in PROCESSES:
                run = merged.get((setting, ratio, kind))
                if run is None:
                    continue
                if "error" in run:
                    rows.append([setting, f"{100 * ratio:g}%", label, "failed: " + run["error"]])
                    rows[-1] += [None] * (len(headers) - len(rows[-1]))
                    continue
                speedup = share = target = met = None
                if kind != "onnx" and "predict_ms_per_image" in onnx:
                    speedup = run["predict_ms_per_image"] / onnx["predict_ms_per_image"]
                    share = onnx["peak_rss_mb"] / run["peak_rss_mb"]
                    if kind == "torch":
                        target, met = ">= 1x faster", speedup >= 1.0
                    elif kind == "plain":
                        parts = [f"RSS <= {RSS_SHARE_TARGET:g}x"]
                        met = share <= RSS_SHARE_TARGET
                        if ratio == 0.01:
                            parts.append(f">= {SPEEDUP_TARGET:g}x faster")
                            met = met and speedup >= SPEEDUP_TARGET
                        target = ", ".join(parts)
                rows.append(
                    [
                        setting,
                        f"{100 * ratio:g}%",
                        label,
                        fmt(run["predict_ms_per_image"], 1),
                        fmt(run.get("ms_per_call"), 1),
                        fmt(run.get("load_s"), 2),
                        fmt(run["peak_rss_mb"], 0),
                        fmt(run.get("rss_after_imports_mb"), 0),
                        "yes" if run["torch_imported"] else "no",
                        fmt_ratio(speedup),
                        fmt(share, 2),
                        target,
                        None if met is None else ("yes" if met else "NO"),
                    ]
                )
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The exported ONNX file against the torch path and the reference code: equality "
        "of scores and maps, predict speed and peak RSS in fresh processes. Writes <out>/runtime.json "
        "and .md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of data sets")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--name", default=None, help="results file (default: runtime, runtime-quick)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the fitted models (temp)")
    parser.add_argument(
        "--reuse", action="store_true", help="load the models already in --work instead of fitting them"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument(
        "--categories", nargs="+", default=[MPDD, MAGNETIC_TILE], help="categories of the equality part"
    )
    parser.add_argument(
        "--magnetic-tile-test",
        type=int,
        default=96,
        help="Magnetic Tile test images in the equality part (spread evenly, both labels; 0: all 576)",
    )
    parser.add_argument(
        "--speed-settings",
        choices=["reference", "both"],
        default="both",
        help="settings of the speed part: the reference code's only, or also the package defaults",
    )
    parser.add_argument("--skip", choices=["equality", "speed"], default=None, help="leave a part out")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="thread limit (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 train / 8 test images, 1 repeat")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        try:
            result, code = _child(json.loads(args.child)), 0
        except Exception as exc:  # reported to the parent
            result = {"kind": json.loads(args.child)["kind"], "error": f"{type(exc).__name__}: {exc}"}
            result["traceback"], code = traceback.format_exc(), 1
        Path(args.child_out).write_text(json.dumps(result), encoding="utf-8")
        return code

    from benchmarks._common import machine_info, machine_line, write_results

    info = machine_info()
    print(machine_line(info), flush=True)
    limits = {MAGNETIC_TILE: (None, args.magnetic_tile_test or None)}
    if args.quick:
        limits = {category: (8, 8) for category in {*args.categories, MPDD}}
        args.repeats = 1
    name = args.name or ("runtime-quick" if args.quick else "runtime")
    work_context = tempfile.TemporaryDirectory(prefix="skpatchcore-models-") if args.work is None else None
    work = Path(work_context.name) if work_context else args.work
    work.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items() if k not in ("child",)}}
    sections = [f"## The exported ONNX file against the torch path\n\nMachine: {machine_line(info)}."]
    failed = False

    equality = []
    if args.skip != "equality":
        for category in args.categories:
            for setting in SETTINGS:
                for ratio in args.ratios:
                    print(f"equality: {category} {setting} {ratio:g}", flush=True)
                    try:
                        run = equality_run(
                            args.data_root, category, setting, ratio, args.seed, work, limits, args.reuse
                        )
                    except Exception as exc:  # noqa: BLE001 - reported in the table, the others carry on
                        traceback.print_exc()
                        run = {"category": category, "settings": setting, "ratio": ratio, "error": repr(exc)}
                    equality.append(run)
                    failed |= "error" in run or not run.get("met", False)
                    print(json.dumps({k: v for k, v in run.items() if not k.endswith("_path")}), flush=True)
        payload["equality"] = equality
        tile = args.magnetic_tile_test
        images = "All images."
        if args.quick:
            images = "Quick run: 8 training and 8 test images per category."
        elif tile:
            images = (
                f"Magnetic Tile: all training images, {tile} of its 576 test images spread evenly "
                "(both labels), to keep the run short on this machine; mpdd: all images."
            )
        if any(run.get("reused_model") for run in equality):
            images += (
                " The models were fitted by an earlier run of this script (--reuse; the fit times are "
                "that run's) and exported by this one."
            )
        note = EQUALITY_NOTE.format(
            settings=", ".join(f"{k}={v}" for k, v in REFERENCE_SETTINGS.items()), images=images
        )
        sections.append(
            "### Equality: scores and maps of the ONNX file against the pipeline's\n\n"
            + note
            + "\n\n"
            + equality_table(equality)
        )

    if args.skip != "speed":
        models = {}
        settings = ["reference"] if args.speed_settings == "reference" else ["reference", "defaults"]
        for setting in settings:
            for ratio in args.ratios:
                found = next(
                    (
                        r
                        for r in equality
                        if r["category"] == MPDD and r["settings"] == setting and r["ratio"] == ratio
                        if "error" not in r
                    ),
                    None,
                )
                if found is None:
                    print(f"fitting for the speed part: {setting} {ratio:g}", flush=True)
                    found = equality_run(
                        args.data_root, MPDD, setting, ratio, args.seed, work, limits, args.reuse
                    )
                models[setting, ratio] = (found["model_path"], found["onnx_path"])
        limit = limits.get(MPDD, (None, None))
        merged = speed_runs(models, args.data_root, args.seed, args.threads, args.repeats, limit)
        payload["speed"] = [{"settings": s, "ratio": r, "process": k, **v} for (s, r, k), v in merged.items()]
        failed |= any("error" in run for run in merged.values())
        failed |= any(
            run.get("torch_imported") for (_, _, kind), run in merged.items() if kind.startswith("onnx")
        )
        note = SPEED_NOTE.format(
            latency=LATENCY_IMAGES, repeats=args.repeats, share=RSS_SHARE_TARGET, speedup=SPEEDUP_TARGET
        )
        sections.append(
            "### Speed and memory: mpdd metal_plate test images, each process fresh\n\n"
            + note
            + "\n\n"
            + speed_table(merged, args.ratios, settings)
        )
    if work_context is not None:
        work_context.cleanup()

    markdown = "\n\n".join(sections)
    print(markdown)
    json_path, md_path = write_results(args.out, name, payload, markdown)
    print(f"wrote {json_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
