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
   (``make_patchcore(backbone="efficientnet_lite0", random_state=0)``: a box
   of about 320 x 320 px fitted to the images, 152 values per patch, ratio
   0.1, n_neighbors 3) with
   ``strategy="exact"`` (up to ``--exact-max`` images: its time grows with
   the square of N) and ``strategy="stream"``, each point in a fresh process.
   Recorded: fit time split into features, coreset and index (bank, search
   index and threshold calibration), peak RSS, the bank's size, and peak RSS
   less the bank. The streamed fits' time exponent is fitted on log-log
   axes (all points, and those of 1,000 images and more).
2. **Quality** (``--part quality``). On every shared category at
   ``--ratio`` (default 1 %), the features computed once: an exact coreset, a
   streamed one (the default ``chunk_size``) and one of the first half of the
   training images grown with ``partial_fit`` by the second half, each with
   ``--seeds`` random states (default 5: the exact greedy's own spread over
   its random start points is the scale of the differences); image AUROC,
   pixel AUROC and AUPRO (over each image's own pixels, as
   ``run_benchmarks.py`` computes them: :func:`skpatchcore.metrics.pixel_metrics`
   through the fitted geometry), of seed 0 and their mean, and the differences
   to the exact fit.

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


VARIANTS = ("exact", "stream", "halves")
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_quality_category(spec: dict) -> dict:
    """Exact, streamed and grown-in-halves banks of one category, for several seeds; their quality.

    The features of the training and test images are computed once (the
    package defaults); each variant and seed fits a coreset and a detector on
    them: ``strategy="exact"``, ``strategy="stream"`` (the default
    ``chunk_size``: the chunks and the selections of a streamed pipeline fit),
    and the first half of the training images grown with ``partial_fit`` by the
    second half (the sampler's and the detector's, as the pipeline's).
    """
    import numpy as np

    from skpatchcore import GreedyCoresetSampler, PatchCoreDetector, PatchFeatureTransformer
    from skpatchcore.datasets import load_mvtec_category
    from skpatchcore.metrics import image_auroc, pixel_metrics

    data = load_mvtec_category(Path(spec["data_root"]) / spec["category"])
    train, test = list(data.train_paths), list(data.test_paths)
    labels = np.asarray(data.test_labels)
    if spec["quick"]:
        keep = sorted({*range(0, len(test), max(1, len(test) // 8)), int(np.argmax(labels == -1))})
        train, test, labels = train[:12], [test[i] for i in keep], labels[keep]
        mask_paths = [data.test_mask_paths[i] for i in keep]
    else:
        mask_paths = data.test_mask_paths
    features = PatchFeatureTransformer(backbone=BACKBONE).fit(train)
    train_features = features.transform(train)
    test_features, input_size = features._transform(test)
    half, per_image = len(train) // 2, int(np.prod(train_features.shape[1:3]))

    def fitted(variant, seed):
        settings = {"ratio": spec["ratio"], "random_state": seed, **spec["settings"]}
        detector = PatchCoreDetector()
        if variant != "halves":
            sampler = GreedyCoresetSampler(strategy=variant, **settings)
            return sampler, detector.fit(sampler.fit_transform(train_features))
        sampler = GreedyCoresetSampler(**settings)
        detector.fit(sampler.fit_transform(train_features[:half]))
        new = train_features[half:]
        sampler.partial_fit(new)
        kept = np.zeros(len(new) * per_image, dtype=bool)
        offset = half * per_image
        kept[sampler.sample_indices_[sampler.sample_indices_ >= offset] - offset] = True
        mask = np.broadcast_to(~kept.reshape(*new.shape[:3], 1), new.shape)
        return sampler, detector.partial_fit(np.ma.MaskedArray(new, mask=mask))

    result = {"category": spec["category"], "ratio": spec["ratio"], "n_train": len(train)}
    result |= {"n_test": len(test), "seeds": spec["seeds"]}
    for variant in VARIANTS:
        runs = []
        for seed in range(spec["seeds"]):
            start = time.perf_counter()
            sampler, detector = fitted(variant, seed)
            fit_s = time.perf_counter() - start
            maps, scores = detector.predict_map(test_features, input_size, return_scores=True)
            # over each image's own pixels, through the fitted geometry (as run_benchmarks.py)
            pixel = pixel_metrics(features, test, mask_paths, maps=maps)
            chunk_images = max(1, sampler.chunk_size // per_image)
            runs.append(
                {
                    "seed": seed,
                    "coreset_and_index_s": fit_s,
                    "bank_size": len(detector.memory_bank_),
                    "n_chunks": math.ceil(len(train) / chunk_images),
                    "image_auroc": image_auroc(labels, scores),
                    "pixel_auroc": pixel["pixel_auroc"],
                    "aupro": pixel["aupro"],
                }
            )
        result[variant] = runs
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
    """Per category and fit: the metrics of seed 0, their mean over the seeds and the seeds'
    spread (largest less smallest), and each one's difference to the exact fit's."""
    import numpy as np

    headers = ["category", "fit", "bank", "seed 0: image AUROC / pixel AUROC / AUPRO", "delta vs exact"]
    headers += ["mean over seeds", "delta of means", "spread over seeds"]
    rows = []

    def triple(values, signed=False):
        return " / ".join(f"{value:+.3f}" if signed else f"{value:.3f}" for value in values)

    for r in results:
        if "error" in r:
            rows.append([r.get("category"), None, None, r["error"], *[None] * 4])
            continue
        table = {v: np.array([[run[m] for m in METRICS] for run in r[v]]) for v in VARIANTS}
        for variant in VARIANTS:
            values, exact = table[variant], table["exact"]
            label = {"exact": "exact", "stream": f"stream ({r[variant][0]['n_chunks']} chunks)"}
            label["halves"] = "half + partial_fit"
            different = variant != "exact"
            rows.append(
                [
                    f"{r['category']} ({r['n_train']} train)",
                    label[variant],
                    f"{r[variant][0]['bank_size']:,}",
                    triple(values[0]),
                    triple(values[0] - exact[0], signed=True) if different else None,
                    triple(values.mean(axis=0)),
                    triple(values.mean(axis=0) - exact.mean(axis=0), signed=True) if different else None,
                    triple(values.max(axis=0) - values.min(axis=0)),
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
            "package defaults (efficientnet_lite0, a box of about 320 x 320 px fitted to the images, "
            "152 values per patch, ratio 0.1, chunks of 65,536 patches), each fit in a fresh process. "
            "Index = memory "
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
            "Each category at the package defaults, the features computed once: an exact coreset; a "
            'streamed one (`strategy="stream"`, chunks of 65,536 patches, coresets '
            "of four times the chunk's share, pooled and reduced); one of the first half of the training "
            "images grown with `partial_fit` by the second half (sampler and detector). Each with "
            f"random_state 0 to {quality['seeds'] - 1}: the exact greedy's own spread over seeds "
            "(its random start points) is the scale against which to read the differences. Pixel "
            "AUROC and AUPRO over each image's own pixels (`pixel_metrics`, as `run_benchmarks.py`). "
            "Metrics as image AUROC / pixel AUROC / AUPRO.",
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
    parser.add_argument("--seeds", type=int, default=5, help="random_state 0..seeds-1 of the quality part")
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
            spec |= {"quick": args.quick, "settings": settings, "seeds": 2 if args.quick else args.seeds}
            results.append(run_in_subprocess("quality", spec, args.timeout))
        payload["quality"] = {
            "ratio": args.ratio,
            "seeds": spec["seeds"],
            "results": results,
            "note": args.note,
        }
        print(quality_table(results))

    json_path, md_path = write_results(out, name, payload, markdown(payload, args.quick))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    failed = [
        r for part in ("scaling", "quality") for r in payload.get(part, {}).get("results", []) if "error" in r
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
