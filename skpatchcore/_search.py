"""Nearest-neighbour search over the memory bank.

:class:`NearestNeighborIndex` hides where and how the search runs:

- ``"flat"`` (exact): faiss ``IndexFlatL2`` on the CPU (BLAS on every core),
  faiss on the GPU when faiss-gpu is importable, otherwise plain torch matrix
  products on the CUDA device.
- ``"ivf"`` (approximate, CPU): faiss ``IndexIVFFlat``. k-means splits the
  bank into ``nlist`` cells; a query is compared only with the vectors of its
  ``nprobe`` nearest cells.
- ``"hnsw"`` (approximate, CPU): faiss ``IndexHNSWFlat``, a navigable graph
  walked greedily from an entry point.

The approximate indexes trade a little recall (a query's reported
neighbour is sometimes not its true nearest, so its distance is slightly too
large) for search time on banks of hundreds of thousands of vectors or more;
on the banks of one MVTec-style category exact search is fast enough.
``benchmarks/ann.py`` measures both. An index is built from a NumPy bank and
never pickled: estimators keep the bank and rebuild the index after loading.

Both approximate indexes are built reproducibly: the IVF k-means uses a fixed
seed, and the HNSW graph is built on one thread (its parallel construction
depends on thread timing), so the same bank always gives the same index and
the same scores.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from numbers import Integral

import numpy as np
import torch

from .utils._device import float32_precision

# Queries per torch search step on CUDA: bounds the (queries x bank) distance block.
_TORCH_QUERY_CHUNK = 8192

INDEX_KINDS = ("flat", "ivf", "hnsw")
# Options a dict ``index`` may set, per kind (None: chosen from the bank size).
_DEFAULT_OPTIONS = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": None},
    "hnsw": {"m": 32, "ef_construction": 80, "ef_search": 128},
}
# faiss's k-means wants at least this many training vectors per cell.
_MIN_VECTORS_PER_CELL = 39
_TRAINING_SEED = 0


def _faiss():
    import faiss

    return faiss


def faiss_has_gpu() -> bool:
    """True when the installed faiss can build GPU indexes and sees a GPU."""
    try:
        faiss = _faiss()
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except ImportError:
        return False


def check_index(index, param: str = "index") -> tuple[str, dict]:
    """Validate an ``index`` value: a kind name, or a dict with ``"kind"`` and options.

    Returns ``(kind, options)`` with every option of that kind present (None
    where it is chosen from the bank size).
    """
    accepted = (
        f"one of {list(INDEX_KINDS)} or a dict such as {{'kind': 'ivf', 'nprobe': 16}} or "
        "{'kind': 'hnsw', 'ef_search': 128}"
    )
    if isinstance(index, str):
        kind, given = index, {}
    elif isinstance(index, dict):
        given = dict(index)
        kind = given.pop("kind", None)
    else:
        raise ValueError(f"The '{param}' parameter must be {accepted}; got {index!r}.")
    if kind not in INDEX_KINDS:
        raise ValueError(f"The '{param}' parameter must be {accepted}; got {index!r}.")
    options = dict(_DEFAULT_OPTIONS[kind])
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise ValueError(
            f"The '{param}' parameter has option(s) {unknown} that index kind {kind!r} does not take; "
            f"it takes {sorted(options) or 'none'}."
        )
    for name, value in given.items():
        if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"The '{param}' option {name!r} must be a positive int; got {value!r}.")
        options[name] = int(value)
    return kind, options


def ivf_cells(n_vectors: int) -> int:
    """Default number of IVF cells: about 4 sqrt(n), with enough vectors to train each."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_vectors // _MIN_VECTORS_PER_CELL))


def ivf_probes(n_cells: int) -> int:
    """Default number of IVF cells searched per query: 1 in 32, at least 8.

    On patch features of mpdd metal_plate (38k-vector bank, 784 cells) that
    found the exact nearest neighbour for 99.9% of the queries.
    """
    return min(n_cells, max(8, math.ceil(n_cells / 32)))


@contextlib.contextmanager
def _one_faiss_thread():
    """Run faiss on this thread only (the OpenMP setting is per calling thread)."""
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _cpu_index(bank: np.ndarray, kind: str, options: dict):
    """Build a faiss CPU index of ``kind``; returns it and the options it was built with."""
    faiss = _faiss()
    n_vectors, n_dims = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(n_dims)
        index.add(bank)
        return index, {}
    if kind == "ivf":
        nlist = min(options["nlist"] or ivf_cells(n_vectors), n_vectors)
        nprobe = min(options["nprobe"] or ivf_probes(nlist), nlist)
        quantizer = faiss.IndexFlatL2(n_dims)
        index = faiss.IndexIVFFlat(quantizer, n_dims, nlist, faiss.METRIC_L2)
        # Seeded k-means on at most 64 vectors per cell (faiss's default 256
        # makes training on large banks cost more than it helps).
        index.cp.seed = _TRAINING_SEED
        index.cp.max_points_per_centroid = 64
        index.train(bank)
        index.add(bank)
        index.nprobe = nprobe
        return index, {"nlist": nlist, "nprobe": nprobe}
    index = faiss.IndexHNSWFlat(n_dims, options["m"], faiss.METRIC_L2)
    index.hnsw.efConstruction = options["ef_construction"]
    index.hnsw.efSearch = options["ef_search"]
    with _one_faiss_thread():  # parallel insertion would make the graph depend on timing
        index.add(bank)
    return index, {key: options[key] for key in ("m", "ef_construction", "ef_search")}


class NearestNeighborIndex:
    """L2 k-nearest-neighbour search over a fixed bank, exact or approximate.

    Parameters
    ----------
    bank : ndarray of shape (n_vectors, n_features), float32
        The memory bank.
    device : torch.device
        ``cpu``: a faiss index of kind ``index``. ``cuda``: exact search, with a
        faiss GPU index when available, else torch on that device.
    allow_tf32 : bool, default=False
        Let the torch backend's matrix products use TensorFloat-32.
    index : {"flat", "ivf", "hnsw"} or dict, default="flat"
        ``"flat"``: exact search. ``"ivf"`` / ``"hnsw"``: approximate faiss
        indexes on the CPU (see the module docstring); a dict ``{"kind":
        "ivf", "nlist": ..., "nprobe": ...}`` or ``{"kind": "hnsw", "m": ...,
        "ef_construction": ..., "ef_search": ...}`` sets their options. On CUDA
        an approximate kind falls back to exact search with a warning.

    Attributes
    ----------
    kind : str
        The kind of index actually built.
    options : dict
        The options it was built with (``nlist`` and ``nprobe`` resolved).
    backend : {"faiss-cpu", "faiss-gpu", "torch"}
        Where the search runs.
    """

    def __init__(self, bank: np.ndarray, device: torch.device, allow_tf32: bool = False, index="flat"):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.device = torch.device(device)
        self.allow_tf32 = allow_tf32
        self.kind, options = check_index(index)
        self.options = {}
        self.backend = "faiss-cpu"
        self._torch_bank = None
        self._torch_norms = None
        if self.device.type == "cuda":
            if self.kind != "flat":
                warnings.warn(
                    f"The approximate index {self.kind!r} runs on the CPU only; on {self.device} the "
                    "search is exact instead (a GPU does exact search fast).",
                    UserWarning,
                    stacklevel=3,
                )
                self.kind = "flat"
            if faiss_has_gpu():
                faiss = _faiss()
                self._resources = faiss.StandardGpuResources()
                config = faiss.GpuIndexFlatConfig()
                config.device = self.device.index or 0
                self._index = faiss.GpuIndexFlatL2(self._resources, self.bank.shape[1], config)
                self._index.add(self.bank)
                self.backend = "faiss-gpu"
            else:
                self._torch_bank = torch.from_numpy(self.bank).to(self.device)
                self._torch_norms = torch.einsum("ij,ij->i", self._torch_bank, self._torch_bank)
                self.backend = "torch"
        else:
            self._index, self.options = _cpu_index(self.bank, self.kind, options)

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def bank_tensor(self) -> torch.Tensor:
        """The bank as a tensor on the search device (shares memory on the CPU)."""
        return self._torch_bank if self._torch_bank is not None else torch.from_numpy(self.bank)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances and bank indices of the ``k`` nearest, (n, k) tensors.

        ``queries`` is a float32 tensor; results come back on the same device as
        the queries when the torch backend runs, else on the CPU. An
        approximate index reports, for each query, the nearest vectors it
        visited (sorted by distance); a query for which it visited fewer than
        ``k`` is searched exactly instead.
        """
        k = min(k, len(self.bank))
        if self.backend != "torch":
            batch = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
            squared, indices = self._index.search(batch, k)
            if self.kind != "flat":
                short = np.flatnonzero((indices < 0).any(axis=1))
                if len(short):
                    squared[short], indices[short] = _faiss().knn(batch[short], self.bank, k)
            return torch.from_numpy(np.maximum(squared, 0.0, out=squared)), torch.from_numpy(indices)
        queries = queries.to(self.device, dtype=torch.float32)
        squared, indices = [], []
        with torch.inference_mode(), float32_precision(self.allow_tf32):
            for block in queries.split(_TORCH_QUERY_CHUNK):
                dist = torch.einsum("ij,ij->i", block, block)[:, None] + self._torch_norms[None, :]
                dist.addmm_(block, self._torch_bank.T, alpha=-2.0)
                values, positions = torch.topk(dist, k, dim=1, largest=False, sorted=True)
                squared.append(values.clamp_min_(0.0))
                indices.append(positions)
        return torch.cat(squared), torch.cat(indices)
