"""The benchmarks' own measuring tools measure what their tables say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import MPDD, needs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    # getrusage's ru_maxrss would report the parent's ~300 MB here.
    ballast = np.ones(300 * 1024 * 1024 // 8)
    code = "from benchmarks._common import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 150, out.stdout
    assert ballast.sum() > 0


@needs(MPDD)
def test_plain_pipeline_scores_like_the_package():
    # speed.py's pipeline part compares our times and memory to plain.plain_pipeline's;
    # that is only fair if both compute the same thing.
    from benchmarks._common import REFERENCE_SETTINGS
    from benchmarks.plain import plain_pipeline
    from skpatchcore import make_patchcore
    from skpatchcore.datasets import load_mvtec_category

    data = load_mvtec_category(MPDD)
    train = data.train_paths[:4]
    test = [data.test_paths[i] for i in (0, len(data.test_paths) - 1)]
    steps = []
    plain = plain_pipeline(train, test, ratio=0.05, seed=0, on_step=steps.append)
    pipe = make_patchcore(
        backbone="efficientnet_lite0",
        ratio=0.05,
        random_state=0,
        device="cpu",
        verbose=0,
        **REFERENCE_SETTINGS,
    )
    maps, scores = pipe.fit(train).predict_map(test, return_scores=True)

    assert steps == ["load", "fit"]
    assert plain["bank_size"] == len(pipe[-1].memory_bank_) == int(4 * 28 * 28 * 0.05)
    np.testing.assert_allclose(plain["scores"], scores, rtol=1e-4)
    assert plain["maps"].shape == maps.shape == (2, 224, 224)
    np.testing.assert_allclose(plain["maps"], maps, rtol=1e-4, atol=1e-4 * float(np.abs(maps).max()))
    assert set(plain["times"]) >= {"features_s", "coreset_s", "index_s", "fit_s", "predict_ms_per_image"}
