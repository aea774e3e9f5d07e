"""Contrast-consistent search (CCS) and its baselines on contrast-pair activations, and the
bench detectors `ccs` and `crc-tpc` built on them.

Burns et al. 2022, "Discovering Latent Knowledge in Language Models Without Supervision".
x+ / x- are a statement's activations completed with "True" / "False" (or with two answers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from madlens.detectors.base import BOOLEAN, SEED, ActivationDetector, ContrastPairs, as_matrix
from madlens.errors import MadlensError

__all__ = [
    "CCS",
    "CCSDetector",
    "CRCTPCDetector",
    "accuracy",
    "ccs_loss",
    "crc_tpc_direction",
    "logistic_ceiling",
    "normalize",
    "random_direction",
    "sign_fixed",
]

EPS = 1e-8


def normalize(x: np.ndarray, var_normalize: bool = False) -> np.ndarray:
    """Centre one side of the contrast pairs over the dataset (and divide each feature by its
    standard deviation when `var_normalize`): what CCS does to x+ and x- separately, so the
    probe cannot read which of the two answers a row carries."""
    x = np.asarray(x, dtype=np.float64)
    out = x - x.mean(0)
    if var_normalize:
        out = out / (out.std(0) + EPS)
    return out


def ccs_loss(p_pos: Any, p_neg: Any) -> Any:
    """CCS's loss, mean over pairs of consistency + confidence:
    `(p(x+) - (1 - p(x-)))**2 + min(p(x+), p(x-))**2`. numpy or torch in, same out."""
    if isinstance(p_pos, torch.Tensor):
        consistency = (p_pos - (1 - p_neg)) ** 2
        confidence = torch.minimum(p_pos, p_neg) ** 2
        return (consistency + confidence).mean(0)
    p_pos, p_neg = np.asarray(p_pos, dtype=np.float64), np.asarray(p_neg, dtype=np.float64)
    return float(((p_pos - (1 - p_neg)) ** 2 + np.minimum(p_pos, p_neg) ** 2).mean())


def accuracy(p_true: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of "true" predictions `p_true > 0.5` against labels (1 = true), the sign the
    method chose left as it is (the unsupervised accuracy)."""
    predicted = np.asarray(p_true) > 0.5
    return float((predicted == np.asarray(labels).astype(bool)).mean())


def sign_fixed(acc: float) -> float:
    """Accuracy after fixing the probe's sign with the labels: `max(acc, 1 - acc)`. This is
    what CCS papers usually report; it is not an unsupervised figure."""
    return max(acc, 1.0 - acc)


class CCS:
    """A CCS probe: `p(x) = sigmoid(x . direction_ + bias_)` on normalised activations,
    trained on the CCS loss with full-batch Adam from `n_tries` random starts, keeping the
    start with the lowest final loss (as published: 10 tries, 1000 epochs, lr 1e-3,
    weight decay 0.01, AdamW). The starts train together as columns of one weight matrix, which is
    exactly equivalent (Adam and weight decay act element by element).

    `fit(x_pos, x_neg)` normalises each side separately; `predict(x_pos, x_neg)` normalises
    the pairs it is given the same way and returns `0.5 * (p(x+) + 1 - p(x-))`, the
    probability that the statement is true. Learned: `direction_`, `bias_`, `loss_`.
    """

    def __init__(
        self,
        n_tries: int = 10,
        n_epochs: int = 1000,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        var_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        self.n_tries = n_tries
        self.n_epochs = n_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.var_normalize = var_normalize
        self.seed = seed

    def fit(self, x_pos: np.ndarray, x_neg: np.ndarray) -> CCS:
        """Train on contrast pairs (row i of each side is pair i)."""
        x_pos, x_neg = _check_pairs(x_pos, x_neg)
        pos = torch.tensor(normalize(x_pos, self.var_normalize), dtype=torch.float32)
        neg = torch.tensor(normalize(x_neg, self.var_normalize), dtype=torch.float32)
        d = pos.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        # nn.Linear's default initialisation, one column per try
        bound = 1.0 / np.sqrt(d)
        weight = (torch.rand(d, self.n_tries, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(self.n_tries, generator=generator) * 2 - 1) * bound
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        optimizer = torch.optim.AdamW([weight, bias], lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.n_epochs):
            optimizer.zero_grad()
            loss = ccs_loss(torch.sigmoid(pos @ weight + bias), torch.sigmoid(neg @ weight + bias))
            loss.sum().backward()
            optimizer.step()
        with torch.no_grad():
            final = ccs_loss(torch.sigmoid(pos @ weight + bias), torch.sigmoid(neg @ weight + bias))
        best = int(torch.argmin(final))
        self.direction_ = weight[:, best].detach().double().numpy()
        self.bias_ = float(bias[best].detach())
        self.loss_ = float(final[best])
        self.losses_ = final.double().numpy()
        return self

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """`p(x) = sigmoid(x . direction_ + bias_)` for rows already normalised."""
        return 1.0 / (1.0 + np.exp(-(np.asarray(x, dtype=np.float64) @ self.direction_
                                     + self.bias_)))  # fmt: skip

    def predict(self, x_pos: np.ndarray, x_neg: np.ndarray) -> np.ndarray:
        """Probability that each pair's statement is true: `0.5 * (p(x+) + 1 - p(x-))`, each
        side normalised over the pairs given (as the published evaluation does)."""
        if not hasattr(self, "direction_"):
            raise MadlensError("CCS is not fitted: call fit first")
        x_pos, x_neg = _check_pairs(x_pos, x_neg)
        p_pos = self.probabilities(normalize(x_pos, self.var_normalize))
        p_neg = self.probabilities(normalize(x_neg, self.var_normalize))
        return 0.5 * (p_pos + 1.0 - p_neg)


def _check_pairs(x_pos: Any, x_neg: Any) -> tuple[np.ndarray, np.ndarray]:
    x_pos = as_matrix(x_pos, "contrast positive side").astype(np.float64)
    x_neg = as_matrix(x_neg, "contrast negative side").astype(np.float64)
    if x_pos.shape != x_neg.shape:
        raise MadlensError(f"contrast sides differ in shape: {x_pos.shape} vs {x_neg.shape}")
    if len(x_pos) < 2:
        raise MadlensError("contrast-pair probes need at least 2 pairs")
    return x_pos, x_neg


def differences(x_pos: np.ndarray, x_neg: np.ndarray, var_normalize: bool = False) -> np.ndarray:
    """x+ - x- after normalising each side separately (what CRC and the baselines read)."""
    x_pos, x_neg = _check_pairs(x_pos, x_neg)
    return normalize(x_pos, var_normalize) - normalize(x_neg, var_normalize)


def crc_tpc_direction(x_pos: np.ndarray, x_neg: np.ndarray, var_normalize: bool = False):  # noqa: ANN201
    """CRC-TPC: the top principal component of the normalised differences (unit vector; its
    sign is scikit-learn's deterministic convention, not chosen with labels)."""
    diff = differences(x_pos, x_neg, var_normalize)
    return PCA(n_components=1, svd_solver="full").fit(diff).components_[0]


def random_direction(d: int, seed: int = 0) -> np.ndarray:
    """A uniformly random unit direction: the floor any probe must beat."""
    v = np.random.default_rng(seed).standard_normal(d)
    return v / np.linalg.norm(v)


def logistic_ceiling(
    x_pos: np.ndarray, x_neg: np.ndarray, labels: np.ndarray, var_normalize: bool = False
) -> LogisticRegression:
    """Supervised ceiling: logistic regression on the normalised differences and the truth
    labels (1 = true). Predict with `.predict_proba(differences(...))[:, 1]`."""
    diff = differences(x_pos, x_neg, var_normalize)
    return LogisticRegression(max_iter=2000, C=1.0).fit(diff, np.asarray(labels).astype(int))


def project(direction: np.ndarray, x_pos: np.ndarray, x_neg: np.ndarray) -> np.ndarray:
    """Probability-like read-out of a direction on pairs: sigmoid of the projected
    normalised difference (> 0.5 means "true" under the direction's sign)."""
    z = differences(x_pos, x_neg) @ np.asarray(direction, dtype=np.float64)
    scale = z.std() or 1.0
    return 1.0 / (1.0 + np.exp(-z / scale))


# --- bench detectors ---------------------------------------------------------------------------


def _swap_sides(pos: np.ndarray, neg: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Swap the two sides of a seeded random half of the pairs. A task's pairs come ordered
    (true answer first); CCS must not be given that order, and per-side centring would
    erase a truth direction that coincides with the side."""
    swap = np.random.default_rng(seed).random(len(pos)) < 0.5
    return np.where(swap[:, None], neg, pos), np.where(swap[:, None], pos, neg)


class _ContrastProbeDetector(ActivationDetector):
    """Fit a truth direction on a task's contrast pairs; score = 1 - p(true) of an input.

    A single input is normalised with the pooled statistics of both sides (after the sides
    are shuffled the two per-side means agree). The sign is oriented on trusted data only:
    trusted inputs are assumed truthful, so their mean p(true) is made > 0.5.
    """

    contrast_source = "task"
    param_rules = {"var_normalize": BOOLEAN, "seed": SEED}

    def __init__(self, var_normalize: bool = False, seed: int = 0, aggregation: str = "mean"):
        super().__init__(aggregation=aggregation)
        self.var_normalize = var_normalize
        self.seed = seed

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None, contrast: ContrastPairs):
        if not isinstance(contrast, ContrastPairs):
            raise MadlensError("contrast must be a ContrastPairs(positive=..., negative=...)")
        pos, neg = _check_pairs(contrast.positive, contrast.negative)
        if pos.shape[1] != trusted.shape[1]:
            raise MadlensError("contrast activations and trusted have different widths")
        pos, neg = _swap_sides(pos, neg, self.seed)
        pooled = np.concatenate([pos, neg])
        self.location_ = pooled.mean(0)
        scale = pooled.std(0) + EPS if self.var_normalize else np.ones(pooled.shape[1])
        self.scale_ = scale
        self.direction_, self.intercept_ = self._direction(pos, neg)
        if self._p_true(trusted).mean() < 0.5:
            self.direction_, self.intercept_ = -self.direction_, -self.intercept_

    def _p_true(self, x: np.ndarray) -> np.ndarray:
        z = (x.astype(np.float64) - self.location_) / self.scale_ @ self.direction_
        return 1.0 / (1.0 + np.exp(-(z + self.intercept_)))

    def _score(self, x: np.ndarray) -> np.ndarray:
        return 1.0 - self._p_true(x)

    def _direction(self, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, float]:
        raise NotImplementedError


class CCSDetector(_ContrastProbeDetector):
    """CCS fitted on the task's contrast pairs (`fit(trusted, contrast=ContrastPairs(...))`);
    anomaly score = 1 - p(true), oriented so trusted inputs read as true.
    Learned: `location_`, `scale_`, `direction_`, `intercept_`."""

    name = "ccs"
    reference = "Burns et al. 2022, Discovering Latent Knowledge (CCS)"

    def _direction(self, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, float]:
        probe = CCS(var_normalize=self.var_normalize, seed=self.seed).fit(pos, neg)
        return probe.direction_, probe.bias_


class CRCTPCDetector(_ContrastProbeDetector):
    """CRC-TPC fitted on the task's contrast pairs: the top principal component of the
    normalised differences, scaled so projections have unit spread; score = 1 - p(true)."""

    name = "crc-tpc"
    reference = "Burns et al. 2022, Discovering Latent Knowledge (CRC-TPC)"

    def _direction(self, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, float]:
        direction = crc_tpc_direction(pos, neg, self.var_normalize)
        spread = float(((np.concatenate([pos, neg]) - self.location_) / self.scale_
                        @ direction).std()) or 1.0  # fmt: skip
        return direction / spread, 0.0
