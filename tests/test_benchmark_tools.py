"""The benchmarks' own measuring tools measure what their tables say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
