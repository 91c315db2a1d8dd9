"""Helpers shared by the benchmark scripts: machine description, memory, output files.

Not part of the package. Imported by ``run_benchmarks.py`` and ``speed.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# The settings the reference numbers were measured with, made explicit so that a
# change of the package defaults does not change what is compared.
REFERENCE_SETTINGS = {
    "aggregation": "reference",
    "pretrain_dim": 1024,
    "target_dim": 1024,
    "image_size": 256,
    "crop_size": 224,
    "resize_side": "shorter",
    "n_neighbors": 1,
    "projection_dim": 128,
    "n_starts": 10,
}
# What the reference implementation imports before any work: patchcore-inspection's
# modules pull in torch, torchvision and timm (backbones), faiss and scipy.ndimage
# (search, smoothing), scikit-learn (metrics) and PIL (loading).
REFERENCE_IMPORTS = ("torch", "torchvision", "timm", "faiss", "scipy.ndimage", "sklearn.metrics", "PIL.Image")


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    On Linux this is ``VmHWM``, the high-water mark of the process's own
    memory. ``getrusage``'s ``ru_maxrss`` is not used there: it carries over
    the parent's resident size at ``fork`` (through ``exec``), so a benchmark
    child started by a large parent reported the parent's size. (A tiny child
    of a 2 GB parent: ru_maxrss 2074 MB, VmHWM 10 MB.)
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, other systems KiB.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb() -> float | None:
    """Resident set size right now, in MiB (Linux only; None elsewhere)."""
    return _proc_status_mb("VmRSS")


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment for a child process limited to ``threads`` (None: unchanged)."""
    env = dict(os.environ)
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    return env


def apply_threads(threads: int | None) -> None:
    """Limit torch and faiss to ``threads`` in this process (None: leave the defaults)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024.0**2, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")


def machine_info() -> dict:
    """CPU, cores, memory, library versions, date and commit: what a result depends on."""
    import torch

    try:
        import faiss

        faiss_threads = faiss.omp_get_max_threads()
    except ImportError:
        faiss_threads = None
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads,
        "memory_gb": _total_memory_gb(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name) for name in ("skpatchcore", "torch", "numpy", "faiss", "sklearn", "timm")
        },
        "git_commit": _git_commit(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def machine_line(info: dict) -> str:
    """One line describing the machine, for the top of a markdown table."""
    versions = info["versions"]
    load = info.get("load_average")
    load_text = f", load {load[0]:.1f}" if load else ""
    return (
        f"{info['cpu']}, {info['usable_cores']} cores usable (torch {info['torch_threads']} threads, "
        f"faiss {info['faiss_threads']}), {info['memory_gb']} GB RAM{load_text}; torch {versions['torch']}, "
        f"numpy {versions['numpy']}, faiss {versions['faiss']}, skpatchcore {versions['skpatchcore']} "
        f"({info['git_commit']}); {info['date']}"
    )


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return os.fspath(value)
    return repr(value)


def _json_safe(value):
    """Replace NaN / inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_results(out: Path, name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    json_path.write_text(
        json.dumps(_json_safe(payload), indent=2, default=_json_default, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    md_path.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; None cells print as an em dash."""

    def cell(value) -> str:
        return "—" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, digits: int = 3, suffix: str = "") -> str | None:
    """Format a number with ``digits`` decimals, None (or NaN) stays None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return f"{value:.{digits}f}{suffix}"


def fmt_ratio(value) -> str | None:
    """A speed-up or memory ratio such as ``12.3x``."""
    if value is None or not math.isfinite(value):
        return None
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def parse_value(text: str):
    """A ``--set`` value: Python literal when it parses (``None``, ``0.1``, ``(256, 320)``), else the text."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignment(text: str) -> tuple[str, str]:
    """Split ``key=value``; raise ``ValueError`` with the offending text otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()
