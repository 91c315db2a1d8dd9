"""Choosing the torch device, in one place."""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import torch

_PRECISION_LOCK = threading.RLock()
# Threads inside cpu_float32 and the CPU settings they found.
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


def _precision_flags(cuda: bool) -> list:
    """torch's per-backend float32 precision settings and their parents (torch >= 2.9), or [].

    A setting left at ``"none"`` follows its parent, and reads as the parent's
    value: oneDNN's matmul and convolution follow ``torch.backends.mkldnn``,
    CUDA's matmul ``torch.backends``, cuDNN's convolution ``torch.backends.cudnn``.
    """
    backends = torch.backends
    if cuda:
        pairs = [(getattr(backends.cuda, "matmul", None), backends)]
        pairs.append((getattr(backends.cudnn, "conv", None), backends.cudnn))
    else:
        pairs = [(getattr(backends.mkldnn, name, None), backends.mkldnn) for name in ("matmul", "conv")]
    flags = [(flag, parent) for flag, parent in pairs if hasattr(flag, "fp32_precision")]
    return flags if all(hasattr(parent, "fp32_precision") for _, parent in flags) else []


def _pin(pairs: list, value: str) -> list:
    """Set each setting of ``pairs`` to ``value``; return what puts them back.

    A setting that reads as its parent's value goes back to ``"none"``, so that
    it follows its parent again afterwards (read back literally, it would stay
    at the parent's value of the moment for good).
    """
    saved = []
    for flag, parent in pairs:
        own = flag.fp32_precision
        saved.append((flag, "none" if own == parent.fp32_precision else own))
    for flag, _ in saved:
        flag.fp32_precision = value
    return saved


def _unpin(saved: list) -> None:
    for flag, value in saved:
        flag.fp32_precision = value


@contextlib.contextmanager
def cpu_float32():
    """Hold torch's CPU products and convolutions at float32 while any thread is inside.

    A process-wide ``torch.set_float32_matmul_precision("medium")`` (set for
    some other model, say), or ``fp32_precision = "bf16"`` on
    ``torch.backends`` or its oneDNN parts, runs float32 products in bfloat16
    on CPUs that have it: heat maps moved by 4e-3 (relative) on an AMX Xeon,
    and the coreset's error bound would not hold. The first thread in saves
    the settings and sets float32, the last one out puts them back; threads in
    between compute side by side (no lock held). Meanwhile, another thread's
    products run in float32 too, and a setting changed by another thread is
    overwritten when the last one leaves.
    """
    global _CPU_PINS, _CPU_SAVED
    with _PIN_LOCK:
        if _CPU_PINS == 0:
            flags = _precision_flags(cuda=False)
            if flags:
                _CPU_SAVED = (True, _pin(flags, "ieee"))
            else:  # older torch: one process-wide setting
                _CPU_SAVED = (False, torch.get_float32_matmul_precision())
                torch.set_float32_matmul_precision("highest")
        _CPU_PINS += 1
    try:
        yield
    finally:
        with _PIN_LOCK:
            _CPU_PINS -= 1
            if _CPU_PINS == 0:
                per_backend, saved = _CPU_SAVED
                if per_backend:
                    _unpin(saved)
                else:
                    torch.set_float32_matmul_precision(saved)
                _CPU_SAVED = None


@contextlib.contextmanager
def float32_precision(allow_tf32: bool = False):
    """Run convolutions and matrix products in true float32 (CUDA: unless ``allow_tf32``).

    On the CPU, always (:func:`cpu_float32`). cuDNN uses TF32 for float32
    convolutions by default on Ampere and newer GPUs. On an H200 that moved the
    patch features by 3.5e-3 (relative) from the CPU's, enough to move scores;
    true float32 matched the CPU to 5e-8. TF32 runs about three times faster,
    so on CUDA it is the user's choice (``allow_tf32``); the CUDA settings are
    set and restored under a lock, held throughout, since two callers may want
    different ones.
    """
    with cpu_float32():
        if not torch.cuda.is_available():
            yield
            return
        with _PRECISION_LOCK:
            flags = _precision_flags(cuda=True)
            if flags:
                saved = _pin(flags, "tf32" if allow_tf32 else "ieee")
                try:
                    yield
                finally:
                    _unpin(saved)
                return
            with warnings.catch_warnings():  # older torch: the allow_tf32 flags
                warnings.simplefilter("ignore")
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
