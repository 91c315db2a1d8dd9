"""Nearest-neighbour search over the memory bank.

:class:`NearestNeighborIndex` hides where and how the search runs:

- ``"flat"`` (exact): on a CPU that multiplies bfloat16 in hardware, for
  vectors of 512 dimensions or more and banks of 256 vectors or more, one
  bfloat16 product with proven error bounds rules out nearly every (query,
  bank vector) pair and the rest get exact float32 distances
  (:class:`_LowPrecisionFilter`: the same results as computing every pair);
  otherwise faiss ``IndexFlatL2`` (BLAS on every core). On CUDA: faiss on the
  GPU when faiss-gpu is importable, otherwise plain torch matrix products.
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
import threading
import warnings
from numbers import Integral

import numpy as np
import torch

from .utils._bf16 import BF16_UNIT, TINY, UNIT_ROUNDOFF, bf16_bits_as_float32, bf16_hardware
from .utils._device import float32_precision

# Queries per torch search step on CUDA: bounds the (queries x bank) distance block.
_TORCH_QUERY_CHUNK = 8192
# Exact search on the CPU finds its candidates with a bfloat16 product where the
# CPU has one and the vectors have _FILTER_MIN_DIMS dimensions or more (see
# _LowPrecisionFilter): None: so; True: always (tests force it, with or without
# the hardware); False: faiss alone. The product saves time in proportion to
# the dimension, while the passes over its entries (smallest, comparison,
# listing) cost the same at any dimension: at 1024 dims the filter took a third
# of faiss's time (MPDD, Magnetic Tile; 1% and 10% banks), at 152 dims up to
# 2.5x as long on a 90,000-vector Magnetic Tile bank, where 23% of the queries
# also had too many candidates.
_LOW_PRECISION = None
_FILTER_MIN_DIMS = 512
# ... and banks of at least this many vectors: on 62 x 1024 its fixed costs
# took 1.4 ms an image against faiss's 0.9 (at 423 vectors: 1.85 against 2.73).
_FILTER_MIN_VECTORS = 256
# Entries of the (queries x bank) bfloat16 product made at once (4 MB), in
# blocks of at least _FILTER_MIN_ROWS queries (fewer ran at 80% of the speed on a
# 90,000-vector bank).
_FILTER_ENTRIES = 1 << 21
_FILTER_MIN_ROWS = 256
# A query with more candidates than this (duplicated bank vectors, a query far
# from a tight bank) is searched by faiss instead (k times this, for k neighbours).
_MOST_CANDIDATES = 64
# Pairs whose exact distances are worked out at once (1024-dim rows: 512 KB;
# 128 took 25% less time than 512 on 4,326 pairs).
_PAIR_ROWS = 128
# The bank's bfloat16 rows come in multiples of this; the padding rows' entries
# exceed every product of the real ones (squared norms below 2^80).
_BANK_ROWS = 256
_FAR = 2.0**100
# The filter takes banks and queries whose centred vectors' norms stay below
# this (their products and squared norms then stay far inside float32's range).
_LARGEST_ENTRY = 2.0**40
# ... and vectors of at most this many dimensions: torch sums a single row of
# 32,768 or more entries on several threads, so pair_distances of one pair
# could then differ from the same pair's value among others.
_MOST_DIMS = 16384

# Out-of-fold searches (calibration) take the bank's vectors this many at a time.
_OUT_OF_FOLD_BLOCK = 1 << 18

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
        return _FlatSearch(bank), {}
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


class _FlatSearch:
    """Exact search of a bank with ``faiss.knn``: ``IndexFlatL2``'s search (the same
    routine, the same results bit for bit) without the index's own copy of the bank,
    which doubled the memory of a large bank."""

    def __init__(self, bank: np.ndarray):
        self.bank = bank

    def search(self, queries: np.ndarray, k: int):
        return _faiss().knn(queries, self.bank, k)


def pair_distances(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Squared distances of matching rows, in float32: the sum of squared differences.

    A row's value depends on that row alone (not on how many are computed at
    once), so the exact search's results can be compared bit for bit with a
    plain search that computes every pair this way.
    """
    diff = left - right
    return torch.linalg.vecdot(diff, diff)


def _rounded_down(values: np.ndarray, factor: float) -> tuple[torch.Tensor, np.ndarray]:
    """The largest bfloat16 numbers at most ``factor`` times ``values`` (float64, >= 0,
    finite), and their values: rounded down to float32, then truncated to bfloat16
    (for a non-negative number, dropping the low 16 bits rounds it down)."""
    target = values * factor
    single = target.astype(np.float32)
    single = np.where(single > target, np.nextafter(single, np.float32(0.0)), single)
    truncated = (single.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return torch.from_numpy(truncated).to(torch.bfloat16), truncated.astype(np.float64)


def _ceiling_keys(values: np.ndarray) -> np.ndarray:
    """The int16 bits of bfloat16 numbers at least ``values`` (float64, >= 0)."""
    single = values.astype(np.float32)
    single = np.where(single < values, np.nextafter(single, np.float32(np.inf)), single)
    bits = single.view(np.uint32).astype(np.int64)
    return np.minimum((bits + 0xFFFF) >> 16, 0x7F80).astype(np.int16)  # 0x7F80: +inf


class _LowPrecisionFilter:
    """Exact k-nearest-neighbour search whose candidates come from a bfloat16 product.

    faiss's exact search is one float32 product of the queries with the bank.
    Where the CPU multiplies bfloat16 in hardware the same product runs 4 to 8
    times as fast; its rounding is coarse (2^-8) but bounded, which is enough
    to rule out nearly every (query, bank vector) pair. The pairs it cannot rule
    out (on mpdd metal_plate 1.4 per query with a 1% bank, 2.0 with a 10%
    bank) get their distances exactly (:func:`pair_distances`), and the k
    nearest among them are the k nearest of the whole bank: the same distances
    and indices (ties by index) as a plain search computing every pair with
    :func:`pair_distances`.

    Both sides are centred on the bank's mean ``mu`` (float32) where that at
    least halves the bank's squared norms (else ``mu = 0``): the distances stay
    as they are, and the norms, to which the rounding is proportional, become
    as small as they can be. With ``x = q - mu`` and ``y = b - mu``, the
    product takes query rows ``[x, 1, c]`` and bank rows
    ``[-2 y, w, 1]``, rounded to bfloat16 (x from float32, y from float64 via
    float32: each entry within ``e = u_b + u + u_b u`` of itself), where
    ``c <= (1 - K) |x|^2`` and ``w <= (1 - K) |y|^2`` are bfloat16 numbers
    rounded down (exactly known). Under the model that
    :func:`~skpatchcore.utils._bf16.bf16_sums_in_float32` checks (exact
    products, float32 sums, one rounding to bfloat16), its entry ``M`` is within
    ``K (|x|^2 + |y|^2) + u' |M| + floor`` of ``c + w - 2 <x, y>``: rounding the
    entries costs ``(2 e + e^2) |x_i y_i|`` per term, twice, and the sum of
    d + 2 terms ``g = (d + 2) u / (1 - (d + 2) u)`` times their sizes; with
    ``sum |x_i y_i| <= (|x|^2 + |y|^2) / 2`` this is
    ``K = 1.01 (2 e + e^2 + g ((1 + e)^2 + 1))``; the final rounding is
    ``u' = u_b / (1 - u_b)`` of ``|M|``, and ``floor`` covers entries, products
    and sums below float32's normal range (flushed or not). As
    ``|q - b|^2 = (c + w - 2 <x, y>) + (|x|^2 - c) + (|y|^2 - w)`` and the
    last two terms are at least ``K |x|^2`` and ``K |y|^2``:

    - ``|q - b|^2 >= M - u' |M| - floor``, whatever the sizes: a lower bound
      that grows with ``M``, so a threshold on ``M`` alone decides;
    - ``|q - b|^2 <= M + u' |M| + floor + r_q + v_b`` with
      ``r_q = (1 + K) |x|^2 - c`` and ``v_b = (1 + K) |y|^2 - w`` (about 2 K
      of each squared norm).

    For each query, the upper bounds of k bank vectors with small ``M`` (the
    smallest int16 bits: for negative ``M`` that is not the smallest value,
    which only loosens the bound) bound its k-th smallest distance from above
    (``tau``). Every bank vector whose lower bound is below ``tau`` (widened by
    the exact pass's own float32 rounding, ``(d + 3) u`` of a distance) is a
    candidate: the int16 bits of ``M`` compare as its value does where it is
    non-negative, and every negative ``M`` is a candidate anyway. ``|x|^2`` comes from torch's float32
    norms of ``x`` in float32, taken within ``2 (d + 6) u`` of the exact value;
    ``|y|^2`` is worked out in float64.

    A query with more than ``_MOST_CANDIDATES * k`` candidates (say duplicated
    bank vectors) is searched by ``fallback`` (faiss, on the centred vectors)
    instead, as is one whose centred norm is beyond ``_LARGEST_ENTRY`` or not
    finite; their distances carry faiss's float32 rounding, not the exact
    pass's. A bank with such a norm, or of more than ``_MOST_DIMS``
    dimensions, is not ``usable``.
    """

    def __init__(self, bank: np.ndarray):
        n_vectors, n_dims = bank.shape
        u, unit = UNIT_ROUNDOFF, BF16_UNIT
        entry = unit + u + unit * u  # float32, then bfloat16
        terms = n_dims + 2
        sums = terms * u / (1.0 - terms * u)
        self.n_dims = n_dims
        self.bank = torch.from_numpy(bank)
        self.margin = 1.01 * (2 * entry + entry * entry + sums * ((1 + entry) ** 2 + 1))
        self.margin += 4 * TINY * math.sqrt(n_dims)  # |x_i| + |y_i| parts below the normal range
        self.margin += 4 * terms * 2.0**-53  # |y|^2 in float64
        self.value_margin = 1.01 * unit / (1.0 - unit)
        self.floor = 2 * TINY * (4 * math.sqrt(n_dims) + 4 * n_dims + 16)
        self.norm_margin = 2.02 * (n_dims + 6) * u
        self.exact_margin = 1.01 * (n_dims + 3) * u
        # Zero columns up to a multiple of 32 (exact; AMX's tiles take 32 bfloat16
        # entries: 1026 columns took 1.7x as long as 1056 on a 4,233-vector bank),
        # and rows up to a multiple of _BANK_ROWS whose entries are all _FAR: torch
        # makes a kernel for each new shape (~6 ms), and banks that differ by a few
        # vectors (the folds of the threshold calibration) then share one.
        self.width = -(-(n_dims + 2) // 32) * 32
        self.n_vectors = n_vectors
        padded = -(-max(1, n_vectors) // _BANK_ROWS) * _BANK_ROWS
        rows = torch.zeros((padded, self.width), dtype=torch.bfloat16)
        sq_norms = np.empty(n_vectors)
        block_rows = max(1, (1 << 19) // max(1, n_dims))
        with np.errstate(all="ignore"):  # (a bank out of range is found below)
            mean = bank.sum(axis=0, dtype=np.float64) / max(1, n_vectors)
            for start in range(0, n_vectors, block_rows):
                block = bank[start : start + block_rows]
                sq_norms[start : start + len(block)] = np.einsum("ij,ij->i", block, block, dtype=np.float64)
            # Centred only where that takes out half the squared norms or more (it
            # costs a pass over the queries; MPDD's features lose a fifth).
            centre = bool(mean @ mean >= sq_norms.sum() / max(1, n_vectors) / 2)
            mean = mean.astype(np.float32) if centre else None
            for start in range(0, n_vectors, block_rows):
                block = bank[start : start + block_rows]
                if centre:
                    block = block - mean.astype(np.float64)
                    sq_norms[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
                rows[start : start + len(block), :n_dims] = torch.from_numpy(block)
        self.mean = None if mean is None else torch.from_numpy(mean)
        self.usable = bool(
            n_vectors
            and n_dims <= _MOST_DIMS
            and np.isfinite(sq_norms).all()
            and sq_norms.max(initial=0.0) <= _LARGEST_ENTRY**2
        )
        if not self.usable:  # (NearestNeighborIndex then uses faiss alone)
            return
        rows[:n_vectors, :n_dims] *= -2.0  # exact in bfloat16
        rows[:n_vectors, n_dims], bank_terms = _rounded_down(sq_norms, 1.0 - self.margin)
        rows[:, n_dims + 1] = 1.0
        rows[n_vectors:, n_dims] = _FAR  # never a candidate, never among the k chosen
        self.rows = rows
        self.column = (1.0 + self.margin) * sq_norms - bank_terms  # v_b
        self._lock = threading.Lock()
        self._space = None

    def search(self, queries: np.ndarray, k: int, fallback) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and indices of the ``k`` nearest, (n, k) arrays;
        ``fallback(queries)`` searches the queries the filter leaves."""
        n_queries = len(queries)
        squared = np.empty((n_queries, k), dtype=np.float32)
        indices = np.empty((n_queries, k), dtype=np.int64)
        step = max(_FILTER_MIN_ROWS, _FILTER_ENTRIES // len(self.rows))  # (rows of the product)
        leftover = []
        with self._workspace(min(step, n_queries)) as space:
            for start in range(0, n_queries, step):
                block = torch.from_numpy(queries[start : start + step])
                centred = (
                    block
                    if self.mean is None
                    else torch.sub(block, self.mean, out=space.centred[: len(block)])
                )
                norms = torch.linalg.vector_norm(centred, dim=1).numpy().astype(np.float64)
                rows = np.arange(start, start + len(block))
                fit = norms <= _LARGEST_ENTRY  # (False for NaN)
                if not fit.all():  # those rows go to faiss; the rest of the block stays
                    leftover.append(rows[~fit])
                    if not fit.any():
                        continue
                    rows, norms = rows[fit], norms[fit]
                    keep = torch.from_numpy(fit)
                    block, centred = block[keep], centred[keep]
                done, block_squared, block_indices = self._block(block, centred, norms**2, k, space)
                squared[rows[done]], indices[rows[done]] = block_squared, block_indices
                if len(done) < len(rows):
                    leftover.append(np.setdiff1d(rows, rows[done]))
        if leftover:
            rows = np.concatenate(leftover)
            squared[rows], indices[rows] = fallback(queries[rows])
        return squared, indices

    @contextlib.contextmanager
    def _workspace(self, n_rows: int):
        """Buffers for blocks of up to ``n_rows`` queries: kept between calls (fresh
        ones cost their first touches, ~30% of a search on a 423-vector bank), or
        made for this call while another thread holds them."""
        if not self._lock.acquire(blocking=False):
            yield _Workspace(n_rows, len(self.rows), self.width, self.n_dims)
            return
        try:
            if self._space is None or self._space.n_rows < n_rows:
                self._space = None
                self._space = _Workspace(n_rows, len(self.rows), self.width, self.n_dims)
            yield self._space
        finally:
            self._lock.release()

    def _block(self, block: torch.Tensor, centred: torch.Tensor, sq_norms: np.ndarray, k: int, space):
        """One block of queries (and the same centred, with their squared norms):
        (the rows it settles, their squared distances, indices)."""
        n_dims, n_bank, n_rows = self.n_dims, len(self.rows), len(block)
        tiny_sums = n_dims * TINY
        low = np.maximum(sq_norms * (1.0 - self.norm_margin) - tiny_sums, 0.0)
        high = sq_norms * (1.0 + self.norm_margin) + tiny_sums
        left = space.left[:n_rows]
        left[:, :n_dims] = centred
        left[:, n_dims + 1], query_terms = _rounded_down(low, 1.0 - self.margin)
        torch.mm(left, self.rows.T, out=space.product[:n_rows])
        keys = space.product[:n_rows].view(torch.int16).numpy()  # the entries' bits

        # tau: the largest upper bound of k bank vectors with small entries.
        if k == 1:
            chosen = keys.argmin(axis=1)[:, None]
        else:  # (torch's topk on the bits: 2.5x as fast as numpy's argpartition)
            bits = space.product[:n_rows].view(torch.int16)
            chosen = torch.topk(bits, k, dim=1, largest=False, sorted=False).indices.numpy()
        values = bf16_bits_as_float32(np.take_along_axis(keys, chosen, axis=1)).astype(np.float64)
        row_terms = (1.0 + self.margin) * high - query_terms + self.floor
        upper = values + self.value_margin * np.abs(values) + self.column[chosen] + row_terms[:, None]
        tau = upper.max(axis=1)
        # Candidates: lower bound within tau, widened by the exact pass's rounding.
        exact = self.exact_margin
        limit = (tau * (1.0 + exact) + 2.0 * tiny_sums) / (1.0 - exact) + self.floor
        limit /= 1.0 - self.value_margin
        listed = space.listed[:n_rows]
        np.less_equal(keys, _ceiling_keys(np.maximum(limit, 0.0))[:, None], out=listed)
        most = _MOST_CANDIDATES * k
        if np.count_nonzero(listed) > most * n_rows:  # rows over the limit: not gathered
            over = np.count_nonzero(listed, axis=1) > most
            listed[over] = False
        rows_at, bank_at = np.divmod(np.flatnonzero(listed), n_bank)
        counts = np.bincount(rows_at, minlength=n_rows)
        keep = (counts >= k) & (counts <= most)
        if not keep.all():
            kept_pairs = keep[rows_at]
            rows_at, bank_at, counts = rows_at[kept_pairs], bank_at[kept_pairs], counts[keep]

        distances = torch.empty(len(rows_at), dtype=torch.float32)
        for start in range(0, len(rows_at), _PAIR_ROWS):  # pair_distances, in place
            stop = min(start + _PAIR_ROWS, len(rows_at))
            diff, vectors = space.pairs[:, : stop - start]
            torch.index_select(block, 0, torch.from_numpy(rows_at[start:stop]), out=diff)
            torch.index_select(self.bank, 0, torch.from_numpy(bank_at[start:stop]), out=vectors)
            torch.linalg.vecdot(diff.sub_(vectors), diff, out=distances[start:stop])
        distances = distances.numpy()
        first = np.cumsum(counts) - counts
        if k == 1:  # each row's smallest distance, the first (lowest index) of equals
            smallest = np.minimum.reduceat(distances, first) if len(first) else distances[:0]
            at = np.flatnonzero(distances == np.repeat(smallest, counts))
            picks = at[np.r_[True, rows_at[at[1:]] != rows_at[at[:-1]]]][:, None] if len(at) else at[:, None]
        else:
            order = np.lexsort((distances, rows_at))  # by row, then distance, then index
            picks = order[first[:, None] + np.arange(k)]
        return np.flatnonzero(keep), distances[picks], bank_at[picks]


class _Workspace:
    """The buffers of :meth:`_LowPrecisionFilter.search` for blocks of ``n_rows`` queries."""

    def __init__(self, n_rows: int, n_bank: int, width: int, n_dims: int):
        self.n_rows = n_rows
        # Normal tensors even when made under torch.inference_mode (a search in
        # export_onnx's check, say): the buffers are reused, and written in place,
        # by later searches outside it, which inference tensors refuse.
        with torch.inference_mode(False):
            self.left = torch.zeros((n_rows, width), dtype=torch.bfloat16)
            self.left[:, n_dims] = 1.0
            self.centred = torch.empty((n_rows, n_dims), dtype=torch.float32)
            self.product = torch.empty((n_rows, n_bank), dtype=torch.bfloat16)
            self.pairs = torch.empty((2, _PAIR_ROWS, n_dims), dtype=torch.float32)
        self.listed = np.empty((n_rows, n_bank), dtype=bool)


def _filter_wanted(n_vectors: int, n_dims: int) -> bool:
    """Whether exact CPU search uses :class:`_LowPrecisionFilter` (see ``_LOW_PRECISION``)."""
    if _LOW_PRECISION is not None:
        return bool(_LOW_PRECISION)
    return n_dims >= _FILTER_MIN_DIMS and n_vectors >= _FILTER_MIN_VECTORS and bf16_hardware()


class NearestNeighborIndex:
    """L2 k-nearest-neighbour search over a fixed bank, exact or approximate.

    Parameters
    ----------
    bank : ndarray of shape (n_vectors, n_features), float32
        The memory bank.
    device : torch.device
        ``cpu``: a faiss index of kind ``index`` (exact search: the bfloat16
        filter where the CPU has bfloat16 hardware and the vectors 512
        dimensions or more). ``cuda``: exact search,
        with a faiss GPU index when available, else torch on that device.
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
    backend : {"faiss-cpu", "bfloat16-filter", "faiss-gpu", "torch"}
        Where the search runs. ``"bfloat16-filter"`` (exact search on a CPU
        that multiplies bfloat16 in hardware, vectors of 512 dimensions or
        more; any length when ``_LOW_PRECISION`` is True): a bfloat16 product
        rules out nearly every pair, the rest get exact float32 distances (see
        :class:`_LowPrecisionFilter`); faiss takes the queries it leaves.
    """

    def __init__(self, bank: np.ndarray, device: torch.device, allow_tf32: bool = False, index="flat"):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        if self.bank.ndim != 2 or not len(self.bank):
            raise ValueError(f"The memory bank must be a non-empty 2-d array; got shape {self.bank.shape}.")
        self.device = torch.device(device)
        self.allow_tf32 = allow_tf32
        self.kind, options = check_index(index)
        self.options = {}
        self.backend = "faiss-cpu"
        self._torch_bank = None
        self._torch_norms = None
        self._filter = None
        self._index = None
        self._lock = threading.Lock()
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
        elif (
            self.kind == "flat"
            and _filter_wanted(*self.bank.shape)
            and (low := _LowPrecisionFilter(self.bank)).usable
        ):
            self._filter = low
            self.backend = "bfloat16-filter"
        else:
            self._index, self.options = _cpu_index(self.bank, self.kind, options)

    def __len__(self) -> int:
        return len(self.bank)

    def _faiss_flat(self):
        """faiss's exact index, made when the bfloat16 filter first leaves a query:
        of the bank centred as the filter centres it (faiss's float32 expansion
        |q|^2 + |b|^2 - 2 <q, b> loses digits with the norms)."""
        with self._lock:
            if self._index is None:
                mean = self._filter.mean
                centred = self.bank if mean is None else self.bank - mean.numpy()
                self._index, _ = _cpu_index(centred, "flat", {})
            return self._index

    def _faiss_left(self, queries: np.ndarray, k: int):
        """faiss's search of the queries the filter leaves, centred alike."""
        mean = self._filter.mean
        return self._faiss_flat().search(queries if mean is None else queries - mean.numpy(), k)

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
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"The number of neighbours k must be a positive int; got {k!r}.")
        k = min(k, len(self.bank))
        if self.backend != "torch":
            batch = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
            if self._filter is not None:
                squared, indices = self._filter.search(batch, k, lambda rows: self._faiss_left(rows, k))
            else:
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


class OutOfFoldIndex:
    """Exact search over a bank without some of its vectors (calibration's out-of-fold bank).

    Copying the rest of a large bank for each fold, and indexing the copy,
    held the bank up to three times at once. Here the vectors left in are
    searched ``_OUT_OF_FOLD_BLOCK`` at a time and the blocks' nearest merged; a
    bank of up to that many gets one block, the very search over a copy of
    the bank without the fold. :attr:`bank_tensor` and the indices that
    :meth:`search` returns refer to the same vectors (with several blocks,
    the whole bank).

    Parameters
    ----------
    bank : ndarray of shape (n_vectors, n_features), float32
        The memory bank.
    excluded : ndarray of shape (n_vectors,), bool
        The vectors left out.
    device : torch.device
        Where the search runs, as for :class:`NearestNeighborIndex`.
    allow_tf32 : bool
        As for :class:`NearestNeighborIndex`.
    """

    def __init__(self, bank: np.ndarray, excluded: np.ndarray, device: torch.device, allow_tf32: bool):
        self.bank, self.device, self.allow_tf32 = bank, torch.device(device), allow_tf32
        self.kept = np.flatnonzero(~excluded)
        self._single = None
        if len(self.kept) <= _OUT_OF_FOLD_BLOCK:
            self._single = NearestNeighborIndex(bank[self.kept], self.device, allow_tf32, "flat")
        self._bank_tensor = None

    @property
    def bank_tensor(self) -> torch.Tensor:
        if self._single is not None:
            return self._single.bank_tensor
        if self._bank_tensor is None:
            self._bank_tensor = torch.from_numpy(self.bank).to(self.device)
        return self._bank_tensor

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances and bank indices of the ``k`` nearest vectors left in."""
        if self._single is not None:
            return self._single.search(queries, k)
        distances, indices = [], []
        for start in range(0, len(self.kept), _OUT_OF_FOLD_BLOCK):
            rows = self.kept[start : start + _OUT_OF_FOLD_BLOCK]
            index = NearestNeighborIndex(self.bank[rows], self.device, self.allow_tf32, "flat")
            squared, found = index.search(queries, k)
            distances.append(squared)
            indices.append(torch.from_numpy(rows).to(found.device)[found])
        squared, order = torch.cat(distances, dim=1).topk(min(k, len(self.kept)), dim=1, largest=False)
        return squared, torch.cat(indices, dim=1).gather(1, order)
