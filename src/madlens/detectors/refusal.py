"""The refusal direction: a label-free probe read from generic harmful and harmless
instructions (Arditi et al. 2024)."""

from __future__ import annotations

import numpy as np

from madlens.detectors.base import ContrastPairs
from madlens.detectors.probes import _LinearProbe, contrast_difference

__all__ = ["RefusalDirection"]


class RefusalDirection(_LinearProbe):
    """Projection on the refusal direction: mean(harmful) - mean(harmless) instruction
    activations at the prompt's last token; no anomaly labels used.

    Arditi et al. 2024, "Refusal in language models is mediated by a single direction": the
    difference of mean residual-stream activations, at the last token of the chat prompt
    (where the model is about to answer), between harmful and harmless instructions is one
    direction that mediates refusal. The instructions are generic, written by the project
    (they name no trigger and no task); score = (x - mu) . r / |r|, higher = further towards
    the harmful side than the trusted inputs sit.

    `fit(trusted, contrast=ContrastPairs(positive=harmful, negative=harmless))`: the two
    sides need not be paired row by row, only equally many. Trusted activations only centre
    the score. Learned: `location_` (trusted mean), `direction_` (unit).
    """

    name = "refusal-direction"
    contrast_source = "refusal"
    reference = "Arditi et al. 2024, Refusal in language models is mediated by a single direction"

    def __init__(self, aggregation: str = "mean") -> None:
        super().__init__(aggregation=aggregation)

    def _fit(
        self, trusted: np.ndarray, untrusted: np.ndarray | None, contrast: ContrastPairs
    ) -> None:
        self.location_, self.direction_ = contrast_difference(
            trusted, contrast, "refusal direction"
        )
