"""Speed and memory of the package against its own plain implementations, in one run.

Four parts (issue 4), each printed as a markdown table and written, with the
machine description, to ``<out>/speed.json`` and ``<out>/speed.md``:

1. **Features.** The package's path (backbone, then the fused linear maps of
   ``skpatchcore._aggregation.aggregate``) against the backbone followed by the
   literal unfold-and-pool code of ``benchmarks/plain.py``, both fed the same
   activations; plus the bare backbone. Checks both agree to ``--tol``
   (largest absolute difference over the largest absolute value).
2. **Coreset.** ``greedy_indices_cpu`` against the plain greedy loops
   (``plain.greedy_coreset`` in NumPy, ``plain.greedy_coreset_torch`` in the
   reference code's style) on the same projected vectors of real mpdd
   features, at 10% and 1%. The indices must equal the NumPy loop's.
3. **Search.** The exact search of ``NearestNeighborIndex`` (with the bfloat16
   candidate filter where the CPU has bfloat16 hardware) against faiss's
   ``IndexFlatL2`` (what the reference code searches with), on the coreset's
   banks and the features of mpdd test images, 4 images a batch as predict
   searches them. Distances and indices must equal a plain search of every pair
   (``skpatchcore._search.pair_distances``) on a sample of queries.
4. **Whole pipeline.** Fit and predict of mpdd metal_plate at 1% and 10%, each
   in a fresh process, against the reference implementation's numbers of
   issue 4, and against ``plain.plain_pipeline`` (the reference code's steps
   put together from the plain parts: stock timm backbone, unfold and pool,
   the torch greedy loop, faiss ``IndexFlatL2``, scipy smoothing) run the same
   way right after each of ours, so the ratios to it do not depend on how fast
   the machine is that day.
5. **Scale** (``--scale``). 1,000 synthetic "images" of 28 x 28 x 1024 patch
   features (784k vectors) through ``GreedyCoresetSampler(ratio=0.01)`` and
   ``PatchCoreDetector.fit`` in a fresh process: time and peak RSS.

The script exits with status 1 when an equivalence check fails (features off
by more than ``--tol``, coreset indices or search results not identical) or a
part cannot run.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import plain  # noqa: E402
from benchmarks._common import (  # noqa: E402
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    REFERENCE_IMPORTS,
    REFERENCE_SETTINGS,
    apply_threads,
    current_rss_mb,
    fmt,
    fmt_ratio,
    machine_info,
    machine_line,
    markdown_table,
    peak_rss_mb,
    thread_env,
    write_results,
)
from benchmarks.run_benchmarks import _fit_cell  # noqa: E402

BACKBONE = "efficientnet_lite0"
MPDD = "mpdd/metal_plate"

# The reference implementation (amazon-science/patchcore-inspection) measured on
# this kind of machine with 2 threads: efficientnet_lite0, shorter side 256, crop
# 224, dims 1024, k = 1, approximate greedy coreset (projection 128, 10 starts),
# batch 8. Source: issue 4 ("Speed and memory: beat the reference implementation"),
# "Baseline to beat" table. Peak RSS was given as "1.5 GB"; taken here as GiB.
REFERENCE_SOURCE = "issue 4 baseline table (patchcore-inspection, efficientnet_lite0, 2 threads, batch 8)"
REFERENCE = {
    0.1: {"fit_s": 24.7, "features_s": 4.1, "coreset_s": 20.6, "predict_ms": 67.0, "peak_rss_mb": 1.5 * 1024},
    0.01: {"fit_s": 5.9, "features_s": 3.8, "coreset_s": 2.1, "predict_ms": 31.0, "peak_rss_mb": 1.5 * 1024},
}
# Rows of the same table for data we do not have here (kept for the record).
REFERENCE_OTHER = {
    "239 RGB 600x800 train images, 1%": {
        "fit_s": 72.9,
        "features_s": 27.5,
        "coreset_s": 45.3,
        "predict_ms": 42.0,
        "peak_rss_mb": 3.3 * 1024,
    },
    "300 640x640 train images, 1%": {
        "fit_s": 81.4,
        "features_s": 18.2,
        "coreset_s": 63.2,
        "predict_ms": 49.0,
        "peak_rss_mb": 4.6 * 1024,
    },
}
# Issue 4's targets.
TARGETS = {
    "features_speedup": 3.0,
    "coreset_speedup": 10.0,
    "fit_speedup": 5.0,
    "predict_speedup": {0.01: 2.0, 0.1: 1.3},
    "rss_ratio": 0.5,
    "scale_rss_mb": 16 * 1024,
}
# The end-to-end features row compares two different float32 backbones (batch
# norms folded or not): they differ by rounding, about 1e-5 of the largest
# activation on mpdd (each is ~6e-6 from a float64 run), so that row is checked
# at the CPU-vs-CUDA tolerance. The 1e-5 check of the aggregation itself is on
# the same-backbone rows.
END_TO_END_TOL = 1e-4
SCALE_GRID = (28, 28)
SCALE_DIM = 1024


def _yes(flag) -> str | None:
    return None if flag is None else ("yes" if flag else "NO")


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def load_pixels(paths: list[str], image_size=256, crop_size=224) -> torch.Tensor:
    """Images as the package feeds them to the backbone: (N, 3, H, W) float32 in [0, 1]."""
    from PIL import Image

    from skpatchcore.utils._geometry import Geometry

    geometry = Geometry(image_size, crop_size)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(geometry.apply(image.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def synthetic_pixels(n_images: int, seed: int, size: int = 224) -> torch.Tensor:
    """Random images (smooth blobs plus noise) for running without the data sets."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n_images, 3, size // 16, size // 16), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    noise = 0.1 * torch.rand((n_images, 3, size, size), generator=generator)
    return (0.9 * smooth + noise).clamp(0, 1)


def fitted_transformer(aggregation: str = "reference"):
    """A fitted PatchFeatureTransformer with the reference settings (fit only loads the backbone)."""
    from skpatchcore import PatchFeatureTransformer

    settings = {k: REFERENCE_SETTINGS[k] for k in ("image_size", "crop_size", "pretrain_dim", "target_dim")}
    transformer = PatchFeatureTransformer(
        backbone=BACKBONE, aggregation=aggregation, device="cpu", **settings
    )
    return transformer.fit(np.zeros((1, 32, 32, 3), dtype=np.uint8))


# --------------------------------------------------------------------------
# 1. Features
# --------------------------------------------------------------------------


def bench_features(pixels: torch.Tensor, batch_size: int, repeats: int, tol: float) -> dict:
    """Per-image times of the backbone, fast path and plain path, and their agreement."""
    from skpatchcore._aggregation import aggregate, build_stage_maps

    transformer = fitted_transformer("reference")
    backbone = transformer.backbone_
    with torch.inference_mode():
        channels = [stage.shape[1] for stage in backbone(pixels[:1])]
    fast_maps = {
        "reference": (transformer._stage_maps, transformer.n_features_out_),
        "mean": build_stage_maps(
            channels, "mean", 3, REFERENCE_SETTINGS["pretrain_dim"], REFERENCE_SETTINGS["target_dim"]
        ),
    }
    plain_fns = {
        "reference": lambda stages: plain.reference_features(
            stages, 3, REFERENCE_SETTINGS["pretrain_dim"], REFERENCE_SETTINGS["target_dim"]
        ),
        "mean": lambda stages: plain.mean_features(stages, 3, REFERENCE_SETTINGS["target_dim"]),
    }
    stock = plain.stock_backbone(BACKBONE)
    n_images = len(pixels)
    batches = [pixels[i : i + batch_size] for i in range(0, n_images, batch_size)]

    def prepared(batch):
        # As PatchFeatureTransformer._forward: channels-last input.
        return batch.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        # Warm-up: first calls allocate and pick kernels.
        stages = backbone(prepared(batches[0]))
        stock(batches[0].contiguous())
        for mode in fast_maps:
            aggregate(stages, *fast_maps[mode])
            plain_fns[mode](stages)

        totals = {
            "backbone": [],
            "stock_backbone": [],
            **{f"{kind}_{mode}": [] for kind in ("fast", "plain") for mode in fast_maps},
        }
        errors = dict.fromkeys(fast_maps, 0.0)
        scales = dict.fromkeys(fast_maps, 0.0)
        stock_error = stock_scale = 0.0
        for repeat in range(repeats):
            spent = dict.fromkeys(totals, 0.0)
            for batch in batches:
                start = time.perf_counter()
                stock_stages = stock(batch.contiguous())
                spent["stock_backbone"] += time.perf_counter() - start
                start = time.perf_counter()
                stages = backbone(prepared(batch))
                spent["backbone"] += time.perf_counter() - start
                if repeat == 0:
                    # End to end: the reference aggregation of the stock backbone.
                    ours = aggregate(stages, *fast_maps["reference"]).permute(0, 2, 3, 1)
                    theirs = plain_fns["reference"](stock_stages)
                    stock_error = max(stock_error, float((ours - theirs).abs().max()))
                    stock_scale = max(stock_scale, float(theirs.abs().max()))
                for mode, (maps, dim) in fast_maps.items():
                    start = time.perf_counter()
                    # The (B, h, w, d) layout the package returns.
                    fast = aggregate(stages, maps, dim).permute(0, 2, 3, 1).contiguous()
                    spent[f"fast_{mode}"] += time.perf_counter() - start
                    start = time.perf_counter()
                    slow = plain_fns[mode](stages)
                    spent[f"plain_{mode}"] += time.perf_counter() - start
                    if repeat == 0:
                        errors[mode] = max(errors[mode], float((fast - slow).abs().max()))
                        scales[mode] = max(scales[mode], float(slow.abs().max()))
            for key in totals:
                totals[key].append(spent[key])

    ms = {key: 1000.0 * min(values) / n_images for key, values in totals.items()}
    result = {
        "n_images": n_images,
        "batch_size": batch_size,
        "repeats": repeats,
        "input_size": list(pixels.shape[-2:]),
        "backbone_ms": ms["backbone"],
        "stock_backbone_ms": ms["stock_backbone"],
        "modes": {},
    }
    for mode in fast_maps:
        relative = errors[mode] / scales[mode] if scales[mode] > 0 else errors[mode]
        fast_total = ms["backbone"] + ms[f"fast_{mode}"]
        plain_total = ms["backbone"] + ms[f"plain_{mode}"]
        result["modes"][mode] = {
            "aggregate_fast_ms": ms[f"fast_{mode}"],
            "aggregate_plain_ms": ms[f"plain_{mode}"],
            "fast_ms": fast_total,
            "plain_ms": plain_total,
            "speedup": plain_total / fast_total,
            "aggregate_speedup": ms[f"plain_{mode}"] / ms[f"fast_{mode}"],
            "max_abs_error": errors[mode],
            "max_relative_error": relative,
            "equivalent": bool(relative <= tol),
            "plain_over_backbone": plain_total / ms["backbone"],
            "fast_over_backbone": fast_total / ms["backbone"],
        }
    reference = result["modes"]["reference"]
    stock_total = ms["stock_backbone"] + ms["plain_reference"]
    stock_relative = stock_error / stock_scale if stock_scale > 0 else stock_error
    result["end_to_end"] = {
        "fast_ms": reference["fast_ms"],
        "plain_ms": stock_total,
        "speedup": stock_total / reference["fast_ms"],
        "max_abs_error": stock_error,
        "max_relative_error": stock_relative,
        "equivalent": bool(stock_relative <= END_TO_END_TOL),
        "tolerance": END_TO_END_TOL,
    }
    return result


def features_table(result: dict, tol: float) -> str:
    headers = [
        "aggregation",
        "ours ms/img",
        "plain ms/img",
        "speed-up",
        "target",
        "met",
        "aggregation only: ours / plain ms",
        "max rel. error",
        f"<= {tol:g}",
    ]
    rows = [
        [
            "bare backbone",
            fmt(result["backbone_ms"], 1),
            fmt(result["stock_backbone_ms"], 1),
            fmt_ratio(result["stock_backbone_ms"] / result["backbone_ms"]),
            None,
            None,
            None,
            None,
            None,
        ]
    ]
    target = TARGETS["features_speedup"]
    for mode, r in result["modes"].items():
        rows.append(
            [
                f"{mode}, same backbone",
                fmt(r["fast_ms"], 1),
                fmt(r["plain_ms"], 1),
                fmt_ratio(r["speedup"]),
                None,
                None,
                f"{r['aggregate_fast_ms']:.2f} / {r['aggregate_plain_ms']:.2f}",
                f"{r['max_relative_error']:.1e}",
                _yes(r["equivalent"]),
            ]
        )
    end = result.get("end_to_end")
    if end:
        reference = result["modes"]["reference"]
        rows.append(
            [
                "**reference, end to end**",
                fmt(end["fast_ms"], 1),
                fmt(end["plain_ms"], 1),
                fmt_ratio(end["speedup"]),
                f">= {target:g}x",
                _yes(end["speedup"] >= target),
                f"{reference['aggregate_fast_ms']:.2f} / {reference['aggregate_plain_ms']:.2f}",
                f"{end['max_relative_error']:.1e}",
                f"{_yes(end['equivalent'])} (<= {end['tolerance']:g})",
            ]
        )
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------
# 2. Coreset
# --------------------------------------------------------------------------


def projected_points(vectors: np.ndarray, seed: int):
    """The projection and start points GreedyCoresetSampler(random_state=seed) draws."""
    return plain.projected_points(
        vectors, seed, REFERENCE_SETTINGS["projection_dim"], REFERENCE_SETTINGS["n_starts"]
    )


FAST_CORESET_REPEATS = 10
PLAIN_CORESET_WORK = 5e7  # selections x points up to which the plain loops run 3 times


def _timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def bench_coreset(vectors: np.ndarray, ratios: list[float], seed: int, repeats: int, plain_steps) -> dict:
    """Fast exact loop vs the plain loops on the same projected vectors."""
    from skpatchcore import GreedyCoresetSampler
    from skpatchcore._coreset._exact import greedy_indices_cpu

    points, starts = projected_points(vectors, seed)
    points = np.ascontiguousarray(points)
    result = {
        "n_vectors": len(vectors),
        "n_features": vectors.shape[1],
        "projected_dim": points.shape[1],
        "ratios": {},
    }
    for ratio in ratios:
        n_select = max(1, int(len(points) * ratio))
        # Best of several runs on both sides (a noisy 2-core machine): at least 10
        # of the fast loop (well under a second each), 3 of the plain loops where
        # they take a few seconds at most (else one).
        fast_times = []
        for _ in range(max(repeats, FAST_CORESET_REPEATS)):
            fast, seconds = _timed(greedy_indices_cpu, points, n_select, starts)
            fast_times.append(seconds)
        fast_s = min(fast_times)

        steps = n_select if plain_steps is None else min(n_select, plain_steps)
        extrapolated = steps < n_select
        plain_repeats = 3 if steps * len(points) <= PLAIN_CORESET_WORK else 1
        plain_np_s = plain_torch_s = np.inf
        for _ in range(plain_repeats):
            plain_np, seconds = _timed(plain.greedy_coreset, points, steps, starts)
            plain_np_s = min(plain_np_s, seconds)
            plain_torch, seconds = _timed(plain.greedy_coreset_torch, points, steps, starts)
            plain_torch_s = min(plain_torch_s, seconds)
        if extrapolated:
            # Each plain step is one full pass, so past the start (distances to the
            # start points, timed alone) the time grows linearly with the steps.
            _, np_init_s = _timed(plain.greedy_coreset, points, 0, starts)
            _, torch_init_s = _timed(plain.greedy_coreset_torch, points, 0, starts)
            plain_np_s = np_init_s + max(plain_np_s - np_init_s, 0.0) * n_select / steps
            plain_torch_s = torch_init_s + max(plain_torch_s - torch_init_s, 0.0) * n_select / steps
        identical = bool(np.array_equal(fast[:steps], plain_np))
        torch_agree = int(np.sum(np.cumprod(fast[:steps] == plain_torch)))

        sampler = GreedyCoresetSampler(
            ratio=ratio,
            projection_dim=REFERENCE_SETTINGS["projection_dim"],
            n_starts=REFERENCE_SETTINGS["n_starts"],
            random_state=seed,
            device="cpu",
        )
        _, sampler_s = _timed(sampler.fit, vectors)
        sampler_same = bool(np.array_equal(sampler.sample_indices_, fast))
        result["ratios"][str(ratio)] = {
            "ratio": ratio,
            "n_select": n_select,
            "fast_s": fast_s,
            "plain_numpy_s": plain_np_s,
            "plain_torch_s": plain_torch_s,
            "plain_steps_run": steps,
            "plain_extrapolated": extrapolated,
            "fast_runs": len(fast_times),
            "plain_runs": plain_repeats,
            "speedup_numpy": plain_np_s / fast_s,
            "speedup_torch": plain_torch_s / fast_s,
            "identical_to_plain_numpy": identical,
            "torch_loop_agreeing_prefix": torch_agree,
            "sampler_s": sampler_s,
            "sampler_matches_loop": sampler_same,
            "indices": fast,  # (taken out by the caller: the banks of the search part)
        }
    return result


def coreset_table(result: dict) -> str:
    headers = [
        "coreset",
        "selected",
        "ours s",
        "plain numpy s",
        "speed-up",
        "plain torch s",
        "speed-up",
        "target",
        "met (numpy / torch)",
        "identical indices",
        "sampler s (projection + loop)",
    ]
    rows = []
    for r in result["ratios"].values():
        mark = " (extrapolated)" if r["plain_extrapolated"] else ""
        # Met against each plain loop; the target counts as met only against both.
        target = TARGETS["coreset_speedup"]
        met = f"{_yes(r['speedup_numpy'] >= target)} / {_yes(r['speedup_torch'] >= target)}"
        same = r["identical_to_plain_numpy"] and r["sampler_matches_loop"]
        torch_note = (
            ""
            if r["torch_loop_agreeing_prefix"] == r["plain_steps_run"]
            else (f"; torch loop agrees on first {r['torch_loop_agreeing_prefix']}")
        )
        rows.append(
            [
                f"{100 * r['ratio']:g}% of {result['n_vectors']}",
                r["n_select"],
                fmt(r["fast_s"], 3),
                fmt(r["plain_numpy_s"], 2) + mark,
                fmt_ratio(r["speedup_numpy"]),
                fmt(r["plain_torch_s"], 2) + mark,
                fmt_ratio(r["speedup_torch"]),
                f">= {target:g}x",
                met,
                _yes(same) + torch_note,
                fmt(r["sampler_s"], 3),
            ]
        )
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------
# 3. Search
# --------------------------------------------------------------------------

SEARCH_BATCH_IMAGES = 4  # as PatchCorePipeline.predict_map searches on the CPU
SEARCH_REPEATS = 5
SEARCH_CHECKED_QUERIES = 600


class _CountedFlat:
    """Wraps faiss's flat index, counting the queries the filter leaves to it."""

    def __init__(self, index, left: list):
        self.index, self.left = index, left

    def search(self, rows, k):
        self.left.append(len(rows))
        return self.index.search(rows, k)


def _search_one(bank: np.ndarray, batches: list, checked: np.ndarray, n_images: float) -> dict:
    import faiss

    from skpatchcore._search import NearestNeighborIndex

    ours = NearestNeighborIndex(bank, torch.device("cpu"))
    left = []
    flat = ours._faiss_flat
    ours._faiss_flat = lambda: _CountedFlat(flat(), left)
    reference = faiss.IndexFlatL2(bank.shape[1])
    reference.add(bank)
    tensors = [torch.from_numpy(b) for b in batches]

    def run_ours():
        for b in tensors:
            ours.search(b, 1)

    def run_faiss():
        for b in batches:
            reference.search(b, 1)

    run_ours(), run_faiss()  # warm both
    left.clear()
    ours_s = faiss_s = np.inf
    for _ in range(SEARCH_REPEATS):  # interleaved, best of each
        ours_s = min(ours_s, _timed(run_ours)[1])
        faiss_s = min(faiss_s, _timed(run_faiss)[1])
    squared, found = ours.search(torch.from_numpy(checked), 1)
    plain_squared, plain_found = plain.nearest_all_pairs(bank, checked, 1)
    faiss_squared, faiss_found = reference.search(checked, 1)
    return {
        "bank_size": len(bank),
        "backend": ours.backend,
        "ours_ms_per_image": 1000 * ours_s / n_images,
        "faiss_ms_per_image": 1000 * faiss_s / n_images,
        "speedup": faiss_s / ours_s,
        "queries_left_to_faiss": sum(left) / SEARCH_REPEATS,
        "checked_queries": len(checked),
        "identical_to_plain": bool(
            np.array_equal(found.numpy(), plain_found) and np.array_equal(squared.numpy(), plain_squared)
        ),
        "faiss_same_neighbour": float(np.mean(faiss_found == plain_found)),
        "faiss_max_relative_difference": float(
            np.max(np.abs(faiss_squared - plain_squared) / np.maximum(plain_squared, 1e-30))
        ),
    }


def bench_search(vectors: np.ndarray, banks: dict, queries: np.ndarray, per_image: int) -> dict:
    """The package's exact search vs faiss IndexFlatL2, batch by batch, per bank."""
    batch = SEARCH_BATCH_IMAGES * per_image
    batches = [queries[start : start + batch] for start in range(0, len(queries), batch)]
    n_images = len(queries) / per_image
    checked = queries[:: max(1, len(queries) // SEARCH_CHECKED_QUERIES)]
    result = {"n_queries": len(queries), "n_images": n_images, "batch_images": SEARCH_BATCH_IMAGES}
    result["banks"] = {
        str(ratio): {
            "ratio": ratio,
            **_search_one(np.ascontiguousarray(vectors[indices]), batches, checked, n_images),
        }
        for ratio, indices in banks.items()
    }
    return result


def search_table(result: dict) -> str:
    headers = [
        "bank",
        "vectors",
        "ours ms/img",
        "faiss IndexFlatL2 ms/img",
        "speed-up",
        "ours: identical to all pairs",
        "queries left to faiss",
        "faiss: same neighbour / max rel. difference",
    ]
    rows = []
    for r in result["banks"].values():
        rows.append(
            [
                f"{100 * r['ratio']:g}% ({r['backend']})",
                r["bank_size"],
                fmt(r["ours_ms_per_image"], 2),
                fmt(r["faiss_ms_per_image"], 2),
                fmt_ratio(r["speedup"]),
                (
                    f"{_yes(r['identical_to_plain'])} ({r['checked_queries']} queries)"
                    if r["backend"] == "bfloat16-filter"
                    else "— (faiss itself)"
                ),
                f"{r['queries_left_to_faiss']:g} of {result['n_queries']}",
                f"{100 * r['faiss_same_neighbour']:.1f}% / {r['faiss_max_relative_difference']:.1e}",
            ]
        )
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------
# 4. Whole pipeline
# --------------------------------------------------------------------------


def bench_pipeline(
    data_root: Path, ratios: list[float], seed: int, quick: bool, threads, repeats: int = 1, plain_too=True
) -> dict:
    """Fit and predict mpdd metal_plate in fresh processes (run_benchmarks' single mode).

    With ``repeats`` > 1 each ratio runs that many times, the runs of both
    ratios interleaved, and :func:`_median_run` reports them (all runs' times
    are kept under ``runs``). With ``plain_too`` each of our runs is followed
    by one of :func:`benchmarks.plain.plain_pipeline` on the same images, the
    reference code's steps measured the same way on this machine at this time
    (reported under the run's ``"plain"`` key).
    """
    from benchmarks.run_benchmarks import run_in_subprocess

    specs = {}
    for ratio in ratios:
        spec = {
            "data_root": str(data_root),
            "category": MPDD,
            "ratio": ratio,
            "settings": dict(REFERENCE_SETTINGS),
            "seed": seed,
            "device": "cpu",
            "threads": threads,
            "quick": quick,
            "verbose": 0,
            "verify_fit": False,
        }
        specs[str(ratio)] = spec
    kinds = (False, True) if plain_too else (False,)
    done: dict[tuple, list[dict]] = {(key, kind): [] for key in specs for kind in kinds}
    for _ in range(max(1, repeats)):
        for key, spec in specs.items():
            for kind in kinds:
                done[key, kind].append(run_in_subprocess({**spec, "plain": kind}))
    runs = {key: _median_run(done[key, False]) for key in specs}
    if plain_too:
        for key in specs:
            runs[key]["plain"] = _median_run(done[key, True])
    return runs


def _median_run(found: list[dict]) -> dict:
    """The run with the median fit time (so its parts add up), with the median predict time
    and peak RSS over ``found``; or the first failure."""
    failed = [run for run in found if "error" in run]
    if failed:
        return failed[0]
    by_fit = sorted(found, key=lambda run: run["times"]["fit_s"])
    merged = dict(by_fit[(len(by_fit) - 1) // 2])
    merged["times"] = dict(merged["times"])
    for key in ("predict_s", "predict_ms_per_image"):
        merged["times"][key] = float(np.median([run["times"][key] for run in found]))
    merged["peak_rss_mb"] = float(np.median([run["peak_rss_mb"] for run in found]))
    merged["n_runs"] = len(found)
    merged["runs"] = [{"times": run["times"], "peak_rss_mb": run["peak_rss_mb"]} for run in found]
    return merged


OUR_IMPORTS = ("torch", "faiss", "skpatchcore")


def imports_rss_mb(modules, threads) -> float | None:
    """RSS of a fresh interpreter right after importing ``modules`` (None if one is missing)."""
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        f"for name in {tuple(modules)!r}: importlib.import_module(name)\n"
        "from benchmarks._common import current_rss_mb\n"
        "print(current_rss_mb())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=thread_env(threads)
    )
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def memory_floor(runs: dict, threads) -> dict:
    """The part of the peak RSS no fit can avoid: the imports, the backbone's
    weights and the float32 training features.

    Issue 4 asks for the features in one preallocated float32 array; with the
    imports and the backbone they set a lower limit on any run's peak. Ours
    are as a run saw them; the reference's import RSS is measured with the
    modules it loads, in this environment.
    """
    floor = {
        "our_imports_mb": None,
        "reference_imports_mb": imports_rss_mb(REFERENCE_IMPORTS, threads),
        "torch_import_mb": imports_rss_mb(("torch",), threads),
        "reference_modules": list(REFERENCE_IMPORTS),
    }
    for run in runs.values():
        if "error" not in run and run.get("feature_shape"):
            floor["features_mb"] = float(np.prod(run["feature_shape"])) * 4 / 1024**2
            if run.get("rss_after_load_mb") and run.get("rss_after_imports_mb"):
                floor["our_imports_mb"] = run["rss_after_imports_mb"]
                floor["backbone_mb"] = run["rss_after_load_mb"] - run["rss_after_imports_mb"]
    if floor["our_imports_mb"] is None:
        floor["our_imports_mb"] = imports_rss_mb(OUR_IMPORTS, threads)
    return floor


def pipeline_table(runs: dict, quick: bool, floor: dict | None = None) -> str:
    headers = [
        "mpdd metal_plate",
        "",
        "ours",
        "reference",
        "ratio",
        "target",
        "met",
        "plain, this run",
        "ratio to plain",
    ]
    rows = []
    for run in runs.values():
        label = f"{100 * run['ratio']:g}%" + (" (quick subset)" if quick else "")
        if "error" in run:
            rows.append([label, "failed", run["error"], None, None, None, None, None, None])
        else:
            rows += _pipeline_rows(run, label, floor)
    return markdown_table(headers, rows)


def _pipeline_rows(run: dict, label: str, floor: dict | None) -> list[list]:
    """One ratio's rows of :func:`pipeline_table`."""
    ratio = run["ratio"]
    rows = []
    ref = REFERENCE.get(ratio)
    plain_run = run.get("plain")
    if plain_run is not None and "error" in plain_run:
        rows.append([label, "plain pipeline failed", None, None, None, None, None, plain_run["error"], None])
        plain_run = None
    t = run["times"]
    pt = plain_run["times"] if plain_run else None

    def row(what, ours, ref_cell, ratio_cell, target, met, plain_cell, plain_ratio):
        cells = [ours, ref_cell, ratio_cell, target, met] if ref else [ours, None, None, None, None]
        rows.append([label, what, *cells, plain_cell if pt else None, plain_ratio if pt else None])

    def speedup(key):
        return fmt_ratio(pt[key] / t[key]) if pt else None

    ours_fit = _fit_cell(t)
    fit_speedup = ref["fit_s"] / t["fit_s"] if ref else None
    row(
        "fit s (features / coreset / index)",
        ours_fit,
        ref and f"{ref['fit_s']:.1f} ({ref['features_s']:.1f} / {ref['coreset_s']:.1f})",
        fit_speedup and fmt_ratio(fit_speedup),
        f">= {TARGETS['fit_speedup']:g}x",
        fit_speedup and _yes(fit_speedup >= TARGETS["fit_speedup"]),
        pt and _fit_cell(pt),
        speedup("fit_s"),
    )
    for key, name in (("features_s", "features s"), ("coreset_s", "coreset s")):
        row(
            name,
            fmt(t[key], 2),
            ref and fmt(ref[key], 1),
            ref and fmt_ratio(ref[key] / t[key]),
            None,
            None,
            pt and fmt(pt[key], 2),
            speedup(key),
        )
    predict_speedup = ref["predict_ms"] / t["predict_ms_per_image"] if ref else None
    predict_target = TARGETS["predict_speedup"].get(ratio)
    row(
        "predict ms/img",
        fmt(t["predict_ms_per_image"], 1),
        ref and fmt(ref["predict_ms"], 0),
        predict_speedup and fmt_ratio(predict_speedup),
        f">= {predict_target:g}x" if predict_target else None,
        _yes(predict_speedup >= predict_target) if predict_target and predict_speedup else None,
        pt and fmt(pt["predict_ms_per_image"], 1),
        speedup("predict_ms_per_image"),
    )
    rss_ratio = run["peak_rss_mb"] / ref["peak_rss_mb"] if ref else None
    row(
        "peak RSS MB (ours / reference)",
        fmt(run["peak_rss_mb"], 0),
        ref and fmt(ref["peak_rss_mb"], 0),
        rss_ratio and f"{rss_ratio:.2f}",
        f"<= {TARGETS['rss_ratio']:g}",
        rss_ratio and _yes(rss_ratio <= TARGETS["rss_ratio"]),
        plain_run and fmt(plain_run["peak_rss_mb"], 0),
        plain_run and f"{run['peak_rss_mb'] / plain_run['peak_rss_mb']:.2f}",
    )
    ours_imports = run.get("rss_after_imports_mb")
    ref_imports = (floor or {}).get("reference_imports_mb")
    if ours_imports and ref_imports and ref:
        ours_work = run["peak_rss_mb"] - ours_imports
        ref_work = ref["peak_rss_mb"] - ref_imports
        plain_work = plain_run and plain_run["peak_rss_mb"] - plain_run["rss_after_imports_mb"]
        row(
            "peak RSS over imports MB (ours / reference, estimated)",
            fmt(ours_work, 0),
            fmt(ref_work, 0),
            f"{ours_work / ref_work:.2f}",
            None,
            None,
            plain_work and fmt(plain_work, 0),
            plain_work and f"{ours_work / plain_work:.2f}",
        )
    if plain_run and "image_auroc" in run:
        row(
            "image / pixel AUROC",
            f"{run['image_auroc']:.3f} / {run['pixel_auroc']:.3f}",
            None,
            None,
            None,
            None,
            f"{plain_run['image_auroc']:.3f} / {plain_run['pixel_auroc']:.3f}",
            None,
        )
    return rows


def floor_note(floor: dict) -> str:
    """Why the peak RSS target cannot be met here, in numbers (see :func:`memory_floor`)."""
    ours, ref, torch_mb = (
        floor.get("our_imports_mb"),
        floor.get("reference_imports_mb"),
        floor.get("torch_import_mb"),
    )
    features, backbone = floor.get("features_mb"), floor.get("backbone_mb") or 0.0
    if not (ours and ref and features):
        return ""
    half = TARGETS["rss_ratio"] * REFERENCE[0.01]["peak_rss_mb"]
    return (
        f"Memory floor: importing torch alone takes {torch_mb:.0f} MB of RSS here (torch "
        f"{torch.__version__}, a CUDA build: its CUDA libraries load even on a CPU); with faiss and the "
        f"package, {ours:.0f} MB. Loading the backbone adds {backbone:.0f} MB and the float32 features "
        f"of the training set, held in one array as issue 4 asks, {features:.0f} MB: "
        f"{ours + backbone + features:.0f} MB before any other allocation, against a "
        f"target of {half:.0f} MB (half the reference's peak). The modules the reference code imports "
        f"({', '.join(floor['reference_modules'])}) take {ref:.0f} MB in this "
        "environment; the *over imports* rows compare what each run adds on top of its imports, "
        "taking the reference's peak to include that much (an estimate: its own import RSS was not "
        "reported)."
    )


# --------------------------------------------------------------------------
# 4. Scale (runs in its own process)
# --------------------------------------------------------------------------


def fill_structured_features(out: np.ndarray, seed: int, chunk_images: int = 8) -> None:
    """Fill ``out`` (n, h, w, d) with clustered vectors, a few images at a time.

    Each vector is one of 48 cluster centres in a 24-dimensional subspace, plus
    spread inside the subspace and small isotropic noise in all ``d``
    dimensions; neighbouring images share clusters. Only ``chunk_images``
    images' worth of temporaries exist at any time.
    """
    rng = np.random.default_rng(seed)
    n_images, height, width, dim = out.shape
    latent_dim, n_clusters = 24, 48
    basis = (rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.sqrt(latent_dim)).astype(
        np.float32
    )
    centres = 3.0 * rng.standard_normal((n_clusters, latent_dim), dtype=np.float32)
    spreads = rng.uniform(0.2, 1.0, n_clusters).astype(np.float32)
    per_image = height * width
    for start in range(0, n_images, chunk_images):
        stop = min(start + chunk_images, n_images)
        count = (stop - start) * per_image
        labels = rng.integers(0, n_clusters, count)
        latent = centres[labels] + spreads[labels, None] * rng.standard_normal(
            (count, latent_dim), dtype=np.float32
        )
        block = latent @ basis
        block += 0.05 * rng.standard_normal((count, dim), dtype=np.float32)
        out[start:stop] = block.reshape(stop - start, height, width, dim)


def run_scale(n_images: int, ratio: float, seed: int) -> dict:
    """Generate the features, then time GreedyCoresetSampler + PatchCoreDetector fit."""
    from skpatchcore import GreedyCoresetSampler, PatchCoreDetector

    features = np.empty((n_images, *SCALE_GRID, SCALE_DIM), dtype=np.float32)
    start = time.perf_counter()
    fill_structured_features(features, seed)
    generate_s = time.perf_counter() - start
    rss_features = current_rss_mb()
    peak_before = peak_rss_mb()

    sampler = GreedyCoresetSampler(ratio=ratio, random_state=seed, device="cpu")
    start = time.perf_counter()
    kept = sampler.fit_transform(features)
    coreset_s = time.perf_counter() - start
    peak_coreset = peak_rss_mb()
    detector = PatchCoreDetector(device="cpu")
    start = time.perf_counter()
    detector.fit(kept)
    index_s = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "n_images": n_images,
        "n_vectors": int(n_images * np.prod(SCALE_GRID)),
        "dim": SCALE_DIM,
        "ratio": ratio,
        "features_mb": features.nbytes / 1024**2,
        "generate_s": generate_s,
        "rss_after_features_mb": rss_features,
        "peak_before_fit_mb": peak_before,
        "coreset_s": coreset_s,
        "index_s": index_s,
        "fit_s": coreset_s + index_s,
        "bank_size": len(detector.memory_bank_),
        "peak_after_coreset_mb": peak_coreset,
        "peak_rss_mb": peak,
        "overhead_mb": peak - (rss_features or peak_before),
    }


def scale_in_subprocess(n_images: int, ratio: float, seed: int, threads) -> dict:
    with tempfile.TemporaryDirectory(prefix="skpatchcore-scale-") as tmp:
        out_path = Path(tmp) / "scale.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--scale-single",
            json.dumps({"n_images": n_images, "ratio": ratio, "seed": seed, "threads": threads}),
            "--single-out",
            str(out_path),
        ]
        completed = subprocess.run(command, env=thread_env(threads))
        if out_path.exists():
            return json.loads(out_path.read_text(encoding="utf-8"))
    return {"error": f"scale run exited with {completed.returncode} and wrote no result"}


def _scale_single_main(spec_json: str, out_path: str) -> int:
    spec = json.loads(spec_json)
    apply_threads(spec.get("threads"))
    try:
        result, code = run_scale(spec["n_images"], spec["ratio"], spec["seed"]), 0
    except Exception as exc:  # reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        code = 1
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return code


def scale_table(result: dict) -> str:
    headers = [
        "training set",
        "vectors x dim",
        "features MB",
        "coreset s",
        "index s",
        "peak RSS MB",
        "peak minus features MB",
        "target",
        "met",
    ]
    if "error" in result:
        return markdown_table(headers, [["failed: " + result["error"]] + [None] * (len(headers) - 1)])
    row = [
        f"{result['n_images']} images, {100 * result['ratio']:g}% coreset ({result['bank_size']} kept)",
        f"{result['n_vectors']} x {result['dim']}",
        fmt(result["features_mb"], 0),
        fmt(result["coreset_s"], 1),
        fmt(result["index_s"], 1),
        fmt(result["peak_rss_mb"], 0),
        fmt(result["overhead_mb"], 0),
        f"<= {TARGETS['scale_rss_mb']:g} MB",
        _yes(result["peak_rss_mb"] <= TARGETS["scale_rss_mb"]),
    ]
    return markdown_table(headers, [row])


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time skpatchcore against its plain implementations (benchmarks/plain.py) and the reference "
            "code's numbers: features, coreset, whole fit/predict on mpdd, and optionally a 784k-vector "
            "scale run. Writes <out>/speed.json and <out>/speed.md; exits 1 on a failed equivalence check."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder of data sets")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--name", default=None, help="results file name (default: speed, or speed-quick)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for a smoke test: 4 images for features, 8 for the coreset, "
        "8 + 8 for the pipeline, 20 images for --scale",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="random images instead of mpdd for the feature and coreset parts",
    )
    parser.add_argument("--feature-images", type=int, default=16, help="images for the feature timing")
    parser.add_argument(
        "--coreset-images",
        type=int,
        default=None,
        help="training images whose features feed the coreset part (default: all 54 of mpdd)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images per forward pass in the feature timing (the package's CPU default)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timing repeats of the fast paths (min is kept) and fresh pipeline runs (median is kept)",
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.01], help="coreset ratios")
    parser.add_argument(
        "--plain-steps",
        type=int,
        default=None,
        help="run the plain coreset loops for at most this many selections and extrapolate "
        "their time (indices are then compared on that prefix); default: run in full",
    )
    parser.add_argument("--tol", type=float, default=1e-5, help="allowed relative error of the fast features")
    parser.add_argument("--seed", type=int, default=0, help="random_state")
    parser.add_argument("--threads", type=int, default=None, help="limit torch/faiss/BLAS threads")
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["features", "coreset", "search", "pipeline", "plain"],
        help="parts not to run (search needs the coreset part; plain: the pipeline part without the "
        "plain pipeline beside ours)",
    )
    parser.add_argument("--scale", action="store_true", help="also run the 784k-vector scale test")
    parser.add_argument(
        "--scale-images", type=int, default=None, help="images of the scale run (default 1000)"
    )
    parser.add_argument("--scale-single", help=argparse.SUPPRESS)
    parser.add_argument("--single-out", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scale_single is not None:
        return _scale_single_main(args.scale_single, args.single_out)
    apply_threads(args.threads)
    name = args.name or ("speed-quick" if args.quick else "speed")
    feature_images = 4 if args.quick else args.feature_images
    coreset_images = 8 if args.quick else args.coreset_images
    repeats = 1 if args.quick else args.repeats
    scale_images = args.scale_images or (20 if args.quick else 1000)

    mpdd_root = args.data_root / MPDD
    have_mpdd = (mpdd_root / "train" / "good").is_dir()
    synthetic = args.synthetic or not have_mpdd
    if not have_mpdd:
        print(f"{mpdd_root} not found: synthetic images for features and coreset, no pipeline part.")
    train_paths = []
    if have_mpdd:
        from skpatchcore.datasets import load_mvtec_category

        train_paths = load_mvtec_category(mpdd_root).train_paths

    payload = {
        "name": name,
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "quick": args.quick,
        "synthetic": synthetic,
        "backbone": BACKBONE,
        "reference_settings": REFERENCE_SETTINGS,
        "reference_source": REFERENCE_SOURCE,
        "reference": {str(k): v for k, v in REFERENCE.items()},
        "reference_other": REFERENCE_OTHER,
        "targets": {
            k: ({str(r): t for r, t in v.items()} if isinstance(v, dict) else v) for k, v in TARGETS.items()
        },
        "machine": machine_info(),
    }
    sections = []
    failures = []

    if "features" not in args.skip:
        print(f"Features: {feature_images} images, batch {args.batch_size} ...", flush=True)
        if synthetic:
            pixels = synthetic_pixels(feature_images, args.seed)
        else:
            pixels = load_pixels(train_paths[:feature_images])
        features = bench_features(pixels, args.batch_size, repeats, args.tol)
        payload["features"] = features
        end = features["end_to_end"]
        print(f"    end to end: {end['speedup']:.2f}x, max relative error {end['max_relative_error']:.2e}")
        if not end["equivalent"]:
            failures.append(
                f"features (end to end): relative error {end['max_relative_error']:.2e} > {END_TO_END_TOL:g}"
            )
        for mode, r in features["modes"].items():
            print(f"    {mode}: max relative error {r['max_relative_error']:.2e} (tol {args.tol:g})")
            if not r["equivalent"]:
                failures.append(
                    f"features ({mode}): relative error {r['max_relative_error']:.2e} > {args.tol:g}"
                )
        source = "synthetic images" if synthetic else "mpdd metal_plate train images"
        sections.append(
            f"### Features: per image, {features['n_images']} {source}, batch {features['batch_size']}, "
            f"{features['input_size'][0]} x {features['input_size'][1]} px\n\n"
            "Ours = the package's backbone (batch norms folded into the convolutions, channels-last, "
            "light 'same' padding) + `skpatchcore._aggregation.aggregate`. Plain = "
            "`benchmarks.plain.reference_features` / `mean_features`. *Same backbone* rows feed both "
            "the package's activations, so only the aggregation differs. The *end to end* row is the "
            "features step as the reference code runs it: the stock timm backbone "
            "(`benchmarks.plain.stock_backbone`, separate batch norms, (N, C, H, W) input) followed by "
            "the literal unfold and pooling, against the package's whole path; the issue's 3x target "
            "is checked there. Errors are the largest absolute difference over the largest absolute "
            "value. The end-to-end error is float32 rounding of two differently ordered backbones "
            f"(each ~6e-6 from a float64 run), checked at {END_TO_END_TOL:g}.\n\n"
            + features_table(features, args.tol)
        )

    if "coreset" not in args.skip:
        count = coreset_images or len(train_paths) or 54
        print(f"Coreset: features of {count} images ...", flush=True)
        transformer = fitted_transformer("reference")
        if synthetic:
            images = (synthetic_pixels(count, args.seed + 1).permute(0, 2, 3, 1).numpy() * 255).astype(
                np.uint8
            )
            vectors = transformer.transform(images)
        else:
            vectors = transformer.transform(train_paths[:count])
        search_queries = None
        if "search" not in args.skip:
            if synthetic:
                query_images = (
                    synthetic_pixels(count // 2 or 1, args.seed + 2).permute(0, 2, 3, 1).numpy() * 255
                ).astype(np.uint8)
            else:
                query_images = load_mvtec_category(mpdd_root).test_paths[: 8 if args.quick else 32]
            search_queries = transformer.transform(query_images)
            per_image = int(np.prod(search_queries.shape[1:3]))
            search_queries = np.ascontiguousarray(search_queries.reshape(-1, search_queries.shape[-1]))
        vectors = vectors.reshape(-1, vectors.shape[-1])
        del transformer
        coreset = bench_coreset(vectors, args.ratios, args.seed, repeats, args.plain_steps)
        banks = {r["ratio"]: r.pop("indices") for r in coreset["ratios"].values()}
        coreset["n_images"] = count
        payload["coreset"] = coreset
        for r in coreset["ratios"].values():
            print(
                f"    {100 * r['ratio']:g}%: fast {r['fast_s']:.3f} s, "
                f"plain numpy {r['plain_numpy_s']:.2f} s, "
                f"identical {r['identical_to_plain_numpy']}, sampler matches {r['sampler_matches_loop']}"
            )
            if not r["identical_to_plain_numpy"]:
                failures.append(f"coreset {r['ratio']:g}: indices differ from plain.greedy_coreset")
            if not r["sampler_matches_loop"]:
                failures.append(
                    f"coreset {r['ratio']:g}: GreedyCoresetSampler differs from greedy_indices_cpu"
                )
        source = "synthetic" if synthetic else "mpdd metal_plate"
        sections.append(
            f"### Coreset: {coreset['n_vectors']} patch vectors of {count} {source} images, projected to "
            f"{coreset['projected_dim']} dims\n\n"
            "Ours = `greedy_indices_cpu`; plain numpy = `plain.greedy_coreset`; plain torch = "
            "`plain.greedy_coreset_torch` (the reference code's loop). Same projected vectors and "
            "start points as `GreedyCoresetSampler(random_state=seed)`. Times are the best of "
            f"{FAST_CORESET_REPEATS} runs (ours) and of 3 runs (plain loops; one where a loop takes "
            "longer than a few seconds).\n\n" + coreset_table(coreset)
        )
        if search_queries is not None:
            print(f"Search: {len(search_queries)} query vectors against the coreset banks ...", flush=True)
            search = bench_search(vectors, banks, search_queries, per_image)
            payload["search"] = search
            for r in search["banks"].values():
                print(
                    f"    {100 * r['ratio']:g}%: ours {r['ours_ms_per_image']:.2f} ms/img, faiss "
                    f"{r['faiss_ms_per_image']:.2f} ms/img, identical {r['identical_to_plain']}"
                )
                # (faiss's float32 expansion rounds differently: checked for the filter only)
                if r["backend"] == "bfloat16-filter" and not r["identical_to_plain"]:
                    failures.append(f"search {r['ratio']:g}: results differ from the all-pairs search")
            sections.append(
                f"### Search: {search['n_queries']} patch vectors of {search['n_images']:g} {source} test "
                f"images against the coreset banks, {SEARCH_BATCH_IMAGES} images a batch, k = 1\n\n"
                "Ours = `NearestNeighborIndex` (exact; `bfloat16-filter`: a bfloat16 product with proven "
                "margins rules out pairs, the rest get exact float32 distances); faiss = `IndexFlatL2`, "
                "the reference code's search. Best of "
                f"{SEARCH_REPEATS} interleaved runs each. *Identical* = the same distances and indices, "
                "bit for bit, as computing every pair with `skpatchcore._search.pair_distances` (ties by "
                "index), on a sample of queries; faiss's float32 expansion "
                "(|q|^2 + |b|^2 - 2 <q, b>) rounds differently, shown in the last column.\n\n"
                + search_table(search)
            )

    if "pipeline" not in args.skip:
        if have_mpdd:
            plain_too = "plain" not in args.skip
            print(
                f"Pipeline: mpdd metal_plate fit + predict, {repeats} fresh process(es) per ratio"
                + (", ours and plain ..." if plain_too else " ..."),
                flush=True,
            )
            runs = bench_pipeline(
                args.data_root,
                sorted(args.ratios),
                args.seed,
                args.quick,
                args.threads,
                repeats,
                plain_too=plain_too,
            )
            payload["pipeline"] = runs
            floor = memory_floor(runs, args.threads)
            payload["memory_floor"] = floor
            for run in runs.values():
                if "error" in run:
                    failures.append(f"pipeline {run['ratio']:g}: {run['error']}")
                if "error" in run.get("plain", {}):
                    failures.append(f"plain pipeline {run['ratio']:g}: {run['plain']['error']}")
            plain_text = (
                " *Plain, this run*: `benchmarks.plain.plain_pipeline`, the reference "
                "code's steps from the plain parts (stock timm backbone, unfold and pool, torch greedy "
                "loop, faiss `IndexFlatL2`, no threshold calibration, scipy smoothing; batch 8), after "
                "the reference code's imports, each run right after one of ours in its own fresh process "
                "(medians as for ours); its ratios (speed-up, or ours / plain for memory) do not depend "
                "on how fast the machine is that day, the *reference* column's do."
                if plain_too
                else ""
            )
            sections.append(
                f"### Whole pipeline vs the reference implementation (source: {REFERENCE_SOURCE})\n\n"
                "Ours: fit excludes loading the backbone; index = memory bank + threshold calibration; "
                "predict = one `predict_map` call over the test set per image; peak RSS of a fresh process. "
                f"Each ratio ran in {repeats} fresh processes (the ratios interleaved): the fit "
                "columns are the run with the median fit time, predict and peak RSS the medians "
                "over the runs; every run's numbers are in the JSON. "
                f"Settings: {', '.join(f'{k}={v}' for k, v in REFERENCE_SETTINGS.items())}, "
                "package batch size."
                + plain_text
                + "\n\n"
                + pipeline_table(runs, args.quick, floor)
                + (f"\n\n{note}" if (note := floor_note(floor)) else "")
            )
        else:
            sections.append("### Whole pipeline\n\nSkipped: mpdd metal_plate not found.")

    if args.scale:
        print(
            f"Scale: {scale_images} synthetic images of {SCALE_GRID[0]} x {SCALE_GRID[1]} x {SCALE_DIM} ...",
            flush=True,
        )
        scale = scale_in_subprocess(scale_images, 0.01, args.seed, args.threads)
        payload["scale"] = scale
        if "error" in scale:
            failures.append(f"scale: {scale['error']}")
        sections.append(
            "### Scale: synthetic clustered patch features, GreedyCoresetSampler(ratio=0.01) + "
            "PatchCoreDetector.fit, fresh process\n\n" + scale_table(scale)
        )

    payload["failures"] = failures
    header = ["## skpatchcore speed vs plain implementations", ""]
    if args.quick:
        header += ["**Quick smoke test**: tiny inputs; the ratios are not meaningful.", ""]
    header += [f"Machine: {machine_line(payload['machine'])}.", ""]
    if failures:
        header += ["**Failed checks:** " + "; ".join(failures), ""]
    markdown = "\n".join(header) + "\n" + "\n\n".join(sections)
    json_path, md_path = write_results(args.out, name, payload, markdown)
    print()
    print(markdown)
    print(f"\nWrote {json_path} and {md_path}")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
