"""Output detectors: scores from the final-position logits or the per-token log-probabilities.

None learns from trusted data; each is a fixed statistic, signed so higher = more anomalous.
"""

from __future__ import annotations

import numpy as np

from madlens.detectors.base import OutputDetector, OutputStats, chunks, integer, real
from madlens.errors import MadlensError

__all__ = ["MSP", "Energy", "Entropy", "MaxLogit", "Perplexity", "WindowedPerplexity"]

# Rows of logits handled at once: bounds the float32 scratch of a (rows, vocab) block.
LOGIT_ROWS = 256


def _logit_stats(stats: OutputStats, temperature: float, entropy: bool = False) -> dict:
    """Per row of z = logits / T: max `m`, `log_sum` = log sum exp(z - m), and the entropy.

    NumPy, block by block in two reused float32 buffers (its SIMD exp beats torch's
    logsumexp here); sums are taken in float64. -inf logits (masked tokens) are allowed.
    """
    if temperature <= 0:
        raise MadlensError(f"temperature must be > 0, got {temperature}")
    logits = stats.logits
    n, vocab = logits.shape
    rows = min(LOGIT_ROWS, n)
    shifted = np.empty((rows, vocab), dtype=np.float32)
    expd = np.empty((rows, vocab), dtype=np.float32)
    out = {"max": np.empty(n), "log_sum": np.empty(n), "entropy": np.empty(n)}
    for start in chunks(n, rows):
        block = np.asarray(logits[start : start + rows], dtype=np.float32)
        b = len(block)
        z, e = shifted[:b], expd[:b]
        m = block.max(axis=1, keepdims=True)
        np.subtract(block, m, out=z)
        if temperature != 1:
            z /= temperature
        if entropy:  # keep 0 * log 0 = 0 where a logit is -inf
            np.maximum(z, np.finfo(np.float32).min, out=z)
        np.exp(z, out=e)
        total = e.sum(axis=1, dtype=np.float64)
        rows_out = slice(start, start + b)
        out["max"][rows_out] = m[:, 0]
        out["log_sum"][rows_out] = np.log(total)
        if entropy:  # H = log sum e^z' - sum p z'   with z' = z - max
            np.multiply(e, z, out=z)
            out["entropy"][rows_out] = np.log(total) - z.sum(axis=1, dtype=np.float64) / total
    return out


def _finite(scores: np.ndarray) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise MadlensError("logits contain NaN or +inf, or a row with no finite logit")
    return scores


class MSP(OutputDetector):
    """Negative maximum softmax probability of logits / `temperature`.

    Hendrycks & Gimpel 2017, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks". max_y softmax(z)_y = 1 / sum_y exp(z_y - max z).
    """

    name = "msp"
    param_rules = {"temperature": real(0)}
    reference = "Hendrycks & Gimpel 2017, A Baseline for Detecting Misclassified and OOD Examples"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _score(self, stats: OutputStats) -> np.ndarray:
        return _finite(-np.exp(-_logit_stats(stats, self.temperature)["log_sum"]))


class MaxLogit(OutputDetector):
    """Negative largest logit (Hendrycks et al. 2022, "Scaling Out-of-Distribution Detection
    for Real-World Settings")."""

    name = "max-logit"
    reference = "Hendrycks et al. 2022, Scaling Out-of-Distribution Detection"

    def __init__(self) -> None:
        pass

    def _score(self, stats: OutputStats) -> np.ndarray:
        return _finite(-np.asarray(stats.logits).max(axis=1).astype(np.float64))


class Energy(OutputDetector):
    """Free energy -T logsumexp(logits / T); high energy = little evidence = anomalous.

    Liu et al. 2020, "Energy-based Out-of-distribution Detection".
    """

    name = "energy"
    param_rules = {"temperature": real(0)}
    reference = "Liu et al. 2020, Energy-based Out-of-distribution Detection"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _score(self, stats: OutputStats) -> np.ndarray:
        t = self.temperature
        row = _logit_stats(stats, t)
        return _finite(-t * (row["max"] / t + row["log_sum"]))


class Entropy(OutputDetector):
    """Entropy of softmax(logits / `temperature`), in nats."""

    name = "entropy"
    param_rules = {"temperature": real(0)}
    reference = "predictive entropy of the next-token distribution"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _score(self, stats: OutputStats) -> np.ndarray:
        return _finite(_logit_stats(stats, self.temperature, entropy=True)["entropy"])


def _token_nll(stats: OutputStats) -> list[np.ndarray]:
    seqs = []
    for i, logprobs in enumerate(stats.token_logprobs):
        if len(logprobs) == 0:
            raise MadlensError(f"example {i} has no scored tokens")
        logprobs = logprobs.astype(np.float64)
        if np.isnan(logprobs).any() or (logprobs > 1e-6).any():
            raise MadlensError(f"example {i}: token log-probs must be <= 0 and not NaN")
        seqs.append(-logprobs)
    return seqs


class Perplexity(OutputDetector):
    """Mean negative log-likelihood of the scored span's tokens, -(1/m) sum_t log p(t).

    The log of perplexity (same ranking, no overflow); the perplexity filter of Jain et al.
    2023, "Baseline Defenses for Adversarial Attacks Against Aligned Language Models".
    """

    name = "perplexity"
    reference = "Jain et al. 2023, Baseline Defenses for Adversarial Attacks (perplexity filter)"
    needs = "token_logprobs"

    def __init__(self) -> None:
        pass

    def _score(self, stats: OutputStats) -> np.ndarray:
        return np.array([nll.mean() for nll in _token_nll(stats)])


class WindowedPerplexity(OutputDetector):
    """Largest mean NLL over consecutive non-overlapping windows of `window` tokens.

    The windowed perplexity filter of Jain et al. 2023: catches a short gibberish suffix
    (an adversarial string) that the mean over a long text would dilute.

    Windows start at tokens 0, w, 2w, ...; a last partial window shorter than `window` is
    merged into the one before it (a 1-token window would flag every rare word), and a span
    shorter than one window is one window.
    """

    name = "windowed-perplexity"
    param_rules = {"window": integer(1)}
    reference = "Jain et al. 2023, Baseline Defenses for Adversarial Attacks (windowed)"
    needs = "token_logprobs"

    def __init__(self, window: int = 10) -> None:
        self.window = window

    def _score(self, stats: OutputStats) -> np.ndarray:
        w = self.window
        scores = []
        for nll in _token_nll(stats):
            n_windows = max(len(nll) // w, 1)
            bounds = [i * w for i in range(n_windows)] + [len(nll)]
            scores.append(
                max(nll[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            )
        return np.array(scores)
