"""Choosing the torch device, in one place."""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import torch

_PRECISION_LOCK = threading.RLock()


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


@contextlib.contextmanager
def cuda_precision(allow_tf32: bool = False):
    """Run CUDA convolutions and matrix products in float32 or TensorFloat-32.

    cuDNN uses TF32 for float32 convolutions by default on Ampere and newer
    GPUs. On an H200 that moved the patch features by 3.5e-3 (relative) from
    the CPU's, enough to move scores; true float32 matched the CPU to 5e-8.
    TF32 runs about three times faster, so it is the user's choice
    (``allow_tf32``). The flags are global in torch: set and restored under a lock.
    """
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
