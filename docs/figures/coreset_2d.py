"""Greedy coreset against a random subsample of the same size, on 2-D points.

Drawn at documentation build time for the "How PatchCore works" page.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.spatial import cKDTree

from skpatchcore import GreedyCoresetSampler

rng = np.random.default_rng(0)
# Many near-identical patches (a dense blob) and a few rarer kinds of patch.
dense = rng.normal(0.0, 0.6, size=(1800, 2))
arc = np.c_[np.cos(np.linspace(0.3, 2.6, 150)), np.sin(np.linspace(0.3, 2.6, 150))] * 4.0
rare = np.r_[arc + rng.normal(0, 0.15, arc.shape), rng.normal((4.5, -3.0), 0.3, size=(50, 2))]
points = np.r_[dense, rare].astype(np.float32)
n_keep = int(0.02 * len(points))

greedy = points[GreedyCoresetSampler(ratio=0.02, random_state=0).fit(points).sample_indices_]
random = points[rng.choice(len(points), n_keep, replace=False)]

fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True, sharey=True)
for ax, kept, title in [(axes[0], random, "random 2 %"), (axes[1], greedy, "greedy coreset 2 %")]:
    radius = cKDTree(kept).query(points)[0].max()
    ax.scatter(*points.T, s=3, color="0.75", label="all patch vectors")
    ax.scatter(*kept.T, s=22, color="tab:red", label="kept in the memory bank")
    ax.set_title(f"{title}\nfarthest point: {radius:.2f} from the bank", fontsize=10)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
