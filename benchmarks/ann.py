"""Exact against approximate nearest-neighbour search (PatchCoreDetector ``index=``).

For each shared data set (``mpdd/metal_plate`` and ``magnetic_tile/magnetic_tile``
under the data root; absent ones are skipped) the script computes the patch
features once (``efficientnet_lite0``, resize 256, crop 224, CPU) and the
greedy coreset once (``--ratio``, default 0.1, ``random_state=0``), then fits
``PatchCoreDetector(index=kind)`` for each kind (``flat`` = exact, ``ivf``,
``hnsw``, default options) on the same kept patches and reports

- **recall@1**: the fraction of test patches whose reported nearest bank
  vector is the exact nearest one (the ``flat`` result; a vector at exactly
  the same distance counts as found);
- **distance excess**: how much larger than the exact distance the reported
  one is, mean and max over the test patches (0 = exact);
- **search ms/img**: one search of all test patches through the detector's
  index, divided by the number of test images;
- **build s**: building one index on the whole bank; **fit s**:
  ``PatchCoreDetector.fit`` (bank, index and the out-of-fold threshold
  calibration, which searches exactly, whatever the index);
- **image AUROC / pixel AUROC** (``skpatchcore.metrics``) of the scores and
  maps computed from that search (patch score = distance to the reported
  neighbour, image score = its maximum, maps by ``skpatchcore._maps``, as the
  detector does with its defaults; checked against ``predict_map`` on the
  first test images).

Results go to ``<out>/<name>.json`` (every number, the settings and the
machine) and ``<out>/<name>.md`` (the table, also printed).

Examples::

    python benchmarks/ann.py                 # both data sets, all images -> results/ann.*
    python benchmarks/ann.py --quick         # 8 train / 8 test images    -> results/ann-quick.*
    python benchmarks/ann.py --ratio 0.01 --name ann-1pct
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    apply_threads,
    fmt,
    machine_info,
    machine_line,
    markdown_table,
    write_results,
)
from benchmarks.run_benchmarks import QUICK_TEST, QUICK_TRAIN, quick_subset  # noqa: E402
from skpatchcore import GreedyCoresetSampler, PatchCoreDetector, PatchFeatureTransformer  # noqa: E402
from skpatchcore._maps import anomaly_maps  # noqa: E402
from skpatchcore._search import NearestNeighborIndex  # noqa: E402
from skpatchcore.datasets import load_mvtec_category  # noqa: E402
from skpatchcore.metrics import image_auroc, pixel_metrics  # noqa: E402

CATEGORIES = ("mpdd/metal_plate", "magnetic_tile/magnetic_tile")
KINDS = ("flat", "ivf", "hnsw")
BACKBONE = "efficientnet_lite0"
IMAGE_SIZE, CROP_SIZE = 256, 224
CPU = torch.device("cpu")
# Agreement of the benchmark's scores with PatchCoreDetector.predict_map on the
# first test images (same neighbours; the searches differ only in batching).
CHECK_IMAGES = 4
CHECK_RTOL = 1e-3


def prepare(path: Path, ratio: float, quick: bool) -> dict:
    """Features of the training and test images, the coreset and the masks of one category."""
    data = load_mvtec_category(path)
    if quick:
        train, test, labels, mask_paths = quick_subset(data, QUICK_TRAIN, QUICK_TEST)
    else:
        train, test, labels, mask_paths = (
            data.train_paths,
            data.test_paths,
            np.asarray(data.test_labels),
            data.test_mask_paths,
        )
    features = PatchFeatureTransformer(
        backbone=BACKBONE, image_size=IMAGE_SIZE, crop_size=CROP_SIZE, resize_side="shorter", device="cpu"
    ).fit(train)
    start = time.perf_counter()
    train_features = features.transform(train)
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    kept = GreedyCoresetSampler(ratio=ratio, random_state=0, device="cpu").fit_transform(train_features)
    coreset_s = time.perf_counter() - start
    test_features, input_size = features._transform(test)
    return {
        "n_train": len(train),
        "n_test": len(test),
        "kept": kept,
        "test_features": test_features,
        "input_size": input_size,
        "labels": labels,
        "test_paths": test,
        "mask_paths": mask_paths,
        "features": features,
        "features_s": features_s,
        "coreset_s": coreset_s,
    }


def measure(kind: str, prepared: dict, exact: dict | None) -> dict:
    """Fit, build and search with one index kind; recall against ``exact`` (None: this is exact)."""
    start = time.perf_counter()
    # 1-NN scores: the search below asks each index for one neighbour, as recall@1 measures it
    detector = PatchCoreDetector(index=kind, n_neighbors=1, device="cpu").fit(prepared["kept"])
    fit_s = time.perf_counter() - start
    bank = detector.memory_bank_
    start = time.perf_counter()
    NearestNeighborIndex(bank, CPU, index=kind)
    build_s = time.perf_counter() - start

    test_features = prepared["test_features"]
    n_images, grid = len(test_features), test_features.shape[1:3]
    queries = torch.from_numpy(test_features.reshape(-1, test_features.shape[-1]))
    start = time.perf_counter()
    squared, indices = detector._index.search(queries, 1)
    search_s = time.perf_counter() - start
    distances = squared[:, 0].sqrt().numpy()
    indices = indices[:, 0].numpy()

    patch_scores = distances.reshape(n_images, *grid)
    image_scores = patch_scores.max(axis=(1, 2))
    maps = anomaly_maps(
        patch_scores, prepared["input_size"], sigma=detector.sigma, upsampling=detector.upsampling
    )
    check_maps, check_scores = detector.predict_map(
        test_features[:CHECK_IMAGES], prepared["input_size"], return_scores=True
    )
    np.testing.assert_allclose(image_scores[:CHECK_IMAGES], check_scores, rtol=CHECK_RTOL)
    assert np.abs(maps[:CHECK_IMAGES] - check_maps).max() <= CHECK_RTOL * check_maps.max()

    result = {
        "kind": kind,
        "options": detector._index.options,
        "bank": len(bank),
        "fit_s": fit_s,
        "build_s": build_s,
        "search_ms_per_image": 1000.0 * search_s / n_images,
        "image_auroc": image_auroc(prepared["labels"], image_scores),
        # Over the images' own pixels (DESIGN section 5).
        "pixel_auroc": pixel_metrics(
            prepared["features"], prepared["test_paths"], prepared["mask_paths"], maps=maps
        )["pixel_auroc"],
    }
    if exact is None:
        result.update(recall_at_1=1.0, mean_excess=0.0, max_excess=0.0)
        result["_exact"] = {"indices": indices, "distances": distances}
        return result
    same = (indices == exact["indices"]) | (distances == exact["distances"])
    positive = exact["distances"] > 0
    excess = distances[positive] / exact["distances"][positive] - 1.0
    result.update(
        recall_at_1=float(same.mean()),
        mean_excess=float(np.maximum(excess, 0.0).mean()),
        max_excess=float(excess.max()),
    )
    return result


def run(args) -> tuple[dict, str]:
    apply_threads(args.threads)
    info = machine_info()
    payload = {
        "machine": info,
        "settings": {
            "backbone": BACKBONE,
            "image_size": IMAGE_SIZE,
            "crop_size": CROP_SIZE,
            "resize_side": "shorter",
            "ratio": args.ratio,
            "random_state": 0,
            "device": "cpu",
            "kinds": list(KINDS),
            "quick": args.quick,
        },
        "categories": [],
    }
    rows = []
    for category in CATEGORIES:
        path = args.data_root / category
        if not path.is_dir():
            print(f"skipping {category}: not found at {path}", file=sys.stderr)
            continue
        print(f"{category}: features and coreset ...", file=sys.stderr)
        prepared = prepare(path, args.ratio, args.quick)
        entry = {
            "category": category,
            "n_train": prepared["n_train"],
            "n_test": prepared["n_test"],
            "features_s": prepared["features_s"],
            "coreset_s": prepared["coreset_s"],
            "results": [],
        }
        exact = None
        for kind in KINDS:
            print(f"{category}: index {kind} ...", file=sys.stderr)
            result = measure(kind, prepared, exact)
            if exact is None:  # the first kind is the exact search
                exact = result.pop("_exact")
            entry["results"].append(result)
            rows.append(
                [
                    category,
                    kind,
                    ", ".join(f"{key} {value}" for key, value in result["options"].items()) or "exact",
                    result["bank"],
                    fmt(result["recall_at_1"], 4),
                    fmt(100 * result["mean_excess"], 3, "%"),
                    fmt(100 * result["max_excess"], 1, "%"),
                    fmt(result["search_ms_per_image"], 1),
                    fmt(result["build_s"], 2),
                    fmt(result["fit_s"], 2),
                    fmt(result["image_auroc"]),
                    fmt(result["pixel_auroc"]),
                ]
            )
        payload["categories"].append(entry)
    headers = [
        "data set",
        "index",
        "options",
        "bank",
        "recall@1",
        "mean excess",
        "max excess",
        "search ms/img",
        "build s",
        "fit s",
        "image AUROC",
        "pixel AUROC",
    ]
    sizes = ", ".join(
        f"{c['category']} {c['n_train']} train / {c['n_test']} test" for c in payload["categories"]
    )
    markdown = "\n".join(
        [
            f"# Exact vs approximate search ({'quick: ' if args.quick else ''}coreset {args.ratio})",
            "",
            f"Machine: {machine_line(info)}",
            "",
            f"{BACKBONE}, resize {IMAGE_SIZE}, crop {CROP_SIZE}, CPU; {sizes}. recall@1 and the distance "
            "excess are over all test patches, against the exact (flat) search. Scores are 1-NN "
            "distances (n_neighbors=1); pixel AUROC over each image's own pixels (the centre crop's "
            "border counts as never flagged).",
            "",
            markdown_table(headers, rows),
        ]
    )
    return payload, markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="where the categories are")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (default 0.1)")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_TRAIN} train / {QUICK_TEST} test images per data set"
    )
    parser.add_argument("--threads", type=int, default=None, help="thread limit for torch and faiss")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--name", default=None, help="results file name (default: ann, or ann-quick)")
    args = parser.parse_args(argv)
    payload, markdown = run(args)
    if not payload["categories"]:
        print(f"No data set found under {args.data_root}.", file=sys.stderr)
        return 1
    json_path, md_path = write_results(
        args.out, args.name or ("ann-quick" if args.quick else "ann"), payload, markdown
    )
    print(markdown)
    print(f"\nWrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
