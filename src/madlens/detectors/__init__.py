"""Anomaly detectors on activations and outputs, behind one scikit-learn-style API.

`Detector(...).fit(trusted, untrusted=None).score(batch)`, higher = more anomalous; by name via
`get_detector(name, **params)` from `DETECTORS`; `save(dir)` / `load_detector(dir)`.
"""

from madlens.detectors.base import (
    DETECTORS,
    ActivationDetector,
    Activations,
    ContrastPairs,
    Detector,
    OutputDetector,
    OutputStats,
    get_detector,
    load_detector,
)
from madlens.detectors.gaussian import (
    Mahalanobis,
    StreamingMoments,
    ledoit_wolf_shrinkage,
    shrunk_covariance,
)
from madlens.detectors.knn import KNN
from madlens.detectors.output import MSP, Energy, Entropy, MaxLogit, Perplexity, WindowedPerplexity
from madlens.detectors.probes import DefectionProbe, LogisticProbe, MassMeanProbe
from madlens.detectors.sklearn_detectors import LOF, IsolationForest
from madlens.detectors.spectral import QUE, PCAResidual, SpectralSignature

__all__ = [
    "DETECTORS",
    "KNN",
    "LOF",
    "MSP",
    "QUE",
    "ActivationDetector",
    "Activations",
    "ContrastPairs",
    "DefectionProbe",
    "Detector",
    "Energy",
    "Entropy",
    "IsolationForest",
    "LogisticProbe",
    "Mahalanobis",
    "MassMeanProbe",
    "MaxLogit",
    "OutputDetector",
    "OutputStats",
    "PCAResidual",
    "Perplexity",
    "SpectralSignature",
    "StreamingMoments",
    "WindowedPerplexity",
    "get_detector",
    "ledoit_wolf_shrinkage",
    "load_detector",
    "shrunk_covariance",
]
