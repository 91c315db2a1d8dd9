"""Nearest-neighbour search over the memory bank.

:class:`NearestNeighborIndex` hides where the search runs: faiss on the CPU
(exact ``IndexFlatL2``; BLAS on every core), faiss on the GPU when faiss-gpu is
importable, otherwise plain torch matrix products on the CUDA device. It is
built from a NumPy bank and never pickled: estimators keep the bank and
rebuild the index after loading.
"""

from __future__ import annotations

import numpy as np
import torch

# Queries per torch search step on CUDA: bounds the (queries x bank) distance block.
_TORCH_QUERY_CHUNK = 8192


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


class NearestNeighborIndex:
    """Exact L2 k-nearest-neighbour search over a fixed bank.

    Parameters
    ----------
    bank : ndarray of shape (n_vectors, n_features), float32
        The memory bank.
    device : torch.device
        ``cpu``: faiss ``IndexFlatL2``. ``cuda``: a faiss GPU index when
        available, else torch on that device.
    """

    def __init__(self, bank: np.ndarray, device: torch.device):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.device = torch.device(device)
        self.backend = "faiss-cpu"
        self._torch_bank = None
        self._torch_norms = None
        if self.device.type == "cuda":
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
            self._index = _faiss().IndexFlatL2(self.bank.shape[1])
            self._index.add(self.bank)

    def __len__(self) -> int:
        return len(self.bank)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and bank indices of the ``k`` nearest, shape (n, k) each."""
        k = min(k, len(self.bank))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.backend != "torch":
            squared, indices = self._index.search(queries, k)
            return np.maximum(squared, 0.0, out=squared), indices
        squared = np.empty((len(queries), k), dtype=np.float32)
        indices = np.empty((len(queries), k), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(queries), _TORCH_QUERY_CHUNK):
                block = torch.from_numpy(queries[start : start + _TORCH_QUERY_CHUNK]).to(self.device)
                dist = torch.einsum("ij,ij->i", block, block)[:, None] + self._torch_norms[None, :]
                dist.addmm_(block, self._torch_bank.T, alpha=-2.0)
                values, positions = torch.topk(dist, k, dim=1, largest=False, sorted=True)
                squared[start : start + len(block)] = values.clamp_min_(0.0).cpu().numpy()
                indices[start : start + len(block)] = positions.cpu().numpy()
        return squared, indices
