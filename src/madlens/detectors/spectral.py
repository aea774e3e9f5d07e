"""Spectral detectors: QUE and spectral signatures (which read the untrusted batch), PCA residual.

All three project with eigenvectors of a covariance, after centring on the trusted mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from madlens.detectors.backend import f64, like, sqrt, to_device
from madlens.detectors.base import BOOLEAN, ActivationDetector, real
from madlens.detectors.gaussian import (
    StreamingMoments,
    eigh,
    moments_of,
    shrunk_covariance,
    squared_norms,
    whitening_matrix,
)
from madlens.errors import MadlensError

__all__ = ["QUE", "PCAResidual", "SpectralSignature"]


def _whitened_untrusted(
    trusted: Any, untrusted: Any, shrinkage: str | float | None, whiten: bool = True
) -> tuple[np.ndarray, np.ndarray, Any]:
    """(trusted mean, whitening matrix W, centred whitened untrusted rows); the rows are a
    tensor on the untrusted tensor's device, or numpy."""
    moments = moments_of(trusted)
    location = moments.mean
    if whiten:
        cov, _ = shrunk_covariance(moments, shrinkage)
        w = whitening_matrix(to_device(cov, moments.device))
    else:
        w = np.eye(moments.n_features)
    z = (f64(untrusted) - like(location, untrusted)) @ like(w, untrusted)
    return location, w, z - z.mean(0)


class QUE(ActivationDetector):
    """Quantum-entropy outlier score of whitened activations, tuned on the untrusted batch.

    Dong, Hopkins & Li 2019, "Quantum Entropy Scoring for Fast Robust Mean Estimation and
    Improved Outlier Detection" (used for MAD by cupbearer): whiten with the trusted mean and
    covariance, let S_u be the covariance of the whitened untrusted batch, and score
        tau(x) = z^T Q z,  z = W^T (x - mu),  Q = exp(alpha (S_u - I) / (|S_u|_2 - 1)) / tr(.)
    Large alpha weighs the top untrusted direction only (spectral signatures); alpha -> 0 gives
    |z|^2 / d, the Mahalanobis distance over d.

    `fit(trusted, untrusted)` needs the untrusted batch (to score a new batch transductively,
    fit on it: `QUE().fit(trusted, batch).score(batch)`). Parameters: `alpha` (4, as in the
    paper), `shrinkage` of the trusted covariance, `aggregation`.
    Learned: `location_`, `projection_` (score = |(x - mu) projection_|^2 = z^T Q z),
    `untrusted_top_eigenvalue_` (|Sigma_u|_2; 1 means no excess variance in any direction, and
    then Q = I / d).
    """

    name = "que"
    param_rules = {"alpha": real(0, strict=False)}
    reference = "Dong, Hopkins & Li 2019, Quantum Entropy Scoring"
    uses_untrusted = True
    tensor_inputs = True

    def __init__(
        self,
        alpha: float = 4.0,
        shrinkage: str | float | None = "ledoit-wolf",
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.alpha = alpha
        self.shrinkage = shrinkage

    def _fit(self, trusted: Any, untrusted: Any) -> None:
        location, w, z = _whitened_untrusted(trusted, untrusted, self.shrinkage)
        eigvals, eigvecs = eigh(z.T @ z / len(z))
        top = float(eigvals[-1])
        if top > 1.0 + 1e-12:
            # exp(alpha (l - 1) / (top - 1)), divided by its largest value to stay finite
            weights = np.exp(self.alpha * ((eigvals - 1.0) / (top - 1.0) - 1.0))
        else:
            weights = np.ones_like(eigvals)
        weights /= weights.sum()
        self.location_ = location
        self.projection_ = (w @ eigvecs) * np.sqrt(weights)
        self.untrusted_top_eigenvalue_ = top

    def _score(self, x: Any) -> Any:
        return squared_norms(x, self._learned("location_", x), self._learned("projection_", x))


class SpectralSignature(ActivationDetector):
    """Squared projection on the top singular direction of the untrusted activations.

    Tran, Li & Madry 2018, "Spectral Signatures in Backdoor Attacks": v is the top right
    singular vector of the centred untrusted activations; score = ((x - mu) . v)^2.

    Activations are centred on the trusted mean and, with `whiten=True` (default), whitened by
    the trusted covariance, so the direction found is the one where the untrusted batch varies
    most beyond normal variation; `whiten=False` is Tran et al.'s raw-space version.
    `fit(trusted, untrusted)` needs the untrusted batch. Learned: `location_`, `direction_`
    (score = ((x - mu) . direction_)^2).
    """

    name = "spectral"
    param_rules = {"whiten": BOOLEAN}
    reference = "Tran, Li & Madry 2018, Spectral Signatures in Backdoor Attacks"
    uses_untrusted = True
    tensor_inputs = True

    def __init__(
        self,
        whiten: bool = True,
        shrinkage: str | float | None = "ledoit-wolf",
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.whiten = whiten
        self.shrinkage = shrinkage

    def _fit(self, trusted: Any, untrusted: Any) -> None:
        location, w, z = _whitened_untrusted(trusted, untrusted, self.shrinkage, self.whiten)
        _, eigvecs = eigh(z.T @ z)
        self.location_ = location
        self.direction_ = w @ eigvecs[:, -1]

    def _score(self, x: Any) -> Any:
        location, direction = self._learned("location_", x), self._learned("direction_", x)
        projection = (f64(x) - location) @ direction
        return projection * projection


class PCAResidual(ActivationDetector):
    """Norm of the activation outside the trusted principal subspace (ViM's virtual logit).

    score(x) = |(I - P P^T)(x - mu)|, P the top principal directions of the trusted
    activations (the virtual-logit part of ViM, Wang et al. 2022).

    Parameters: `n_components`, the principal dimensions kept: an int, or a float in (0, 1) for
    the smallest number explaining that fraction of the trusted variance (default 0.9);
    `center` (True: about the trusted mean; False: about the origin, as ViM with a bias-free
    head); `aggregation`. Learned: `location_`, `residual_basis_` (d x (d - k), the eigenvectors
    of the d - k smallest eigenvalues), `n_components_`. Takes a stream of batches like
    Mahalanobis.
    """

    name = "pca-residual"
    param_rules = {"center": BOOLEAN}
    reference = "Wang et al. 2022, ViM: Out-Of-Distribution with Virtual-logit Matching"
    streaming = True
    tensor_inputs = True

    def __init__(
        self, n_components: int | float = 0.9, center: bool = True, aggregation: str = "mean"
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.n_components = n_components
        self.center = center

    def _fit(self, trusted: Any, untrusted: Any) -> None:
        self._fit_moments(moments_of(trusted))

    def _fit_moments(self, moments: StreamingMoments) -> None:
        d = moments.n_features
        second = moments.covariance() if self.center else moments.second_moment()
        eigvals, eigvecs = eigh(to_device(second, moments.device))  # ascending
        k = self._components(eigvals[::-1], d)
        self.location_ = moments.mean if self.center else np.zeros(d)
        self.residual_basis_ = np.ascontiguousarray(eigvecs[:, : d - k])
        self.n_components_ = k

    def _components(self, descending: np.ndarray, d: int) -> int:
        n = self.n_components
        if isinstance(n, bool) or not isinstance(n, int | float):
            raise MadlensError(f"n_components must be an int or a float in (0, 1), got {n!r}")
        if isinstance(n, float):
            if not 0.0 < n < 1.0:
                raise MadlensError(f"a float n_components must be in (0, 1), got {n}")
            explained = np.cumsum(np.clip(descending, 0, None))
            if explained[-1] <= 0:
                raise MadlensError("trusted activations have zero variance")
            return min(int(np.searchsorted(explained / explained[-1], n) + 1), d - 1)
        if not 1 <= n < d:
            raise MadlensError(f"n_components must be in [1, {d - 1}] for {d} features, got {n}")
        return n

    def _score(self, x: Any) -> Any:
        basis = self._learned("residual_basis_", x)
        return sqrt(squared_norms(x, self._learned("location_", x), basis))
