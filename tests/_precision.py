"""torch's process-wide float32 precision settings, for the tests that change them."""

from __future__ import annotations

import torch

# torch >= 2.9: fp32_precision per backend and operation, next to the legacy global
PER_BACKEND = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")


def bfloat16_settings() -> list:
    """(name, setter) of the ways a process can let float32 CPU products run in bfloat16."""
    settings = [("legacy medium", lambda: torch.set_float32_matmul_precision("medium"))]
    if PER_BACKEND:
        settings.append(("generic bf16", lambda: setattr(torch.backends, "fp32_precision", "bf16")))
        settings.append(
            ("oneDNN matmul bf16", lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"))
        )
    return settings


def reset_precision() -> None:
    """torch's defaults: every per-backend setting follows its parent, legacy "highest"."""
    if PER_BACKEND:
        backends = torch.backends
        for owner in (backends, backends.mkldnn, backends.mkldnn.matmul, backends.mkldnn.conv):
            owner.fp32_precision = "none"
        backends.cuda.matmul.fp32_precision = "none"
    else:
        torch.set_float32_matmul_precision("highest")


def cpu_matmul_precision() -> str:
    """What CPU float32 matrix products run in now ("ieee" is float32)."""
    if PER_BACKEND:
        level = torch.backends.mkldnn.matmul.fp32_precision  # reads as its parent's when "none"
        return "ieee" if level == "none" else level
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "reduced"
