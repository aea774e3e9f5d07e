"""Gaussian model of trusted activations: streaming moments, shrinkage, Mahalanobis distance.

`StreamingMoments` and the shrunk covariance are shared by every detector that whitens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from madlens.detectors.backend import (
    device_of,
    eigh,
    f64,
    is_tensor,
    rowdot,
    to_device,
    to_numpy,
)
from madlens.detectors.base import (
    BOOLEAN,
    ActivationDetector,
    as_rows,
    chunks,
    progress,
    to_float,
)
from madlens.errors import MadlensError

__all__ = [
    "Mahalanobis",
    "eigh",  # from backend, kept here for its importers
    "StreamingMoments",
    "ledoit_wolf_shrinkage",
    "shrunk_covariance",
    "whitening_matrix",
]

# Rows per chunk when streaming over an array: bounds the float32 copy of a float16 chunk.
CHUNK_ROWS = 8192
# Eigenvalues below this fraction of the largest are floored there (a rank-deficient covariance
# with no shrinkage), so that every direction keeps a finite, large weight.
EIGEN_FLOOR = 1e-9


class StreamingMoments:
    """Mean and covariance of rows seen in batches, exact for any batch split.

    Sums are taken about a shift (the first batch's mean) to avoid cancellation when the mean
    is large compared with the spread, as it is on some residual-stream dimensions. Besides the
    second moments it keeps the fourth-moment sums Ledoit-Wolf shrinkage needs. Each batch's
    Gram matrix is computed in the batch's precision (float32 for float32 or float16 input) and
    accumulated in float64.

    The first batch picks where the sums live: a torch tensor's device (they are then float64
    tensors there, and later numpy batches are copied to it) or numpy. What the moments give
    (`mean`, `covariance`, ...) is numpy either way.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: Any = None  # numpy, or a tensor on `device`
        self._sum: Any = None  # sum y,  y = x - shift
        self._gram: Any = None  # sum y y^T
        self._sq: Any = 0.0  # sum |y|^2
        self._cube: Any = None  # sum |y|^2 y
        self._quartic: Any = 0.0  # sum |y|^4
        self._device: torch.device | None = None
        self._host: tuple | None = None  # the sums as numpy, for sums kept on a device

    @property
    def n_features(self) -> int:
        if self.shift is None:
            raise MadlensError("no rows seen yet")
        return len(self.shift)

    @property
    def device(self) -> torch.device | None:
        """The device the sums live on, or None for numpy."""
        return self._device

    def update(self, batch: Any, chunk_rows: int = CHUNK_ROWS) -> StreamingMoments:
        """Add the rows of an `n x d` array or tensor, converted chunk by chunk (float16 ->
        float32)."""
        raw = as_rows(batch, "trusted batch", convert=False)
        d = raw.shape[1]
        if self.shift is not None and d != len(self.shift):
            raise MadlensError(f"batch has {d} features, earlier ones {len(self.shift)}")
        if self.shift is None:
            self._device = device_of(raw)
        self._host = None
        starts = chunks(len(raw), chunk_rows)
        scratch = None  # one buffer for the augmented chunk, reused: no page faults per chunk
        for start in progress(starts, len(starts), "moments"):
            chunk = raw[start : start + chunk_rows]
            if self._device is not None:
                self._add_tensor(to_float(to_device(chunk, self._device)))
                continue
            x = to_float(np.asarray(to_numpy(chunk)))
            if scratch is None or scratch.dtype != x.dtype:
                scratch = np.empty((min(chunk_rows, len(raw)), d + 2), dtype=x.dtype)
            self._add(x, scratch[: len(x)])
        # NaN / inf anywhere in the input reaches the sums; checking them is free
        _, total, _, _, _, quartic = self._sums()
        if not (np.isfinite(total).all() and np.isfinite(quartic)):
            raise MadlensError("trusted activations contain NaN or infinite values")
        return self

    def _add(self, x: np.ndarray, scratch: np.ndarray) -> None:
        """One chunk. With y = x - shift and q = |y|^2, the Gram matrix of the augmented rows
        [y, 1, q] holds every sum at once: sum y y^T, sum y, sum q y, n, sum q, sum q^2."""
        d = x.shape[1]
        if self.shift is None:
            self.shift = x.mean(0, dtype=np.float64)
            self._sum = np.zeros(d)
            self._gram = np.zeros((d, d))
            self._cube = np.zeros(d)
        y = scratch[:, :d]
        np.subtract(x, self.shift.astype(x.dtype), out=y)
        scratch[:, d] = 1.0
        scratch[:, d + 1] = np.einsum("ij,ij->i", y, y)
        rows = torch.from_numpy(scratch)
        gram = (rows.T @ rows).numpy().astype(np.float64)  # torch's BLAS: ~2x numpy's here
        self.n += len(x)
        self._gram += gram[:d, :d]
        self._sum += gram[d, :d]
        self._cube += gram[d + 1, :d]
        self._sq += float(gram[d, d + 1])
        self._quartic += float(gram[d + 1, d + 1])

    def _add_tensor(self, x: torch.Tensor) -> None:
        """`_add` on the device: the same augmented Gram matrix, in x's precision."""
        d = x.shape[1]
        if self.shift is None:
            self.shift = x.mean(0, dtype=torch.float64)
            zeros = {"dtype": torch.float64, "device": x.device}
            self._sum, self._cube = torch.zeros(d, **zeros), torch.zeros(d, **zeros)
            self._gram = torch.zeros(d, d, **zeros)
            self._sq, self._quartic = torch.zeros((), **zeros), torch.zeros((), **zeros)
        y = x - self.shift.to(x.dtype)
        ones = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)
        rows = torch.cat([y, ones, (y * y).sum(1, keepdim=True)], dim=1)
        gram = (rows.T @ rows).to(torch.float64)
        self.n += len(x)
        self._gram += gram[:d, :d]
        self._sum += gram[d, :d]
        self._cube += gram[d + 1, :d]
        self._sq += gram[d, d + 1]
        self._quartic += gram[d + 1, d + 1]

    def _sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray, float]:
        """(shift, sum y, sum y y^T, sum |y|^2, sum |y|^2 y, sum |y|^4) on the host."""
        sums = (self.shift, self._sum, self._gram, self._sq, self._cube, self._quartic)
        if self._device is None:
            return sums  # type: ignore[return-value]
        if self._host is None:
            shift, total, gram, sq, cube, quartic = (to_numpy(v) for v in sums)
            self._host = (shift, total, gram, float(sq), cube, float(quartic))
        return self._host

    @property
    def mean(self) -> np.ndarray:
        self._check()
        shift, total = self._sums()[:2]
        return shift + total / self.n

    def covariance(self, ddof: int = 0) -> np.ndarray:
        """Sample covariance, dividing by `n - ddof` (ddof=0: maximum likelihood)."""
        self._check()
        if self.n - ddof <= 0:
            raise MadlensError(f"need more than {ddof} rows for a covariance")
        _, total, gram = self._sums()[:3]
        delta = total / self.n
        scatter = gram - self.n * np.outer(delta, delta)
        scatter = (scatter + scatter.T) / 2.0
        return scatter / (self.n - ddof)

    def second_moment(self) -> np.ndarray:
        """E[x x^T] about the origin (the uncentred covariance)."""
        mean = self.mean
        return self.covariance() + np.outer(mean, mean)

    def centered_quartic_sum(self) -> float:
        """sum_k |x_k - mean|^4, expanded about the shift: with d = mean - shift,
        |y - d|^4 summed = Q4 + 4 d^T G d - 4 d^T C3 + 2 |d|^2 S2 - 3 n |d|^4."""
        self._check()
        _, total, gram, sq, cube, quartic = self._sums()
        d = total / self.n
        dd = float(d @ d)
        total = (
            quartic
            + 4.0 * float(d @ gram @ d)
            - 4.0 * float(d @ cube)
            + 2.0 * dd * sq
            - 3.0 * self.n * dd * dd
        )
        return max(total, 0.0)

    def _check(self) -> None:
        if self.n == 0:
            raise MadlensError("no rows seen yet")


def ledoit_wolf_shrinkage(moments: StreamingMoments) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity, as sklearn.covariance.ledoit_wolf computes it.

    With S the ML covariance, m = tr(S)/p:  delta = |S - m I|_F^2 / p,
    beta = min(delta, (sum_k |x_k - mu|^4 / n - |S|_F^2) / (n p)),  shrinkage = beta / delta.
    """
    n, p = moments.n, moments.n_features
    cov = moments.covariance()
    m = float(np.trace(cov)) / p
    frob = float((cov * cov).sum())
    delta = (frob - 2.0 * m * float(np.trace(cov)) + p * m * m) / p
    beta = (moments.centered_quartic_sum() / n - frob) / (n * p)
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else beta / delta


def shrunk_covariance(
    moments: StreamingMoments, shrinkage: str | float | None
) -> tuple[np.ndarray, float]:
    """(1 - s) S + s (tr(S)/p) I with s from Ledoit-Wolf ("ledoit-wolf"), a fixed float in
    [0, 1], or 0 (None). Returns the covariance and s."""
    cov = moments.covariance()
    if shrinkage is None:
        s = 0.0
    elif shrinkage == "ledoit-wolf":
        s = ledoit_wolf_shrinkage(moments)
    elif isinstance(shrinkage, int | float) and not isinstance(shrinkage, bool):
        s = float(shrinkage)
        if not 0.0 <= s <= 1.0:
            raise MadlensError(f"shrinkage must be in [0, 1], got {shrinkage}")
    else:
        raise MadlensError(f"shrinkage must be 'ledoit-wolf', a float or None, got {shrinkage!r}")
    if s > 0:
        mu = float(np.trace(cov)) / len(cov)
        cov = (1.0 - s) * cov
        cov[np.diag_indices_from(cov)] += s * mu
    return cov, s


def whitening_matrix(cov: Any) -> np.ndarray:
    """W with W^T cov W = I (PCA whitening): |(x - mu) W|^2 is the Mahalanobis distance.

    `cov` is numpy or a tensor (decomposed on its device, see `eigh`); W is numpy."""
    eigvals, eigvecs = eigh(cov)
    top = max(float(eigvals[-1]), np.finfo(np.float64).tiny)
    eigvals = np.maximum(eigvals, EIGEN_FLOOR * top)
    return eigvecs / np.sqrt(eigvals)


def moments_of(x: Any) -> StreamingMoments:
    return StreamingMoments().update(x)


def squared_norms(x: Any, location: Any, projection: Any) -> Any:
    """|(x - location) @ projection|^2 per row, chunk by chunk, summed in float64.

    The product runs in x's precision: float32 activations get float32 BLAS (their own
    precision), float64 ones float64. A tensor `x` (with `location` and `projection` on its
    device) gives a float64 tensor there.
    """
    if is_tensor(x):
        location, projection = location.to(x.dtype), projection.to(x.dtype)
        out = torch.empty(len(x), dtype=torch.float64, device=x.device)
        for start in chunks(len(x), CHUNK_ROWS):
            z = (x[start : start + CHUNK_ROWS] - location) @ projection
            out[start : start + CHUNK_ROWS] = rowdot(z)
        return out
    location = location.astype(x.dtype, copy=False)
    projection = projection.astype(x.dtype, copy=False)
    out = np.empty(len(x))
    for start in chunks(len(x), CHUNK_ROWS):
        z = (x[start : start + CHUNK_ROWS] - location) @ projection
        out[start : start + CHUNK_ROWS] = np.einsum("ij,ij->i", z, z, dtype=np.float64)
    return out


class Mahalanobis(ActivationDetector):
    """Squared Mahalanobis distance to the trusted Gaussian.

    score(x) = (x - mu)^T Sigma^-1 (x - mu), mu and Sigma the trusted mean and (shrunk)
    covariance (Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
    Samples and Adversarial Attacks"). With `relative=True` the diagonal-covariance distance is
    subtracted, score(x) - sum_i (x_i - mu_i)^2 / Sigma_ii, so that only correlation structure
    counts (cupbearer's simplification of Ren et al. 2021, "A Simple Fix to Mahalanobis
    Distance").

    Parameters: `shrinkage` "ledoit-wolf" (default), a float in [0, 1] (Sigma = (1-s) S + s m I),
    or None (the ML covariance S); `relative`; `aggregation` over hooks.
    Learned: `location_`, `covariance_` (shrunk), `precision_`, `shrinkage_`, `n_samples_`.
    `fit` also takes an iterable of batches (arrays or dicts of hooks) for trusted sets larger
    than memory; an array (e.g. a float16 memmap) is itself read in chunks.
    """

    name = "mahalanobis"
    param_rules = {"relative": BOOLEAN}
    reference = "Lee et al. 2018, A Simple Unified Framework for Detecting OOD Samples"
    streaming = True
    tensor_inputs = True

    def __init__(
        self,
        shrinkage: str | float | None = "ledoit-wolf",
        relative: bool = False,
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.shrinkage = shrinkage
        self.relative = relative

    def _fit(self, trusted: Any, untrusted: Any) -> None:
        self._fit_moments(moments_of(trusted))

    def _fit_moments(self, moments: StreamingMoments) -> None:
        cov, s = shrunk_covariance(moments, self.shrinkage)
        self.location_ = moments.mean
        self.covariance_ = cov
        self.shrinkage_ = s
        self.n_samples_ = moments.n
        self.whitening_ = whitening_matrix(to_device(cov, moments.device))
        self.precision_ = self.whitening_ @ self.whitening_.T
        if self.relative:
            self.diag_precision_ = 1.0 / np.maximum(np.diag(cov), EIGEN_FLOOR * np.diag(cov).max())

    def _score(self, x: Any) -> Any:
        location = self._learned("location_", x)
        scores = squared_norms(x, location, self._learned("whitening_", x))
        if self.relative:
            diag_precision = self._learned("diag_precision_", x)
            for start in chunks(len(x), CHUNK_ROWS):
                delta = f64(x[start : start + CHUNK_ROWS]) - location
                scores[start : start + CHUNK_ROWS] -= (delta * delta) @ diag_precision
        return scores
