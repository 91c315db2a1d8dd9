"""From patch scores to the heat map, on one generated defective part.

Drawn at documentation build time for the "How PatchCore works" page.
"""

import tempfile

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from skpatchcore import make_patchcore
from skpatchcore._demo import make_demo_dataset
from skpatchcore.datasets import load_masks, load_mvtec_category

SIZE = 160  # model input: the 256 px demo images resized, no crop

with tempfile.TemporaryDirectory() as folder:
    data = load_mvtec_category(make_demo_dataset(folder, n_train=8, n_test_good=0, n_test_defect=1))
    model = make_patchcore(
        backbone="efficientnet_lite0",
        image_size=SIZE,
        crop_size=None,
        ratio=0.25,
        random_state=0,
        device="cpu",
    ).fit(data.train_paths)
    index = data.test_defect_types.index("scratch")
    path = data.test_paths[index]
    mask = load_masks([data.test_mask_paths[index]], [path], image_size=SIZE, crop_size=None)[0]
    features = model.named_steps["features"].transform([path])
    with Image.open(path) as image:
        picture = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))

detector = model.named_steps["detector"]
grid = detector.predict_map(features)[0]  # output_size=None: the raw patch-score grid
upsampled = detector.set_params(sigma=0).predict_map(features, output_size=(SIZE, SIZE))[0]
final = detector.set_params(sigma=4.0).predict_map(features, output_size=(SIZE, SIZE))[0]

fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
panels = [
    (picture, f"model input ({SIZE} x {SIZE})"),
    (grid, f"patch scores ({grid.shape[0]} x {grid.shape[1]} grid)"),
    (upsampled, "bilinear upsampling"),
    (final, "Gaussian blur, sigma = 4 px"),
]
extent = (-0.5, SIZE - 0.5, SIZE - 0.5, -0.5)  # every panel in model-input pixels
for ax, (values, title) in zip(axes, panels):
    if values.ndim == 3:
        ax.imshow(values, extent=extent)
    else:
        ax.imshow(values, cmap="inferno", vmin=grid.min(), vmax=grid.max(), extent=extent)
    ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
fig.suptitle("Cyan: the defect's ground-truth outline", fontsize=10, y=0.02)
fig.tight_layout()
