"""Local outlier factor and isolation forest, wrapping scikit-learn.

scikit-learn models are saved only by pickling, so these keep their trusted rows and refit on load.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import IsolationForest as _SkIsolationForest
from sklearn.neighbors import LocalOutlierFactor as _SkLOF

from madlens.detectors.base import SEED, ActivationDetector, choice, either, integer, real
from madlens.errors import MadlensError

__all__ = ["LOF", "IsolationForest"]


def _subsample(x: np.ndarray, max_rows: int | None, seed: int) -> np.ndarray:
    """A float32 copy of `x`, or of `max_rows` of its rows chosen at random (seeded)."""
    if max_rows is not None and len(x) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
        x = x[rows]
    return np.array(x, dtype=np.float32, order="C", copy=True)


class LOF(ActivationDetector):
    """Local outlier factor of each test activation with respect to the trusted ones.

    Breunig et al. 2000: the ratio of the local reachability density of a point's k nearest
    trusted neighbours to its own; about 1 for inliers, larger for outliers.

    Parameters: `n_neighbors` (20, sklearn's default); `max_trusted` (10,000): LOF's fit finds
    the neighbours of every trusted row, O(n^2 d), so larger trusted sets are subsampled
    (seeded by `seed`); None keeps all; `aggregation`.
    Learned: `trusted_` (the rows fit on), `estimator_` (sklearn, rebuilt on load).
    """

    name = "lof"
    param_rules = {
        "n_neighbors": integer(1),
        "max_trusted": integer(2, optional=True),
        "seed": SEED,
    }
    reference = "Breunig et al. 2000, LOF (scikit-learn)"
    _unsaved = ("estimator_",)

    def __init__(
        self,
        n_neighbors: int = 20,
        max_trusted: int | None = 10_000,
        seed: int = 0,
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.n_neighbors = n_neighbors
        self.max_trusted = max_trusted
        self.seed = seed

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None) -> None:
        self.trusted_ = _subsample(trusted, self.max_trusted, self.seed)
        if self.n_neighbors >= len(self.trusted_):
            raise MadlensError(
                f"n_neighbors={self.n_neighbors} needs more than {len(self.trusted_)} trusted rows"
            )
        self._after_load()

    def _after_load(self) -> None:
        if hasattr(self, "trusted_"):
            self.estimator_ = _SkLOF(n_neighbors=self.n_neighbors, novelty=True).fit(self.trusted_)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -self.estimator_.score_samples(x.astype(np.float32, copy=False))

    def _trusted_scores(self, trusted_sample: np.ndarray) -> np.ndarray:
        # Scoring a fitted row would count it as its own neighbour; sklearn keeps the
        # leave-one-out LOF of the rows it was fit on.
        return -self.estimator_.negative_outlier_factor_


class IsolationForest(ActivationDetector):
    """Isolation-forest anomaly score (higher = more anomalous).

    Liu, Ting & Zhou 2008: anomalies are isolated by fewer random axis-aligned splits;
    score = 2^(-E[path length] / c(n)), about 0.5 for normal points, near 1 for anomalies.

    Parameters: `n_estimators` (100), `max_samples` ("auto" = min(256, n)), `max_trusted` (None:
    keep every trusted row; an int subsamples, seeded), `seed`, `aggregation`.
    Learned: `trusted_`, `estimator_` (sklearn, rebuilt on load from `trusted_` and `seed`,
    giving the same trees).
    """

    name = "isolation-forest"
    param_rules = {
        "n_estimators": integer(1),
        "max_samples": either(choice("auto"), integer(1), real(0, high=1.0)),
        "max_trusted": integer(2, optional=True),
        "seed": SEED,
    }
    reference = "Liu, Ting & Zhou 2008, Isolation Forest (scikit-learn)"
    _unsaved = ("estimator_",)

    def __init__(
        self,
        n_estimators: int = 100,
        max_samples: int | float | str = "auto",
        max_trusted: int | None = None,
        seed: int = 0,
        aggregation: str = "mean",
    ) -> None:
        super().__init__(aggregation=aggregation)
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_trusted = max_trusted
        self.seed = seed

    def _fit(self, trusted: np.ndarray, untrusted: np.ndarray | None) -> None:
        self.trusted_ = _subsample(trusted, self.max_trusted, self.seed)
        self._after_load()

    def _after_load(self) -> None:
        if hasattr(self, "trusted_"):
            self.estimator_ = _SkIsolationForest(
                n_estimators=self.n_estimators,
                max_samples=self.max_samples,
                random_state=self.seed,
            ).fit(self.trusted_)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -self.estimator_.score_samples(x.astype(np.float32, copy=False))
