"""k-nearest-neighbour distance to the trusted activations, by blocked matrix products.

Owns the kNN detector: a float32 bank of trusted vectors and a running top-k over blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from madlens.detectors.backend import is_tensor, rowdot, sqrt
from madlens.detectors.base import BOOLEAN, ActivationDetector, chunks, integer, progress
from madlens.errors import MadlensError

__all__ = ["KNN"]

QUERY_BLOCK = 1024
TRUSTED_BLOCK = 16384


def _normalize(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.maximum(norms, 1e-12, out=norms)
    return np.divide(x, norms, out=x if inplace else None)


def _normalize_tensor(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


class KNN(ActivationDetector):
    """Distance to the k-th nearest trusted activation.

    Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors": the distance
    from u = x / |x| to its k-th nearest normalised trusted vector. Since
    |q - b|^2 = |q|^2 - 2 (q.b - |b|^2 / 2), the k-th neighbour has the k-th largest
    q.b - |b|^2 / 2; it is found from (query block x trusted block) products and a running
    top-k, which keeps memory bounded and the BLAS busy.

    Parameters: `k` (default 50, as pytorch-ood); `normalize` (True: cosine geometry, the
    distance between L2-normalised vectors; False: plain Euclidean); `aggregation`.
    Learned: `bank_`, the (normalised) trusted activations as float32, and, without
    normalisation, `half_sq_norms_` (|b|^2 / 2).
    The work is (n_test x n_trusted x d) multiply-adds in float32 on all CPU threads, or on
    the device of torch tensors (the bank is then kept there too, beside `bank_`).
    """

    name = "knn"
    param_rules = {"k": integer(1), "normalize": BOOLEAN}
    reference = "Sun et al. 2022, Out-of-Distribution Detection with Deep Nearest Neighbors"
    tensor_inputs = True

    def __init__(self, k: int = 50, normalize: bool = True, aggregation: str = "mean") -> None:
        super().__init__(aggregation=aggregation)
        self.k = k
        self.normalize = normalize

    @classmethod
    def defaults_for(cls, n_trusted: int) -> dict[str, Any]:
        """k = 50 as published (for many thousands of trusted vectors), shrunk to a tenth of a
        small trusted set so that it stays a local statistic."""
        return {"k": max(1, min(50, n_trusted // 10))}

    def _fit(self, trusted: Any, untrusted: Any) -> None:
        if self.k > len(trusted):
            raise MadlensError(f"k={self.k} exceeds the {len(trusted)} trusted examples")
        if is_tensor(trusted):
            bank = trusted.to(torch.float32)
            if self.normalize:
                bank = _normalize_tensor(bank).contiguous()  # a new tensor: never the caller's
            else:
                bank = bank.clone(memory_format=torch.contiguous_format)
                self.half_sq_norms_ = (0.5 * rowdot(bank)).cpu().numpy()
            self._set_learned("bank_", bank)
            return
        bank = np.array(trusted, dtype=np.float32, order="C")  # a copy, never the caller's
        if self.normalize:
            _normalize(bank, inplace=True)
        else:
            self.half_sq_norms_ = 0.5 * np.einsum("ij,ij->i", bank, bank, dtype=np.float64)
        self.bank_ = bank

    def _score(self, x: Any) -> Any:
        return self._kth_distance(x, self.k)

    def _trusted_scores(self, trusted_sample: Any) -> Any:
        # Trusted rows are in the bank: skip each one's match with itself.
        return self._kth_distance(trusted_sample, min(self.k + 1, len(self.bank_)))

    def _kth_distance(self, x: Any, k: int) -> Any:
        if is_tensor(x):
            query = x.to(torch.float32)
            if self.normalize:
                query = _normalize_tensor(query)
        else:
            query = x.astype(np.float32, copy=False)
            if self.normalize:
                query = _normalize(query)
        sq_query = rowdot(query)
        kth = self._kth_largest_affinity(query, k)
        # |q - b|^2 = |q|^2 - 2 (q.b - |b|^2 / 2)
        squared = sq_query - 2.0 * kth
        return sqrt(squared.clip(0.0) if is_tensor(squared) else np.maximum(squared, 0.0))

    def _kth_largest_affinity(self, query: Any, k: int) -> Any:
        """k-th largest of q.b - |b|^2/2 over the bank, per query row (numpy for numpy
        queries; a float64 tensor on the query's device for tensor queries)."""
        as_tensor = is_tensor(query)
        if not as_tensor:
            query = torch.from_numpy(np.ascontiguousarray(query))
        ref = query if as_tensor else self.bank_
        bank = torch.as_tensor(self._learned("bank_", ref))
        offset = None
        if not self.normalize:
            offset = torch.as_tensor(self._learned("half_sq_norms_", ref)).to(torch.float32)
        n_bank = len(bank)
        out = torch.empty(len(query), dtype=torch.float64, device=query.device)
        buffer = torch.empty(QUERY_BLOCK, min(TRUSTED_BLOCK, n_bank), device=query.device)
        starts = chunks(len(query), QUERY_BLOCK)
        with torch.inference_mode():
            for start in progress(starts, len(starts), "knn"):
                q = query[start : start + QUERY_BLOCK]
                best = None
                for b0 in range(0, n_bank, TRUSTED_BLOCK):
                    block = bank[b0 : b0 + TRUSTED_BLOCK]
                    sims = buffer[: len(q), : len(block)]
                    torch.mm(q, block.T, out=sims)
                    if offset is not None:
                        sims -= offset[b0 : b0 + TRUSTED_BLOCK]
                    top = torch.topk(sims, min(k, len(block)), dim=1, sorted=False).values
                    best = top if best is None else torch.cat([best, top], dim=1)
                    if best.shape[1] > k:
                        best = torch.topk(best, k, dim=1, sorted=False).values
                out[start : start + len(q)] = best.min(dim=1).values.double()
        if self.normalize:  # unit bank vectors: |b|^2 / 2 = 1/2 for all, subtracted once here
            out -= 0.5
        return out if as_tensor else out.numpy()
