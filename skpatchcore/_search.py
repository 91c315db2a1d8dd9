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

from .utils._device import cuda_precision

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
    allow_tf32 : bool, default=False
        Let the torch backend's matrix products use TensorFloat-32.
    """

    def __init__(self, bank: np.ndarray, device: torch.device, allow_tf32: bool = False):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.device = torch.device(device)
        self.allow_tf32 = allow_tf32
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

    @property
    def bank_tensor(self) -> torch.Tensor:
        """The bank as a tensor on the search device (shares memory on the CPU)."""
        return self._torch_bank if self._torch_bank is not None else torch.from_numpy(self.bank)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances and bank indices of the ``k`` nearest, (n, k) tensors.

        ``queries`` is a float32 tensor; results come back on the same device as
        the queries when the torch backend runs, else on the CPU.
        """
        k = min(k, len(self.bank))
        if self.backend != "torch":
            batch = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
            squared, indices = self._index.search(batch, k)
            return torch.from_numpy(np.maximum(squared, 0.0, out=squared)), torch.from_numpy(indices)
        queries = queries.to(self.device, dtype=torch.float32)
        squared, indices = [], []
        with torch.inference_mode(), cuda_precision(self.allow_tf32):
            for block in queries.split(_TORCH_QUERY_CHUNK):
                dist = torch.einsum("ij,ij->i", block, block)[:, None] + self._torch_norms[None, :]
                dist.addmm_(block, self._torch_bank.T, alpha=-2.0)
                values, positions = torch.topk(dist, k, dim=1, largest=False, sorted=True)
                squared.append(values.clamp_min_(0.0))
                indices.append(positions)
        return torch.cat(squared), torch.cat(indices)
