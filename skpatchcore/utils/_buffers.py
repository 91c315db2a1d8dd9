"""Large output buffers that do not stall the first write on huge-page compaction."""

from __future__ import annotations

import mmap

import numpy as np


def empty_buffer(shape, dtype=np.float32, *, populate: bool = True) -> np.ndarray:
    """An uninitialised writable array in its own anonymous memory mapping.

    ``np.empty`` asks the kernel for transparent huge pages on large arrays.
    Where free memory is fragmented the kernel then compacts memory while the
    array is first written: on our 2-core test machine that made filling a
    173 MB features array take 0.28-0.47 s instead of 0.07 s. A plain anonymous
    mapping uses ordinary pages (unless the system forces huge pages on every
    mapping) and, like a large ``np.empty``, goes back to the system as soon as
    the array is freed. The mapping is private, so a forked process gets its own
    copy on write, as with ``np.empty``. The array pickles, copies and converts
    like any other; only ``ndarray.resize`` refuses it (it does not own its data).

    With ``populate`` (for arrays that will be filled whole) the kernel maps
    all pages up front, where it can (Linux): one call instead of a page fault
    per 4 kB page on first write. For the 173 MB MPDD features that took the
    allocation plus the fill from ~85 to ~65 ms.
    """
    shape = tuple(int(n) for n in np.atleast_1d(shape)) if not isinstance(shape, int) else (shape,)
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n_bytes < 1 << 22:  # below numpy's own huge-page threshold
        return np.empty(shape, dtype=dtype)
    if hasattr(mmap, "MAP_PRIVATE"):  # POSIX: private, so a forked child copies on write
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        memory = mmap.mmap(-1, n_bytes, flags=flags)
    else:
        memory = mmap.mmap(-1, n_bytes)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)
