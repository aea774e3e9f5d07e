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
from madlens.detectors.ccs import CCS, CCSDetector, CRCTPCDetector
from madlens.detectors.gaussian import (
    Mahalanobis,
    StreamingMoments,
    ledoit_wolf_shrinkage,
    shrunk_covariance,
)
from madlens.detectors.knn import KNN
from madlens.detectors.lie_detector import LieDetector, elicitation_features
from madlens.detectors.output import MSP, Energy, Entropy, MaxLogit, Perplexity, WindowedPerplexity
from madlens.detectors.probes import DefectionProbe, ExclusionProbe, LogisticProbe, MassMeanProbe
from madlens.detectors.refusal import RefusalDirection
from madlens.detectors.sae import SAERare, SAERecon
from madlens.detectors.sklearn_detectors import LOF, IsolationForest
from madlens.detectors.spectral import QUE, PCAResidual, SpectralSignature

__all__ = [
    "DETECTORS",
    "KNN",
    "LOF",
    "LieDetector",
    "MSP",
    "QUE",
    "CCS",
    "ActivationDetector",
    "CCSDetector",
    "CRCTPCDetector",
    "Activations",
    "ContrastPairs",
    "DefectionProbe",
    "Detector",
    "Energy",
    "Entropy",
    "ExclusionProbe",
    "IsolationForest",
    "LogisticProbe",
    "Mahalanobis",
    "MassMeanProbe",
    "MaxLogit",
    "OutputDetector",
    "OutputStats",
    "PCAResidual",
    "SAERare",
    "SAERecon",
    "Perplexity",
    "RefusalDirection",
    "SpectralSignature",
    "StreamingMoments",
    "WindowedPerplexity",
    "elicitation_features",
    "get_detector",
    "ledoit_wolf_shrinkage",
    "load_detector",
    "shrunk_covariance",
]
