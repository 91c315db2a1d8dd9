"""Choosing the torch device, in one place."""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import torch

_PRECISION_LOCK = threading.RLock()
# Threads inside float32_precision and the CPU settings they found (see _cpu_float32).
_PIN_LOCK = threading.Lock()
_CPU_PINS = 0
_CPU_SAVED = None


def resolve_device(device, *, param: str = "device") -> torch.device:
    """Turn a user's ``device`` value into a :class:`torch.device`.

    ``"auto"`` picks CUDA when available, else the CPU. Asking for CUDA on a
    machine without it is an error rather than a silent fallback.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"The '{param}' parameter must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or a "
            f"torch.device; got {device!r}."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"The '{param}' parameter is {device!r} but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use device='cpu' or device='auto'."
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"The '{param}' parameter must name a CPU or CUDA device; got {device!r}.")
    return resolved


def device_after_load(device: torch.device | str, owner: str) -> torch.device:
    """Device to use for a model unpickled on this machine.

    A model fitted on CUDA keeps using CUDA where it exists; elsewhere it
    moves to the CPU with a warning (the scores are the same up to float
    rounding between the two devices).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"{owner} was fitted on {device} but CUDA is not available here; it runs on the CPU.",
            UserWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return device


def _cpu_precision_flags() -> list:
    """torch's per-backend CPU float32 precision settings (torch >= 2.9), or []."""
    mkldnn = torch.backends.mkldnn
    flags = [getattr(mkldnn, "matmul", None), getattr(mkldnn, "conv", None)]
    return [flag for flag in flags if flag is not None and hasattr(flag, "fp32_precision")]


def cpu_products_are_float32() -> bool:
    """Whether torch's CPU float32 matrix products run in full float32 now.

    ``torch.set_float32_matmul_precision("medium")``, or ``fp32_precision =
    "bf16"`` on ``torch.backends`` or its oneDNN parts, lets them run in
    bfloat16 on CPUs that have it. The most specific setting that is not
    ``"none"`` decides, as in torch.
    """
    try:
        matmul = getattr(torch.backends.mkldnn, "matmul", None)
        for owner in (matmul, torch.backends.mkldnn, torch.backends):
            level = getattr(owner, "fp32_precision", "none") if owner is not None else "none"
            if level != "none":
                return level == "ieee"
        return torch.get_float32_matmul_precision() == "highest"
    except (RuntimeError, AttributeError):  # settings torch itself refuses to read
        return False


@contextlib.contextmanager
def _cpu_float32():
    """Hold torch's CPU products at float32 while any thread is inside.

    The first thread in saves the settings and sets float32, the last one out
    puts them back; threads in between compute side by side (no lock held).
    """
    global _CPU_PINS, _CPU_SAVED
    with _PIN_LOCK:
        if _CPU_PINS == 0:
            flags = _cpu_precision_flags()
            if flags:  # torch >= 2.9: oneDNN's matmul and convolution settings
                _CPU_SAVED = (flags, [flag.fp32_precision for flag in flags])
                for flag in flags:
                    flag.fp32_precision = "ieee"
            else:  # older torch: one process-wide setting
                _CPU_SAVED = (None, torch.get_float32_matmul_precision())
                torch.set_float32_matmul_precision("highest")
        _CPU_PINS += 1
    try:
        yield
    finally:
        with _PIN_LOCK:
            _CPU_PINS -= 1
            if _CPU_PINS == 0:
                flags, previous = _CPU_SAVED
                if flags is None:
                    torch.set_float32_matmul_precision(previous)
                else:
                    for flag, value in zip(flags, previous):
                        flag.fp32_precision = value
                _CPU_SAVED = None


@contextlib.contextmanager
def float32_precision(allow_tf32: bool = False):
    """Run convolutions and matrix products in true float32 (CUDA: unless ``allow_tf32``).

    cuDNN uses TF32 for float32 convolutions by default on Ampere and newer
    GPUs. On an H200 that moved the patch features by 3.5e-3 (relative) from
    the CPU's, enough to move scores; true float32 matched the CPU to 5e-8.
    TF32 runs about three times faster, so on CUDA it is the user's choice
    (``allow_tf32``); the CUDA flags are set and restored under a lock, held
    throughout, since two callers may want different ones.

    On the CPU, a process-wide ``torch.set_float32_matmul_precision("medium")``
    (set for some other model, say) runs float32 products in bfloat16 on CPUs
    that have it: heat maps moved by 4e-3 (relative) on an AMX Xeon. The CPU
    always computes in float32 here, and the user's settings are back once no
    thread is inside (another thread's products run in float32 meanwhile).
    """
    with _cpu_float32():
        if not torch.cuda.is_available():
            yield
            return
        with _PRECISION_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; both work
            previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            try:
                yield
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def as_tensor(data) -> torch.Tensor:
    """A tensor sharing memory with ``data`` (no copy), read-only arrays included.

    torch warns that writing into a tensor made from a read-only array (a
    memory map, a joblib-shared array) is undefined; skpatchcore only reads
    such tensors, so that warning says nothing useful here.
    """
    if torch.is_tensor(data):
        return data
    array = np.asarray(data)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
