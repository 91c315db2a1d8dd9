"""
============================================
Choosing the threshold for a production line
============================================

An anomaly score only becomes a decision through a threshold: above it, the
part is flagged. ``fit`` sets one automatically from the good training images
(see :ref:`conventions`), but on a production line the threshold is a business
decision: how many good parts may be sent to a second look (false alarms) in
exchange for catching defects? This example measures scores on good images the
model has never seen, picks the threshold for a target false-alarm rate, sets
it with ``set_threshold`` and shows what ``predict`` does with it.
"""

# %%
# Data and model
# --------------
# We split the good training images in two: the model is fitted on one part,
# and the other part, never seen by the model, plays the role of a
# calibration run of good parts from the line. The test set (good and
# defective parts) is kept to check the result.

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from skpatchcore import make_patchcore
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
    Path(workdir.name) / "plates", n_train=34, n_test_good=10, n_test_defect=5
)
data = load_mvtec_category(folder)

rng = np.random.default_rng(0)
order = rng.permutation(len(data.train_paths))
fit_paths = [data.train_paths[i] for i in order[:20]]
calibration_paths = [data.train_paths[i] for i in order[20:34]]

good = np.flatnonzero(data.test_labels == 1)
defective = np.flatnonzero(data.test_labels == -1)
test_index = np.r_[
    good[np.linspace(0, len(good) - 1, min(10, len(good))).astype(int)],
    defective[np.linspace(0, len(defective) - 1, min(15, len(defective))).astype(int)],
]
test_paths = [data.test_paths[i] for i in test_index]
test_labels = data.test_labels[test_index]

model = make_patchcore(
    backbone="efficientnet_lite0", image_size=128, crop_size=None, ratio=0.1, random_state=0
).fit(fit_paths)
detector = model.named_steps["detector"]

calibration_scores = model.anomaly_score(calibration_paths)
test_scores = model.anomaly_score(test_paths)
print(
    f"fitted on {len(fit_paths)} good images; {len(calibration_paths)} held-out good images; "
    f"test: {np.sum(test_labels == 1)} good, {np.sum(test_labels == -1)} defective"
)

# %%
# Three candidate thresholds
# --------------------------
# - ``threshold_`` from ``fit``: the largest out-of-fold score of good
#   *training* images (``contamination="auto"``);
# - the ``1 - alpha`` quantile of the held-out good scores, for a target
#   false-alarm rate ``alpha`` (here 10 %);
# - the largest held-out good score: no false alarm on anything seen so far.
#
# A quantile of 14 scores is a rough estimate: with ``n`` held-out images, a
# false-alarm rate is only resolved to about ``1 / n``. Collect a few hundred
# good parts from the line before trusting a target of a few percent.

alpha = 0.10
thresholds = {
    "fit's threshold_": detector.threshold_,
    f"{1 - alpha:.0%} quantile of held-out good": float(np.quantile(calibration_scores, 1 - alpha)),
    "max of held-out good": float(calibration_scores.max()),
}


def rates(threshold):
    """False-alarm rate on good test images and detection rate on defective ones."""
    flagged = test_scores > threshold
    return flagged[test_labels == 1].mean(), flagged[test_labels == -1].mean()


for name, threshold in thresholds.items():
    false_alarms, detections = rates(threshold)
    print(f"{name:<32} {threshold:8.3f}: false alarms {false_alarms:5.0%}, defects caught {detections:5.0%}")

# %%
# The automatic threshold is the largest score of the training images, each
# scored against the bank without its own patches (here all 20 training
# images, in 16 folds of one or two), so that every training image meets
# nearly the whole bank, as a new image does. Being a maximum, it follows the
# single most unusual training image; the held-out quantile rests on images
# the model has never seen, as on the line.
#
# The picture: each dot is one image's anomaly score; the curve shows every
# possible threshold's trade-off on the test images.

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
groups = [
    (calibration_scores, "held-out good", "tab:blue"),
    (test_scores[test_labels == 1], "test good", "tab:green"),
    (test_scores[test_labels == -1], "test defective", "tab:red"),
]
for row, (values, _, colour) in enumerate(groups):
    jitter = rng.uniform(-0.15, 0.15, len(values))
    left.scatter(values, row + jitter, color=colour, s=25)
left.set_yticks(range(len(groups)), [name for _, name, _ in groups])
styles = ["--", "-", ":"]
for (name, threshold), style in zip(thresholds.items(), styles):
    left.axvline(threshold, color="k", linestyle=style, label=name)
left.set_xlabel("anomaly score")
left.legend(fontsize=8, loc="upper left")

grid = np.sort(np.r_[test_scores, calibration_scores, list(thresholds.values())])
curve = np.array([rates(t) for t in grid])
right.plot(curve[:, 0], curve[:, 1], color="0.4")
for (name, threshold), style in zip(thresholds.items(), styles):
    right.plot(*rates(threshold), "ko", markersize=6, fillstyle="none" if style == ":" else "full")
    right.annotate(name, rates(threshold), textcoords="offset points", xytext=(6, -12), fontsize=8)
right.set_xlabel("false-alarm rate (good test images flagged)")
right.set_ylabel("defects caught")
right.set_xlim(-0.05, 1.05)
right.set_ylim(-0.05, 1.05)
fig.tight_layout()

# %%
# Setting the threshold
# ---------------------
# ``set_threshold`` on the detector step changes ``threshold_`` and
# ``offset_`` at once. ``decision_function`` becomes ``threshold -
# anomaly_score`` (negative = anomalous) and ``predict`` flags an image (-1)
# exactly when its anomaly score is above the threshold; the scores themselves
# do not change.

chosen = thresholds[f"{1 - alpha:.0%} quantile of held-out good"]
detector.set_threshold(chosen)
decision = model.decision_function(test_paths)
predicted = model.predict(test_paths)
assert np.allclose(decision, chosen - test_scores, atol=1e-4)
assert np.array_equal(predicted == -1, test_scores > chosen)
print(f"threshold_ = {detector.threshold_:.3f}, offset_ = {detector.offset_:.3f}")
print("predicted:", predicted)
print("truth:    ", test_labels)

# %%
# Saved with :func:`skpatchcore.save` (or ``joblib.dump``), the model keeps
# this threshold (see :ref:`sphx_glr_auto_examples_plot_persistence.py`).
# Fitting again resets it to the automatic one; ``contamination=0.05`` in
# ``make_patchcore`` would instead take the 95 % quantile of the out-of-fold
# training scores, which is quick but rests on a sample of the training
# images rather than on a calibration run of new parts.
#
# A decision rule with a review band
# ----------------------------------
# Lines often use two thresholds: parts below the first pass, parts above the
# second are rejected outright, and parts in between go to a person. A
# principled second threshold is the highest score any good image has ever
# reached (training calibration and held-out): above it, nothing good has been
# seen.

reject_above = max(float(calibration_scores.max()), float(detector.calibration_scores_.max()))


def decide(paths):
    """'pass', 'review' or 'reject' for each image."""
    scores = model.anomaly_score(paths)
    return np.select([scores <= chosen, scores <= reject_above], ["pass", "review"], "reject")


outcomes = np.select([test_scores <= chosen, test_scores <= reject_above], ["pass", "review"], "reject")
for truth, name in [(1, "good"), (-1, "defective")]:
    counts = {
        outcome: int(np.sum(outcomes[test_labels == truth] == outcome))
        for outcome in ("pass", "review", "reject")
    }
    print(f"{name:<9} test images: {counts}")
print("decide() on two test images:", decide(test_paths[:1] + test_paths[-1:]))
plt.show()
