"""Option sweeps for the tuning page: one table per option, every data set and ratio.

Features are computed once per (data set, feature settings) and cached on disk,
so sweeping coreset and detector options costs only the coreset, the search
and the metrics. Each table row is one configuration; the first column of
settings is the option under study. Defaults are chosen from these tables
(DESIGN: one set of defaults for all data, no per-data-set tuning).

    python benchmarks/tune.py --study aggregation            # one study
    python benchmarks/tune.py --study all --out benchmarks/results

Studies are defined in STUDIES below; each maps a name to a list of
(feature, coreset, detector settings) variants.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from skpatchcore import GreedyCoresetSampler, PatchCoreDetector, PatchFeatureTransformer
from skpatchcore.datasets import load_mvtec_category
from skpatchcore.metrics import image_auroc, pixel_metrics

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CATEGORIES = {"mpdd/metal_plate": "mpdd/metal_plate", "magnetic_tile": "magnetic_tile/magnetic_tile"}

# Every variant is (feature settings, coreset settings, detector settings). The
# aggregation study uses the reference code's geometry (256 / 224) and coreset
# projection (128) so that its rows sit next to the reference-code and anomalib
# anchors; the other studies vary one option of the package defaults.
BACKBONE = {"backbone": "efficientnet_lite0"}
PAPER = {"image_size": 256, "crop_size": 224, "resize_side": "shorter"}
DEFAULTS = {"aggregation": "mean", "image_size": 320, "crop_size": 320, "resize_side": "longer"}
# The package defaults until they were chosen again from the geometry table (a 288 px centre crop).
CROP_288 = {"aggregation": "mean", "image_size": 320, "crop_size": 288, "resize_side": "shorter"}

STUDIES = {
    "aggregation": [
        ({**PAPER, "aggregation": "reference"}, {"projection_dim": 128}, {}),
        (
            {**PAPER, "aggregation": "reference", "pretrain_dim": 384, "target_dim": 384},
            {"projection_dim": 128},
            {},
        ),
        ({**PAPER, "aggregation": "mean"}, {"projection_dim": 128}, {}),
    ],
    "projection": [
        (DEFAULTS, {"projection_dim": 128}, {}),
        (DEFAULTS, {}, {}),
    ],
    "geometry": [
        ({"aggregation": "mean", **PAPER}, {}, {}),
        (CROP_288, {}, {}),
        ({"aggregation": "mean", "image_size": (256, 256), "crop_size": None}, {}, {}),
        ({"aggregation": "mean", "image_size": (320, 320), "crop_size": None}, {}, {}),
        (DEFAULTS, {}, {}),
    ],
    "layers": [
        (DEFAULTS, {}, {}),
        ({**DEFAULTS, "layers": ["blocks.2", "blocks.3", "blocks.4"]}, {}, {}),
        ({**DEFAULTS, "layers": ["blocks.2.1.bn1", "blocks.4.2.bn1"]}, {}, {}),
    ],
    "scoring": [
        (DEFAULTS, {}, {}),
        (DEFAULTS, {}, {"reweight_neighbors": 9}),
        (DEFAULTS, {}, {"n_neighbors": 3}),
        (DEFAULTS, {}, {"distance": "squared"}),
        (DEFAULTS, {}, {"upsampling": "nearest"}),
        (DEFAULTS, {}, {"sigma": 2.0}),
        (DEFAULTS, {}, {"sigma": 6.0}),
    ],
}


def _cached_features(category: str, settings: dict, cache: Path):
    key = hashlib.sha1(json.dumps([category, settings], sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]
    stem = cache / f"{category.replace('/', '_')}-{key}"
    data = load_mvtec_category(DATA_ROOT / CATEGORIES[category])
    if not stem.with_suffix(".json").exists():
        transformer = PatchFeatureTransformer(device="cpu", **settings).fit(data.train_paths[:1])
        np.save(stem.with_suffix(".train.npy"), transformer.transform(data.train_paths))
        test, size = transformer._transform(data.test_paths)
        np.save(stem.with_suffix(".test.npy"), test)
        stem.with_suffix(".json").write_text(json.dumps({"size": size}))
    size = tuple(json.loads(stem.with_suffix(".json").read_text())["size"])
    # The settings' geometry, defaults filled in, as a fitted transformer would hold it.
    model = SimpleNamespace(geometry_=PatchFeatureTransformer(**settings)._geometry())
    train = np.load(stem.with_suffix(".train.npy"))
    test = np.load(stem.with_suffix(".test.npy"), mmap_mode="r")
    return train, test, size, data, model


def evaluate(category, features, coreset, detector, ratio, seed, cache) -> dict:
    settings = {**BACKBONE, **features}
    train, test, size, data, geometry = _cached_features(category, settings, cache)
    start = time.perf_counter()
    kept = GreedyCoresetSampler(ratio, random_state=seed, device="cpu", **coreset).fit_transform(train)
    model = PatchCoreDetector(device="cpu", **detector).fit(kept)
    maps, scores = model.predict_map(test, output_size=size, return_scores=True)
    pixels = pixel_metrics(geometry, data.test_paths, data.test_mask_paths, maps=maps)
    return {
        "category": category,
        "ratio": ratio,
        "features": features,
        "coreset": coreset,
        "detector": detector,
        "image_auroc": image_auroc(data.test_labels, scores),
        # Over the images' own pixels (maps back at each original size).
        **{key: value for key, value in pixels.items() if key in ("pixel_auroc", "aupro")},
        "dims": int(train.shape[-1]),
        "grid": list(train.shape[1:3]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _label(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"


def markdown(study: str, rows: list[dict]) -> str:
    lines = [
        f"### {study}",
        "",
        "| data | coreset | feature settings | coreset / detector settings | grid x dims "
        "| image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['category']} | {r['ratio']:.0%} | {_label(r['features'])} | "
            f"{_label({**r['coreset'], **r['detector']})} | "
            f"{r['grid'][0]}x{r['grid'][1]} x {r['dims']} | {r['image_auroc']:.3f} | "
            f"{r['pixel_auroc']:.3f} | {r['aupro']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", nargs="+", default=["all"], help=f"one of {list(STUDIES)} or all")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.1])
    parser.add_argument(
        "--ratios-magnetic",
        nargs="+",
        type=float,
        default=[0.01],
        help="ratios for magnetic_tile (its 10%% coreset takes long on a CPU; the anchors are at 1%%)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="feature cache folder (default: a temp folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    studies = list(STUDIES) if "all" in args.study else args.study
    cache = Path(args.cache or tempfile.mkdtemp(prefix="skpatchcore-tune-"))
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for study in studies:
        rows = []
        for category in args.categories:
            if not (DATA_ROOT / CATEGORIES[category]).is_dir():
                print(f"skipping {category}: not found under {DATA_ROOT}")
                continue
            ratios = args.ratios if category != "magnetic_tile" else args.ratios_magnetic
            for features, coreset, detector in STUDIES[study]:
                for ratio in ratios:
                    rows.append(evaluate(category, features, coreset, detector, ratio, args.seed, cache))
                    print(json.dumps(rows[-1], default=str), flush=True)
        (out / f"tuning-{study}.json").write_text(json.dumps(rows, indent=2, default=str))
        (out / f"tuning-{study}.md").write_text(markdown(study, rows))
        print(markdown(study, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
