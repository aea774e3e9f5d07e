"""Split-conformal calibration: thresholds and p-values from held-out trusted scores, and
the rule that combines several detectors.

For one detector with calibration scores `c_1..c_n` (trusted inputs the detector was not fit
on) and a target false-positive rate `alpha`, the threshold is the `ceil((n + 1)(1 - alpha))`-th
smallest `c_i`; an input is flagged when its score is above it. If the calibration inputs and
a new normal input are exchangeable, the flag rate on new normal inputs is at most `alpha` in
expectation (Vovk et al. 2005; Angelopoulos & Bates 2021, "A gentle introduction to conformal
prediction", section 1). The matching p-value is `(1 + #{c_i >= s}) / (n + 1)`; `p <= alpha`
is the same flag.

Several detectors combine by Bonferroni: combined p = `min(1, k * min_j p_j)`, flagged when it
is at most `alpha`, i.e. when any detector's score is above its own threshold at `alpha / k`.
It holds under any dependence between the detectors (they read the same inputs, so they are
far from independent, which rules out Fisher's method), at the price of needing
`n >= k / alpha - 1` calibration inputs.
"""

import math

import numpy as np

from madlens.errors import MadlensError

RULE = "bonferroni"


def min_calibration(alpha: float, k: int = 1) -> int:
    """The fewest calibration scores for which a threshold at `alpha` (over `k` detectors)
    exists: below it, no calibration score is high enough to be one."""
    return max(1, math.ceil(k / alpha - 1 - 1e-9))


def threshold(calibration: np.ndarray, alpha: float) -> float:
    """The `ceil((n + 1)(1 - alpha))`-th smallest calibration score."""
    scores = np.sort(np.asarray(calibration, dtype=np.float64))
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if rank > n:
        raise MadlensError(
            f"{n} calibration inputs cannot give a threshold at a false-positive rate of "
            f"{alpha:g}: it needs at least {min_calibration(alpha)}"
        )
    return float(scores[rank - 1])


def p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values: `(1 + #{calibration >= s}) / (n + 1)` for each score `s`."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = len(cal) - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (len(cal) + 1.0)


def combine(p: np.ndarray) -> np.ndarray:
    """Bonferroni's combined p-value of `k x n` per-detector p-values: `min(1, k * min_j p_j)`."""
    p = np.atleast_2d(np.asarray(p, dtype=np.float64))
    return np.minimum(1.0, len(p) * p.min(axis=0))
