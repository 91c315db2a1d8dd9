"""
=============================================
Comparing image sizes, layers and aggregation
=============================================

Which settings suit your parts is an empirical question. This example fits a
few variants on the same images and compares them with the three metrics of
:mod:`skpatchcore.metrics`: image AUROC (is the part defective?), pixel AUROC
and AUPRO (is the heat map on the defect?). It uses a handful of images so
that it runs in a minute; on so few images, differences of a few hundredths
are noise. Run the same loop on your full test set before choosing.
"""

# %%
# Data
# ----

import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from skpatchcore import make_patchcore
from skpatchcore._demo import make_demo_dataset
from skpatchcore.datasets import load_masks, load_mvtec_category
from skpatchcore.metrics import image_auroc, pixel_metrics


def find_mpdd():
    """The MPDD metal_plate folder, when this machine has it."""
    if "SKPATCHCORE_DATA_DIR" in os.environ:
        roots = [Path(os.environ["SKPATCHCORE_DATA_DIR"])]
    else:
        here = Path.cwd().resolve()
        roots = [folder / "shared" / "datasets" for folder in (here, *here.parents)]
    for root in roots:
        if (root / "mpdd" / "metal_plate" / "train" / "good").is_dir():
            return root / "mpdd" / "metal_plate"
    return None


workdir = tempfile.TemporaryDirectory()
folder = find_mpdd() or make_demo_dataset(
    Path(workdir.name) / "plates", n_train=16, n_test_good=8, n_test_defect=4
)
data = load_mvtec_category(folder)


def evenly(indices, count):
    return indices[np.linspace(0, len(indices) - 1, min(count, len(indices))).astype(int)]


train_paths = [data.train_paths[i] for i in evenly(np.arange(len(data.train_paths)), 16)]
test_index = np.r_[
    evenly(np.flatnonzero(data.test_labels == 1), 8), evenly(np.flatnonzero(data.test_labels == -1), 12)
]
test_paths = [data.test_paths[i] for i in test_index]
test_labels = data.test_labels[test_index]
test_masks = [data.test_mask_paths[i] for i in test_index]

# %%
# The variants
# ------------
# All use the offline ``efficientnet_lite0`` backbone, no crop and a 10 %
# coreset. The first three change the image size, the fourth uses the
# reference code's pooling of the neighbourhood (``aggregation="reference"``,
# 1024-value vectors) instead of the default per-channel mean (152 values),
# the last taps ``blocks.3`` instead of ``blocks.4`` as the deeper stage.
# Another backbone is one more line, e.g. ``{"backbone": "wide_resnet50_2",
# "image_size": 128}`` where its weights can be downloaded.

variants = {
    "96 px": {"image_size": 96},
    "128 px": {"image_size": 128},
    "160 px": {"image_size": 160},
    "128 px, reference": {"image_size": 128, "aggregation": "reference"},
    "128 px, blocks.2+3": {"image_size": 128, "layers": ["blocks.2", "blocks.3"]},
}

# One-time start-up costs (thread pools, lazy imports) would otherwise be
# charged to the first variant's time.
make_patchcore(backbone="efficientnet_lite0", image_size=64, crop_size=None).fit(train_paths[:2])

results, example_maps = {}, {}
for name, settings in variants.items():
    settings = {"backbone": "efficientnet_lite0", "crop_size": None, **settings}
    model = make_patchcore(ratio=0.1, random_state=0, **settings)
    start = time.perf_counter()
    model.fit(train_paths)
    maps, scores = model.predict_map(test_paths, return_scores=True)
    seconds = time.perf_counter() - start
    # Each map back on its original image, against the mask as it is on disk.
    pixels = pixel_metrics(model, test_paths, test_masks, maps=maps)
    results[name] = {
        "image AUROC": image_auroc(test_labels, scores),
        "pixel AUROC": pixels["pixel_auroc"],
        "AUPRO": pixels["aupro"],
        "seconds": seconds,
        "dims": model.named_steps["features"].n_features_out_,
    }
    example_maps[name] = maps[-1]
    print(
        f"{name:<20}"
        + "  ".join(
            f"{key} {value:.3f}" for key, value in results[name].items() if key not in ("seconds", "dims")
        )
        + f"  ({results[name]['dims']}-d vectors, {seconds:.1f} s)"
    )

# %%
# Metrics and time
# ----------------
# The time is fit plus predicting the test images, on this machine, for
# orientation only.

metric_names = ["image AUROC", "pixel AUROC", "AUPRO"]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1.3]})
positions = np.arange(len(variants))
width = 0.8 / len(metric_names)
for offset, metric in enumerate(metric_names):
    left.bar(
        positions + (offset - 1) * width, [results[name][metric] for name in variants], width, label=metric
    )
left.set_xticks(positions, list(variants), rotation=15)
left.set_ylim(0.5, 1.1)
left.legend(loc="upper center", ncol=3, fontsize=8)
left.set_title(f"{len(train_paths)} training images, {len(test_paths)} test images", fontsize=10)
right.barh(list(variants), [results[name]["seconds"] for name in variants], color="0.6")
right.invert_yaxis()
right.set_xlabel("fit + predict (s)")
fig.tight_layout()

# %%
# The same defective image under each variant
# -------------------------------------------
# Larger inputs give finer maps; the maps are at each variant's own input size.

mask = load_masks(test_masks[-1:], test_paths[-1:], image_size=160, crop_size=None)[0]
with Image.open(test_paths[-1]) as image:
    picture = image.convert("RGB").resize(mask.shape[::-1], Image.BILINEAR)
fig, axes = plt.subplots(1, len(variants) + 1, figsize=(2.2 * (len(variants) + 1), 2.6))
axes[0].imshow(picture)
axes[0].contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
axes[0].set_title("image, defect in cyan", fontsize=9)
for ax, (name, heat_map) in zip(axes[1:], example_maps.items()):
    ax.imshow(heat_map, cmap="inferno")
    ax.set_title(f"{name}\n{heat_map.shape[0]} x {heat_map.shape[1]}", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()
