"""The monitor: model + hooks + position + fitted detectors + a split-conformal threshold;
fit on trusted traffic, calibrate at a chosen false-positive rate, score, save and load.
The one fit / score path of madlens (the bench and the server go through it)."""

from madlens.monitor.conformal import combine, p_values, threshold
from madlens.monitor.monitor import (
    CONTRAST_QUESTIONS,
    HARMFUL_INSTRUCTIONS,
    HARMLESS_INSTRUCTIONS,
    Features,
    Monitor,
    Scores,
    default_hooks,
    read_config,
)

__all__ = [
    "CONTRAST_QUESTIONS",
    "HARMFUL_INSTRUCTIONS",
    "HARMLESS_INSTRUCTIONS",
    "Features",
    "Monitor",
    "Scores",
    "combine",
    "default_hooks",
    "p_values",
    "read_config",
    "threshold",
]
