"""Check and time the CUDA path in one short run (for a lent GPU machine).

Correctness: features, coreset, scores and a GPU-fitted model loaded on a
CPU-only process, each against the CPU path. Timing: wide_resnet50_2 (random
weights) predict throughput at batch 64 against a 16,384-vector bank, and a
10% greedy coreset of 163,840 vectors. Prints a markdown table and writes
``gpu_check.json`` to ``--out``.

    PYTHONPATH=. python benchmarks/gpu_check.py --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import joblib
import numpy as np
import torch

from skpatchcore import GreedyCoresetSampler, PatchCoreDetector, PatchFeatureTransformer, make_patchcore
from skpatchcore._search import faiss_has_gpu

RESULTS: dict = {}
# GPU_CHECK_DEVICE=cpu and --smoke let the script be dry-run on a machine without a GPU.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SCALE = {"images": 512, "coreset": 163840}


def synchronize():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def parts(n, size=224, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        base = 128 + 40 * np.sin(xx / 3.0 + rng.uniform(0, 6)) + rng.normal(0, 8, (size, size))
        if i % 3 == 2:
            cy, cx = rng.integers(40, size - 40, 2)
            base[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 15
        out[i] = np.clip(base, 0, 255)[:, :, None]
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def section(name):
    def wrap(fn):
        def run(*args):
            RESULTS[name] = {}
            start = time.perf_counter()
            try:
                fn(*args)
                RESULTS.setdefault(name, {})["ok"] = True
            except Exception:  # noqa: BLE001 - report and go on to the next section
                RESULTS.setdefault(name, {})["error"] = traceback.format_exc()[-2000:]
                print(traceback.format_exc())
            RESULTS[name]["seconds"] = round(time.perf_counter() - start, 2)
            print(f"## {name}: {json.dumps(RESULTS[name], default=str)[:1500]}", flush=True)

        return run

    return wrap


@section("features_cpu_vs_cuda")
def features_parity():
    images = parts(8)
    cpu = PatchFeatureTransformer("efficientnet_lite0", device="cpu").fit(images).transform(images)
    gpu_t = PatchFeatureTransformer("efficientnet_lite0", device=DEVICE).fit(images)
    RESULTS["features_cpu_vs_cuda"]["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    RESULTS["features_cpu_vs_cuda"]["max_rel_err"] = rel(gpu_t.transform(images), cpu)
    torch.backends.cudnn.allow_tf32 = False
    RESULTS["features_cpu_vs_cuda"]["max_rel_err_no_tf32"] = rel(gpu_t.transform(images), cpu)
    torch.backends.cudnn.allow_tf32 = True


@section("coreset_cpu_vs_cuda")
def coreset_parity():
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(20000, 32)) @ rng.normal(size=(32, 1024))).astype(np.float32)
    X += 0.1 * rng.normal(size=X.shape).astype(np.float32)
    cpu = GreedyCoresetSampler(0.05, random_state=0, device="cpu").fit(X).sample_indices_
    gpu = GreedyCoresetSampler(0.05, random_state=0, device=DEVICE).fit(X).sample_indices_
    RESULTS["coreset_cpu_vs_cuda"]["same_order_fraction"] = float((cpu == gpu).mean())
    RESULTS["coreset_cpu_vs_cuda"]["same_set_fraction"] = len(set(cpu) & set(gpu)) / len(cpu)


@section("scores_cpu_vs_cuda")
def scores_parity():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(4096, 1024)).astype(np.float32)
    test = rng.normal(size=(6, 28, 28, 1024)).astype(np.float32)
    out = RESULTS["scores_cpu_vs_cuda"]
    out["faiss_gpu"] = faiss_has_gpu()
    cpu = PatchCoreDetector(device="cpu", reweight_neighbors=9).fit(bank)
    gpu = PatchCoreDetector(device=DEVICE, reweight_neighbors=9).fit(bank)
    out["search_backend"] = gpu._index.backend
    out["image_scores_max_rel_err"] = rel(gpu.anomaly_score(test), cpu.anomaly_score(test))
    out["maps_max_rel_err"] = rel(gpu.predict_map(test, (224, 224)), cpu.predict_map(test, (224, 224)))


@section("gpu_fit_loads_on_cpu_only")
def gpu_model_on_cpu(out_dir):
    images = parts(12, size=128)
    model = make_patchcore(
        backbone="efficientnet_lite0",
        image_size=128,
        crop_size=None,
        ratio=0.1,
        random_state=0,
        device=DEVICE,
    ).fit(images[:9])
    gpu_scores = model.anomaly_score(images[9:])
    path = Path(out_dir) / "gpu_model.joblib"
    joblib.dump(model, path)
    np.save(Path(out_dir) / "probe.npy", images[9:])
    code = (
        "import joblib, numpy as np, warnings, torch;"
        "warnings.simplefilter('always');"
        f"m = joblib.load({str(path)!r});"
        f"print(torch.cuda.is_available(), m.named_steps['detector'].device_, "
        f"m.anomaly_score(np.load({str(Path(out_dir) / 'probe.npy')!r})).tolist())"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    out = RESULTS["gpu_fit_loads_on_cpu_only"]
    out["stdout"] = done.stdout[-600:]
    out["stderr_tail"] = done.stderr[-600:]
    values = [float(v) for v in done.stdout.strip().split("[")[-1].rstrip("]").split(",")]
    out["cpu_vs_gpu_scores_max_rel_err"] = rel(values, gpu_scores)
    path.unlink()


@section("wrn50_predict_throughput")
def throughput():
    out = RESULTS["wrn50_predict_throughput"]
    train = parts(21, seed=3)
    torch.manual_seed(0)  # random weights: the same for the float32 and the TF32 model
    model = make_patchcore(
        backbone="wide_resnet50_2",
        weights=None,
        image_size=None,
        crop_size=None,
        ratio=1.0,
        batch_size=64,
        device=DEVICE,
    )
    model.fit(train)  # 21 x 784 = 16,464 patches -> bank of 16,464 vectors (ratio 1)
    detector = model.named_steps["detector"]
    out["bank"] = int(len(detector.memory_bank_))
    test = parts(SCALE["images"], seed=4)
    model.predict_map(test[:64])
    synchronize()
    start = time.perf_counter()
    maps, scores = model.predict_map(test, return_scores=True)
    synchronize()
    seconds = time.perf_counter() - start
    out["end_to_end_images_per_s"] = round(len(test) / seconds, 1)
    # The device-side part alone: backbone + aggregation + search + maps for a batch of
    # 64 already on the GPU, in full float32 (the package's setting) and with TF32 allowed.
    features = model.named_steps["features"]
    pixels = torch.from_numpy(test[:64]).permute(0, 3, 1, 2).float().div(255).to(DEVICE)

    def device_only():
        with torch.inference_mode():
            for _ in range(2):
                synchronize()
                start = time.perf_counter()
                for _ in range(4):
                    feats = features._forward(pixels)
                synchronize()
                feat_s = (time.perf_counter() - start) / 4
                start = time.perf_counter()
                for _ in range(4):
                    detector._map_tensors(feats, (224, 224))
                synchronize()
                search_s = (time.perf_counter() - start) / 4
        return feat_s, search_s

    feat_s, search_s = device_only()
    out["features_ms_per_batch64"] = round(feat_s * 1000, 1)
    out["search_and_maps_ms_per_batch64"] = round(search_s * 1000, 1)
    out["device_only_images_per_s"] = round(64 / (feat_s + search_s), 1)
    # The same with TensorFloat-32 allowed (allow_tf32=True on both steps).
    torch.manual_seed(0)
    fast = make_patchcore(
        backbone="wide_resnet50_2",
        weights=None,
        image_size=None,
        crop_size=None,
        ratio=1.0,
        batch_size=64,
        device=DEVICE,
        allow_tf32=True,
    ).fit(train)
    fast.predict_map(test[:64])
    synchronize()
    start = time.perf_counter()
    fast_maps, fast_scores = fast.predict_map(test, return_scores=True)
    synchronize()
    out["tf32_end_to_end_images_per_s"] = round(len(test) / (time.perf_counter() - start), 1)
    out["tf32_vs_fp32_scores_max_rel_err"] = rel(fast_scores, scores)
    features, detector = fast.named_steps["features"], fast.named_steps["detector"]
    feat_s, search_s = device_only()
    out["tf32_features_ms_per_batch64"] = round(feat_s * 1000, 1)
    out["tf32_search_and_maps_ms_per_batch64"] = round(search_s * 1000, 1)
    out["tf32_device_only_images_per_s"] = round(64 / (feat_s + search_s), 1)


@section("coreset_163840_at_10pct")
def coreset_speed():
    out = RESULTS["coreset_163840_at_10pct"]
    rng = np.random.default_rng(5)
    latent = rng.normal(size=(SCALE["coreset"], 48)).astype(np.float32)
    X = latent @ rng.normal(size=(48, 1024)).astype(np.float32)
    X += 0.2 * rng.normal(size=X.shape).astype(np.float32)
    sampler = GreedyCoresetSampler(0.1, random_state=0, device=DEVICE)
    sampler.fit(X[:20000])
    synchronize()
    start = time.perf_counter()
    sampler.fit(X)
    synchronize()
    out["seconds_cuda"] = round(time.perf_counter() - start, 2)
    out["n_selected"] = int(len(sampler.sample_indices_))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to dry-run the script")
    parser.add_argument("--only", nargs="*", help="run only these sections (names as printed)")
    args = parser.parse_args()
    if args.smoke:
        SCALE.update(images=64, coreset=8192)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    RESULTS["machine"] = {
        "gpu": torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "none (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "faiss_gpu": faiss_has_gpu(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(RESULTS["machine"]), flush=True)
    sections = {
        "features_cpu_vs_cuda": features_parity,
        "scores_cpu_vs_cuda": scores_parity,
        "coreset_cpu_vs_cuda": coreset_parity,
        "gpu_fit_loads_on_cpu_only": lambda: gpu_model_on_cpu(out_dir),
        "wrn50_predict_throughput": throughput,
        "coreset_163840_at_10pct": coreset_speed,
    }
    for name, run in sections.items():
        if not args.only or name in args.only:
            run()
    (out_dir / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
