"""
===============================
Deploying a model without torch
===============================

A fitted model is exported as one ONNX file that holds its whole predict path
(backbone, aggregation, nearest-neighbour search of the memory bank, smoothed
maps) with :func:`skpatchcore.export_onnx`.
:class:`skpatchcore.runtime.OnnxPatchCore` runs that file with onnxruntime and
never imports torch, so the machine beside the inspection line needs
``onnxruntime``, ``numpy`` and ``pillow`` only. This example exports a model,
checks that the file scores and maps the images as the pipeline does, looks at
what the file says about itself, and shows that a modified file is refused.
:ref:`deploy` has the details.
"""

# %%
# Fit a small model and export it
# -------------------------------

import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from skpatchcore import ModelFileError, export_onnx, make_patchcore
from skpatchcore._demo import make_demo_dataset
from skpatchcore.datasets import load_mvtec_category
from skpatchcore.runtime import OnnxPatchCore


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
    Path(workdir.name) / "plates", n_train=12, n_test_good=2, n_test_defect=2
)
data = load_mvtec_category(folder)

model = make_patchcore(
    backbone="efficientnet_lite0", image_size=128, crop_size=128, ratio=0.1, random_state=0
).fit(data.train_paths[:12])

onnx_path = Path(workdir.name) / "metal_plate.onnx"
export_onnx(model, onnx_path)  # also runs the file once and compares it with the pipeline
print(f"{onnx_path.name}: {onnx_path.stat().st_size / 2**20:.1f} MB")

# %%
# Score with the runtime
# ----------------------
# The runtime reads the images itself, exactly as the pipeline does (same
# reader, same fitted resize and crop), and answers in the pipeline's
# conventions: higher anomaly score = more anomalous, ``predict`` in {-1, +1}.
# In a deployment this is a separate process without torch; here both run side
# by side to compare them.

runtime = OnnxPatchCore(onnx_path)
test_paths = data.test_paths[:2] + data.test_paths[-2:]  # good and defective images
onnx_maps, onnx_scores = runtime.predict_map(test_paths, return_scores=True)
maps, scores = model.predict_map(test_paths, return_scores=True)

print("image scores, torch:", np.round(scores, 3))
print("image scores, ONNX: ", np.round(onnx_scores, 3))
print(
    f"largest relative difference: scores {np.max(np.abs(onnx_scores - scores) / scores):.1e}, "
    f"maps {np.max(np.abs(onnx_maps - maps) / maps):.1e}"
)
print("labels, ONNX:", runtime.predict(test_paths), " torch:", model.predict(test_paths))

# %%
# The maps, side by side
# ----------------------
# The difference is float32 rounding: the two paths run the same arithmetic
# in a different order (and the ONNX file computes the winning distances
# exactly, where the pipeline's search expands ``|x - y|^2``).

fig, axes = plt.subplots(3, len(test_paths), figsize=(2.4 * len(test_paths), 7.2))
for column, path in enumerate(test_paths):
    kind = Path(path).parent.name
    axes[0, column].imshow(maps[column], cmap="inferno", vmin=0, vmax=scores.max())
    axes[0, column].set_title(f"{kind}\ntorch", fontsize=9)
    axes[1, column].imshow(onnx_maps[column], cmap="inferno", vmin=0, vmax=scores.max())
    axes[1, column].set_title("ONNX", fontsize=9)
    image = axes[2, column].imshow(np.abs(onnx_maps[column] - maps[column]) / maps[column], cmap="viridis")
    axes[2, column].set_title("relative difference", fontsize=9)
    fig.colorbar(image, ax=axes[2, column], fraction=0.046, format="%.0e")
for axis in axes.flat:
    axis.set_axis_off()
fig.tight_layout()
plt.show()

# %%
# What the file says about itself
# -------------------------------
# Threshold, fitted geometry, channels, backbone and package version travel
# with the graph as metadata, so a service in another language can read them
# too (the ``skpatchcore`` entry of the model's metadata, as JSON).

meta = runtime.metadata_
print(
    json.dumps(
        {
            key: meta[key]
            for key in (
                "threshold",
                "geometry",
                "input_size",
                "backbone",
                "layers",
                "bank_size",
                "skpatchcore_version",
            )
        },
        indent=1,
    )
)

# %%
# A modified file is refused
# --------------------------
# The file carries the SHA-256 of its own bytes; one changed value of the
# memory bank is enough to refuse it, with a one-line error.

data_bytes = bytearray(onnx_path.read_bytes())
data_bytes[len(data_bytes) // 2] ^= 1
damaged = Path(workdir.name) / "damaged.onnx"
damaged.write_bytes(bytes(data_bytes))
try:
    OnnxPatchCore(damaged)
except ModelFileError as error:
    print(error)

workdir.cleanup()
