"""
===========
Quick start
===========

Fit PatchCore on photos of good parts only, score new photos, and draw heat
maps of where each one looks anomalous.
"""

# sphinx_gallery_thumbnail_number = 2

# %%
# The data
# --------
# We need a folder in the MVTec AD layout: ``train/good`` holds good parts,
# ``test/<type>`` good and defective parts, and ``ground_truth/<type>`` the masks
# of the defects. :func:`~skpatchcore.datasets.load_mvtec_category` lists the
# files and checks that every defective image has its mask. We use the MPDD
# ``metal_plate`` photos when they are on this machine, else synthetic plates
# generated on the spot.

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from skpatchcore import make_patchcore
from skpatchcore._demo import make_demo_dataset
from skpatchcore.datasets import load_masks, load_mvtec_category
from skpatchcore.metrics import image_auroc


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
    Path(workdir.name) / "plates", n_train=28, n_test_good=8, n_test_defect=4
)
data = load_mvtec_category(folder)
print(f"{data.name}: {len(data.train_paths)} training images, {len(data.test_paths)} test images")

# %%
# Fit on good images
# ------------------
# :func:`~skpatchcore.make_patchcore` builds the three steps (features,
# coreset, detector) as one pipeline. ``efficientnet_lite0`` ships its ImageNet
# weights in a Python package, so nothing is downloaded. To keep this example
# fast we resize the images to 128 x 128 (``image_size=128`` on square photos,
# no crop) and fit on every other training image; the defaults (the whole image
# fitted into a box of about 320 x 320 px shaped like the training images, here
# 320 x 320 for square photos) detect smaller defects.

model = make_patchcore(
    backbone="efficientnet_lite0", image_size=128, crop_size=None, ratio=0.1, random_state=0
)
model.fit(data.train_paths[::2])

detector = model.named_steps["detector"]
print(f"memory bank: {detector.memory_bank_.shape[0]} patch vectors of {detector.memory_bank_.shape[1]}")
print(f"threshold on the anomaly score: {detector.threshold_:.3f}")

# %%
# Score new images
# ----------------
# We take 8 good and 8 defective test images. ``predict_map`` returns one heat
# map per image at the model input size (here 128 x 128) and, with
# ``return_scores=True``, the image anomaly scores from the same pass (higher =
# more anomalous). ``predict`` gives +1 (good) or -1 (anomalous), comparing the
# scores with the threshold that ``fit`` chose from good training images.

good = np.flatnonzero(data.test_labels == 1)
defective = np.flatnonzero(data.test_labels == -1)
chosen = np.r_[
    good[np.linspace(0, len(good) - 1, 8).astype(int)],
    defective[np.linspace(0, len(defective) - 1, 8).astype(int)],
]
paths = [data.test_paths[i] for i in chosen]
labels = data.test_labels[chosen]

maps, scores = model.predict_map(paths, return_scores=True)
predicted = model.predict(paths)
print(f"maps: {maps.shape}")
print(f"image AUROC on these 16 images: {image_auroc(labels, scores):.3f}")
print(f"defective images flagged: {np.sum(predicted[labels == -1] == -1)} of {np.sum(labels == -1)}")
print(f"good images flagged:      {np.sum(predicted[labels == 1] == -1)} of {np.sum(labels == 1)}")

# %%
# Scores against the threshold
# ----------------------------

fig, ax = plt.subplots(figsize=(7, 2.6))
for label, colour, name in [(1, "tab:green", "good"), (-1, "tab:red", "defective")]:
    ax.scatter(scores[labels == label], np.full(np.sum(labels == label), name), color=colour, s=40)
ax.axvline(detector.threshold_, color="k", linestyle="--", label="threshold_ chosen by fit")
ax.set_xlabel("anomaly score (higher = more anomalous)")
ax.legend(loc="lower right")
ax.set_ylim(-0.7, 1.7)
fig.tight_layout()

# %%
# Heat-map overlays
# -----------------
# Each map is at the model input size, so we draw it over the image resized the
# same way. The masks go through the same geometry with
# :func:`~skpatchcore.datasets.load_masks`; their outline is drawn in cyan.

masks = load_masks([data.test_mask_paths[i] for i in chosen], paths, image_size=128, crop_size=None)
show = [0, 4, 8, 10, 12, 14]  # two good, four defective
vmin, vmax = np.percentile(maps, 1), np.percentile(maps, 99.9)

fig, axes = plt.subplots(2, len(show), figsize=(2.2 * len(show), 4.8))
for column, i in enumerate(show):
    with Image.open(paths[i]) as image:
        picture = image.convert("RGB").resize((maps.shape[2], maps.shape[1]), Image.BILINEAR)
    for row in (0, 1):
        axes[row, column].imshow(picture)
        axes[row, column].axis("off")
    axes[1, column].imshow(maps[i], cmap="inferno", alpha=0.55, vmin=vmin, vmax=vmax)
    if masks[i].any():
        axes[1, column].contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
    verdict = "good" if predicted[i] == 1 else "ANOMALOUS"
    truth = "good" if labels[i] == 1 else "defective"
    axes[0, column].set_title(f"{truth}\nscore {scores[i]:.2f}: {verdict}", fontsize=9)
fig.tight_layout()
plt.show()

# %%
# Next steps: :ref:`sphx_glr_auto_examples_plot_threshold.py` chooses the
# threshold for a target false-alarm rate, and
# :ref:`sphx_glr_auto_examples_plot_persistence.py` saves the model.
