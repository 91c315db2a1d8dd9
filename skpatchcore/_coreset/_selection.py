"""One greedy selection as the sampler runs it, and the candidates it runs on.

- :func:`select`: project the vectors, then run the greedy loop on the device
  (the exact engine on the CPU, the plain loop on CUDA), from random start
  points or from centres already selected.
- :class:`Selector`: the selections of one streamed fit (the projection, the
  seed of each chunk's and each pool's start points, the device), picklable so
  Dask workers run the chunks' selections.
- :class:`Candidates`: the patch vectors of the good images of an ``X``,
  whole or chunk by chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from ..utils._buffers import empty_buffer
from ..utils._device import as_tensor, cpu_float32, float32_precision, resolve_device
from ._exact import greedy_indices_cpu
from ._plain import greedy_indices_torch


def draw_projection(rng: np.random.RandomState, n_features: int, projection_dim: int):
    """The Gaussian map to ``projection_dim`` dimensions (float32), or None when the
    features have no more dimensions than that. The first draw of ``rng``."""
    if n_features <= projection_dim:
        return None
    projection = rng.standard_normal((n_features, projection_dim)).astype(np.float32)
    projection /= np.sqrt(projection_dim)
    return projection


def project(vectors: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``vectors @ projection`` on the CPU, in float32, into a new (n, k) array.

    The product runs in torch, like the loop's own products: NumPy's BLAS
    threads keep spinning for a while after a product, and that slowed the
    loop right after it by 30-50% on 2 cores.
    """
    points = empty_buffer((len(vectors), projection.shape[1]))
    with torch.inference_mode(), cpu_float32():
        torch.mm(as_tensor(vectors), torch.from_numpy(projection), out=torch.from_numpy(points))
    return points


def select(vectors, n_select, projection, device, progress=None, *, starts=None, centres=None) -> np.ndarray:
    """Indices of ``n_select`` of ``vectors``, in the order the greedy loop picks them.

    The vectors (and ``centres``) are projected with ``projection`` (None: as
    they are); the running distances start from the points ``starts`` (indices)
    or, given ``centres`` (vectors already selected), from each point's
    distance to the nearest centre.
    """
    if device.type == "cpu":
        points = np.ascontiguousarray(vectors) if projection is None else project(vectors, projection)
        if centres is not None and projection is not None:
            centres = project(centres, projection)
        return greedy_indices_cpu(points, n_select, starts, progress, centres=centres)
    with torch.inference_mode(), float32_precision():  # no TF32: the CPU's selection
        map_ = None if projection is None else torch.from_numpy(projection).to(device)

        def on_device(array):
            tensor = as_tensor(np.ascontiguousarray(array)).to(device)
            return tensor if map_ is None else tensor @ map_

        points = on_device(vectors)
        if centres is not None:
            centres = on_device(centres)
        if starts is not None:
            starts = torch.from_numpy(starts).to(device)
        return greedy_indices_torch(points, n_select, starts, progress, centres=centres)


class Selector:
    """The fresh selections of one streamed fit: ``selector(vectors, n_select, key)``.

    Each call draws its ``n_starts`` start points from its own generator,
    seeded by ``entropy`` and ``key`` (``("chunk", k)`` or ``("pool", k)``),
    so a chunk's coreset is the same wherever and in whatever order it is
    computed. Small and picklable: it is what a Dask worker receives.
    """

    _STAGES = {"chunk": 0, "pool": 1}

    def __init__(self, projection, n_starts: int, entropy: int, device):
        self.projection, self.n_starts, self.entropy, self.device = projection, n_starts, entropy, device

    def __call__(self, vectors: np.ndarray, n_select: int, key: tuple, progress=None) -> np.ndarray:
        stage, index = key
        seed = np.random.SeedSequence(self.entropy, spawn_key=(self._STAGES[stage], index))
        rng = np.random.RandomState(seed.generate_state(1)[0])
        starts = rng.choice(len(vectors), size=min(self.n_starts, len(vectors)), replace=False)
        device = resolve_device(self.device)
        return select(vectors, n_select, self.projection, device, progress, starts=starts)


class Candidates:
    """The patch vectors of ``X``'s good images (all of them without labels).

    ``X`` is (n_images, ..., d); ``good`` a boolean mask of the good images or
    None. Positions count every vector of ``X`` (defective images' too), in
    ``X.reshape(-1, d)`` order.
    """

    def __init__(self, X: np.ndarray, good):
        self.X, self.n_features = X, X.shape[-1]
        self.per_image = int(np.prod(X.shape[1:-1])) if X.ndim > 2 else 1
        self.images = np.arange(len(X)) if good is None else np.flatnonzero(good)
        self.contiguous = good is None
        self.n = len(self.images) * self.per_image
        self.n_vectors = len(X) * self.per_image

    def take(self, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The vectors (n, d) of the good images ``first:stop`` and their positions.

        Without labels a view of ``X`` (no copy)."""
        images = self.images[first:stop]
        if self.contiguous:
            vectors = self.X.reshape(-1, self.n_features)[first * self.per_image : stop * self.per_image]
        else:
            vectors = self.X[images].reshape(-1, self.n_features)
        positions = (images[:, None] * self.per_image + np.arange(self.per_image)).ravel()
        return vectors, positions

    def chunk_images(self, chunk_size: int) -> int:
        """Good images per chunk: as many as ``chunk_size`` vectors hold, at least one."""
        return max(1, chunk_size // self.per_image)

    def chunks(self, chunk_size: int):
        """``(start, stop, vectors, positions)`` of each chunk of whole images, in order;
        ``start:stop`` are its candidates' numbers (0 to ``n``)."""
        step = self.chunk_images(chunk_size)
        for first in range(0, len(self.images), step):
            vectors, positions = self.take(first, first + step)
            start = first * self.per_image
            yield start, start + len(vectors), vectors, positions
