"""Fitting large training sets: time and memory against the set's size, and the quality of
streamed and grown models (issue 22).

Two parts, each printed as a markdown table and written, with the machine
description, to ``<out>/scaling.json`` and ``<out>/scaling.md`` (a part not
run keeps its last results there):

1. **Scaling** (``--part scaling``). Training sets of N images (``--sizes``,
   default 250 to 8,000) made by augmenting a shared category's training
   images (``--source``, default Magnetic Tile: flips, quarter turns, crops of
   80-100 %, brightness, contrast and noise; written as PNG files to a
   temporary folder, never kept) are fitted at the package defaults
   (``make_patchcore(backbone="efficientnet_lite0", random_state=0)``: 320 px
   letterbox, 40 x 40 patches of 152 values per image, ratio 0.1) with
   ``strategy="exact"`` (up to ``--exact-max`` images: its time grows with
   the square of N) and ``strategy="stream"``, each point in a fresh process.
   Recorded: fit time split into features, coreset and index (bank, search
   index and threshold calibration), peak RSS, the bank's size, and peak RSS
   less the bank. The streamed fits' time exponent is fitted on log-log
   axes (all points, and those of 1,000 images and more).
2. **Quality** (``--part quality``). On every shared category at
   ``--ratio`` (default 1 %): one exact fit, a streamed fit (the default
   ``chunk_size``) and a fit on the first half of the training images grown
   with ``partial_fit`` by the second half; image AUROC, pixel AUROC and
   AUPRO of each (pixel metrics as ``run_benchmarks.py`` computes them: maps
   at the model input size against the masks put through the same geometry),
   and the differences to the exact fit.

``--big N`` adds one streamed fit of N images (e.g. 10,000) to the scaling
part. Run from the repository root::

    python benchmarks/scaling.py                          # both parts
    python benchmarks/scaling.py --part scaling --sizes 250 500 1000 2000 4000 --big 10000
    python benchmarks/scaling.py --part quality --categories mpdd/metal_plate
    python benchmarks/scaling.py --quick                  # smoke test -> results/scaling-quick.*
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    current_rss_mb,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    peak_rss_mb,
    write_results,
)

BACKBONE = "efficientnet_lite0"
DEFAULT_SIZES = [250, 500, 1000, 2000, 4000, 8000]
CATEGORIES = [
    "mpdd/metal_plate",
    "magnetic_tile/magnetic_tile",
    "kolektorsdd/kolektorsdd",
    "bsdata/ball_screw_drive",
]


# --------------------------------------------------------------------------
# Synthetic training sets
# --------------------------------------------------------------------------


def augmented_images(sources: list[str], folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct images made from ``sources``, written to ``folder`` as PNG files.

    Image ``i`` is source ``i % len(sources)`` under a transform drawn from a
    generator seeded with ``(seed, i)``: one of the 8 flips and quarter turns,
    a crop of 80-100 % of each side, brightness and contrast within 10 %, and
    Gaussian noise of 2 grey levels. Files already there are reused.
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.png"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng([seed, index])
        with Image.open(sources[index % len(sources)]) as image:
            pixels = np.asarray(
                image.convert("L" if image.mode in ("L", "I;16", "I") else "RGB"), dtype=np.float32
            )
        pixels = np.rot90(pixels, k=int(rng.integers(4)))
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        height, width = pixels.shape[:2]
        crop_h, crop_w = (int(side * rng.uniform(0.8, 1.0)) for side in (height, width))
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        pixels = pixels[top : top + crop_h, left : left + crop_w]
        mean = pixels.mean()
        pixels = (pixels - mean) * rng.uniform(0.9, 1.1) + mean * rng.uniform(0.9, 1.1)
        pixels = pixels + rng.normal(0.0, 2.0, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(path)
    return paths


# --------------------------------------------------------------------------
# One fit or one category (each in its own process)
# --------------------------------------------------------------------------


def _timed(function, totals: dict, key: str):
    """``function``, adding the seconds each call takes to ``totals[key]``."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    return timed


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_scaling_point(spec: dict) -> dict:
    """Fit one training set at the defaults with one strategy; time, split and peak RSS."""
    from skpatchcore import make_patchcore

    result = {key: spec[key] for key in ("n_images", "strategy")}
    result["rss_after_imports_mb"] = current_rss_mb()
    paths = json.loads(Path(spec["paths_file"]).read_text(encoding="utf-8"))[: spec["n_images"]]
    pipe = make_patchcore(backbone=BACKBONE, random_state=0, strategy=spec["strategy"], **spec["settings"])
    features, coreset, detector = (step for _, step in pipe.steps)
    times: dict[str, float] = {}
    # The work of each step, wherever the fit calls it from.
    features.fit = _timed(features.fit, times, "load_s")  # building the backbone, checking the files
    features.transform = _timed(features.transform, times, "features_s")
    for name in ("fit", "_fit_bank"):
        setattr(detector, name, _timed(getattr(detector, name), times, "index_s"))
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    pipe.fit(paths)
    # CPU seconds of every thread of the process: on a shared machine, less
    # inflated than wall time by other work (it includes loading the backbone).
    times["fit_cpu_s"] = _cpu_seconds() - cpu_start
    times["fit_s"] = time.perf_counter() - start - times["load_s"]  # as run_benchmarks.py: without it
    times["coreset_s"] = times["fit_s"] - times.get("features_s", 0.0) - times.get("index_s", 0.0)
    result["times"] = times
    result["peak_rss_mb"] = peak_rss_mb()
    result["n_patches"] = int(coreset.n_patches_seen_)
    result["bank_size"] = len(detector.memory_bank_)
    result["bank_mb"] = detector.memory_bank_.nbytes / 2**20
    result["streamed"] = bool(coreset._streams(coreset.n_patches_seen_))
    result["shared_bank"] = coreset.coreset_ is detector.memory_bank_
    return result


def run_quality_category(spec: dict) -> dict:
    """Exact, streamed and grown-in-halves fits of one category; their detection quality."""
    import numpy as np

    from skpatchcore import make_patchcore
    from skpatchcore.datasets import load_masks, load_mvtec_category
    from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

    data = load_mvtec_category(Path(spec["data_root"]) / spec["category"])
    train, test = list(data.train_paths), list(data.test_paths)
    labels = np.asarray(data.test_labels)
    if spec["quick"]:
        keep = sorted({*range(0, len(test), max(1, len(test) // 8)), int(np.argmax(labels == -1))})
        train, test, labels = train[:12], [test[i] for i in keep], labels[keep]
        mask_paths = [data.test_mask_paths[i] for i in keep]
    else:
        mask_paths = data.test_mask_paths
    settings = {"backbone": BACKBONE, "ratio": spec["ratio"], "random_state": 0, **spec["settings"]}
    half = len(train) // 2
    variants = {
        "exact": lambda: make_patchcore(strategy="exact", **settings).fit(train),
        "stream": lambda: make_patchcore(strategy="stream", **settings).fit(train),
        "halves": lambda: make_patchcore(**settings).fit(train[:half]).partial_fit(train[half:]),
    }
    result = {
        "category": spec["category"],
        "ratio": spec["ratio"],
        "n_train": len(train),
        "n_test": len(test),
    }
    masks = None
    for name, fit in variants.items():
        start = time.perf_counter()
        pipe = fit()
        fit_s = time.perf_counter() - start
        maps, scores = pipe.predict_map(test, return_scores=True)
        if masks is None:
            features = pipe.steps[0][1]
            masks = load_masks(
                mask_paths,
                test,
                image_size=features.image_size,
                crop_size=features.crop_size,
                resize_side=features.resize_side,
            )
        coreset = pipe.steps[1][1]
        chunk_images = max(1, coreset.chunk_size // (coreset.n_vectors_seen_ // len(train)))
        result[name] = {
            "fit_s": fit_s,
            "bank_size": len(pipe.steps[-1][1].memory_bank_),
            "n_chunks": math.ceil(len(train) / chunk_images),
            "image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc(masks, maps),
            "aupro": aupro(masks, maps),
        }
    result["peak_rss_mb"] = peak_rss_mb()
    return result


RUNNERS = {"scaling": run_scaling_point, "quality": run_quality_category}


def run_in_subprocess(kind: str, spec: dict, timeout: float | None) -> dict:
    """One point in a fresh interpreter, so its peak RSS is its own."""
    with tempfile.TemporaryDirectory(prefix="skpatchcore-scaling-") as tmp:
        out_path = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--single", kind, json.dumps(spec)]
        command += ["--single-out", str(out_path)]
        try:
            returncode = subprocess.run(command, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            returncode = None
        if out_path.exists():
            return json.loads(out_path.read_text(encoding="utf-8"))
    reason = f"timed out after {timeout} s" if returncode is None else f"process exited with {returncode}"
    return {**{key: spec.get(key) for key in ("n_images", "strategy", "category")}, "error": reason}


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def exponent(points: list[tuple[float, float]]) -> float | None:
    """The slope of log(seconds) against log(images), least squares; None for fewer than 2 points."""
    import numpy as np

    if len(points) < 2:
        return None
    sizes, seconds = (np.log(np.array(values, dtype=float)) for values in zip(*points))
    return float(np.polyfit(sizes, seconds, 1)[0])


def scaling_summary(results: list[dict]) -> dict:
    def points(strategy, key="fit_s"):
        done = [r for r in results if r.get("strategy") == strategy and "times" in r]
        return [(r["n_images"], r["times"][key]) for r in done if key in r["times"]]

    streamed, exact, cpu = points("stream"), points("exact"), points("stream", "fit_cpu_s")
    return {
        "stream_exponent_all": exponent(streamed),
        "stream_exponent_from_1000": exponent([point for point in streamed if point[0] >= 1000]),
        "stream_cpu_exponent_all": exponent(cpu),
        "stream_cpu_exponent_from_1000": exponent([point for point in cpu if point[0] >= 1000]),
        "exact_exponent": exponent(exact),
    }


def scaling_table(results: list[dict]) -> str:
    headers = [
        "images",
        "strategy",
        "patches",
        "bank",
        "fit s (features / coreset / index)",
        "s per 1,000 images",
        "CPU s",
        "peak RSS MB",
        "bank MB",
        "peak less bank MB",
    ]
    rows = []
    for r in sorted(results, key=lambda r: (r.get("strategy", ""), r.get("n_images", 0))):
        if "error" in r:
            rows.append(
                [r.get("n_images"), r.get("strategy"), None, None, r["error"], None, None, None, None, None]
            )
            continue
        t = r["times"]
        parts = (t.get("features_s", 0.0), t["coreset_s"], t.get("index_s", 0.0))
        split = f"{t['fit_s']:.0f} ({' / '.join(f'{part:.0f}' for part in parts)})"
        rows.append(
            [
                f"{r['n_images']:,}",
                r["strategy"],
                f"{r['n_patches']:,}",
                f"{r['bank_size']:,}",
                split,
                fmt(1000 * t["fit_s"] / r["n_images"], 1),
                fmt(t.get("fit_cpu_s"), 0),
                fmt(r["peak_rss_mb"], 0),
                fmt(r["bank_mb"], 0),
                fmt(r["peak_rss_mb"] - r["bank_mb"], 0),
            ]
        )
    return markdown_table(headers, rows)


def quality_table(results: list[dict]) -> str:
    headers = [
        "category",
        "train",
        "fit",
        "bank",
        "fit s",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "delta vs exact",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("category"), None, None, None, None, None, None, None, r["error"]])
            continue
        exact = r["exact"]
        for name in ("exact", "stream", "halves"):
            v = r[name]
            delta = None
            if name != "exact":
                delta = " / ".join(f"{v[m] - exact[m]:+.3f}" for m in ("image_auroc", "pixel_auroc", "aupro"))
            label = {
                "exact": "exact",
                "stream": f"stream ({v['n_chunks']} chunks)",
                "halves": "half + partial_fit",
            }
            rows.append(
                [
                    r["category"],
                    r["n_train"],
                    label[name],
                    f"{v['bank_size']:,}",
                    fmt(v["fit_s"], 1),
                    fmt(v["image_auroc"]),
                    fmt(v["pixel_auroc"]),
                    fmt(v["aupro"]),
                    delta,
                ]
            )
    return markdown_table(headers, rows)


def markdown(payload: dict, quick: bool) -> str:
    lines = [
        f"# Fitting large training sets{' (quick)' if quick else ''}",
        "",
        f"Machine: {machine_line(payload['machine'])}.",
        "",
    ]
    scaling = payload.get("scaling")
    if scaling:
        summary = scaling["summary"]
        lines += [
            "## Time and memory against the number of training images",
            "",
            f"Augmented {scaling['source']} training images (see `benchmarks/scaling.py`), fitted at the "
            "package defaults (efficientnet_lite0, 320 px letterbox: 1,600 patches of 152 values per "
            "image, ratio 0.1, chunks of 262,144 patches), each fit in a fresh process. Index = memory "
            "bank, search index and threshold calibration; coreset = the rest of the fit (wall seconds, "
            "without loading the backbone). CPU s = CPU seconds of all the process's threads during "
            "the fit. Peak RSS of the fitting process.",
            "",
            scaling_table(scaling["results"]),
            "",
            "Streamed fit time exponent (log-log least squares): "
            f"{fmt(summary['stream_exponent_all'], 2)} over all sizes, "
            f"{fmt(summary['stream_exponent_from_1000'], 2)} from 1,000 images on; in CPU seconds "
            f"{fmt(summary.get('stream_cpu_exponent_all'), 2)} and "
            f"{fmt(summary.get('stream_cpu_exponent_from_1000'), 2)}; exact (wall): "
            f"{fmt(summary['exact_exponent'], 2)}.",
            "",
        ]
        if scaling.get("note"):
            lines += [scaling["note"], ""]
    quality = payload.get("quality")
    if quality:
        lines += [
            f"## Quality of streamed and grown models ({quality['ratio']:.0%} coreset)",
            "",
            "Each category at the package defaults: one exact fit; a streamed fit "
            '(`strategy="stream"`, chunks of 262,144 patches = 163 images, coresets of twice the '
            "chunk's share, reduced); a fit on the first half of the training images grown with "
            "`partial_fit` by the second half. Pixel AUROC and AUPRO at the model input size "
            "(masks through the same geometry, as `run_benchmarks.py`). Delta = image AUROC / pixel "
            "AUROC / AUPRO minus the exact fit's.",
            "",
            quality_table(quality["results"]),
            "",
        ]
        if quality.get("note"):
            lines += [quality["note"], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["scaling", "quality", "both"], default="both")
    parser.add_argument("--sizes", nargs="+", type=int, default=DEFAULT_SIZES, help="training set sizes")
    parser.add_argument("--exact-max", type=int, default=1000, help="largest set fitted exactly")
    parser.add_argument("--big", type=int, default=None, help="one more streamed fit of this many images")
    parser.add_argument("--source", default="magnetic_tile/magnetic_tile", help="category to augment")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES)
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset ratio of the quality part")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--work", default=None, help="folder for the synthetic images (default: temporary)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per point")
    parser.add_argument("--note", default=None, help="a line printed under the part's table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few images -> scaling-quick.*")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--single", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--single-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single:
        kind, spec = args.single
        result = RUNNERS[kind](json.loads(spec))
        Path(args.single_out).write_text(json.dumps(result), encoding="utf-8")
        return 0

    name = "scaling-quick" if args.quick else "scaling"
    out = Path(args.out)
    previous = out / f"{name}.json"
    payload = json.loads(previous.read_text(encoding="utf-8")) if previous.exists() else {}
    payload["machine"] = machine_info()
    settings = {"chunk_size": 16 * 1600} if args.quick else {}

    if args.part in ("scaling", "both"):
        sizes = [8, 16, 32] if args.quick else sorted(args.sizes)
        exact_max = 16 if args.quick else args.exact_max
        points = [(n, "exact") for n in sizes if n <= exact_max] + [(n, "stream") for n in sizes]
        if args.big:
            points.append((args.big, "stream"))
        data_root = Path(args.data_root)
        from skpatchcore.datasets import load_mvtec_category

        sources = list(load_mvtec_category(data_root / args.source).train_paths)
        with tempfile.TemporaryDirectory(prefix="skpatchcore-augmented-") as tmp:
            folder = Path(args.work) if args.work else Path(tmp)
            largest = max(n for n, _ in points)
            print(f"making {largest} training images in {folder} ...", file=sys.stderr)
            paths = augmented_images(sources, folder, largest)
            paths_file = folder / "paths.json"
            paths_file.write_text(json.dumps(paths), encoding="utf-8")
            results = []
            for n_images, strategy in points:
                print(f"fit: {n_images} images, {strategy} ...", file=sys.stderr)
                spec = {"n_images": n_images, "strategy": strategy, "paths_file": str(paths_file)}
                spec["settings"] = settings
                result = run_in_subprocess("scaling", spec, args.timeout)
                print(json.dumps(result), file=sys.stderr)
                results.append(result)
        payload["scaling"] = {
            "source": args.source,
            "results": results,
            "summary": scaling_summary(results),
            "note": args.note,
        }
        print(scaling_table(results))

    if args.part in ("quality", "both"):
        results = []
        for category in args.categories:
            if not (Path(args.data_root) / category / "train" / "good").is_dir():
                print(f"skipping {category}: not found under {args.data_root}", file=sys.stderr)
                continue
            print(f"quality: {category} ...", file=sys.stderr)
            spec = {"category": category, "ratio": args.ratio, "data_root": args.data_root}
            spec |= {"quick": args.quick, "settings": settings}
            results.append(run_in_subprocess("quality", spec, args.timeout))
        payload["quality"] = {"ratio": args.ratio, "results": results, "note": args.note}
        print(quality_table(results))

    json_path, md_path = write_results(out, name, payload, markdown(payload, args.quick))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [
        r for part in ("scaling", "quality") for r in payload.get(part, {}).get("results", []) if "error" in r
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
