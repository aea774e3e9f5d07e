"""Metrics that judge an anomaly detector: AUROC, AP, FPR@95TPR, TPR@1%FPR, AURC, bootstrap CIs.

Pure functions of (labels, scores), with label 1 = anomalous and higher score = more anomalous.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from madlens.errors import MadlensError

__all__ = [
    "METRICS",
    "DegenerateMetricWarning",
    "aurc",
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "evaluate",
    "fpr_at_tpr",
    "tpr_at_fpr",
]

# Every metric is computed from one representation: the number of normal and anomalous examples
# at each distinct score, in ascending order of score. Ties are therefore exact (a tie between a
# normal and an anomalous example counts half, as in scikit-learn), and a bootstrap resample is a
# reweighting of those counts, so confidence intervals are vectorised over resamples.
#
# Degenerate inputs never give a silent 0.5: if the labels hold one class only, a score is NaN,
# or all scores are equal, every metric returns NaN and emits a `DegenerateMetricWarning`.
# Malformed inputs (labels other than 0/1, mismatched lengths, no examples) raise MadlensError.

# Bootstrap resamples are processed in blocks so that the (resamples x distinct scores) count
# matrices stay below this many entries (80 MB of float64).
_MAX_BLOCK_ENTRIES = 10_000_000


class DegenerateMetricWarning(UserWarning):
    """A metric is undefined for these inputs (one class only, NaN or constant scores)."""


# --- metrics as functions of per-distinct-score counts ----------------------------------------


class _Counts:
    """Per-distinct-score counts, shape (..., G), ascending score; the leading axes index
    bootstrap resamples. `tp` / `fp`: anomalous / normal examples at scores >= each distinct
    score, i.e. what a threshold there flags (computed once, shared by all metrics)."""

    def __init__(self, pos: np.ndarray, neg: np.ndarray) -> None:
        self.pos, self.neg = pos, neg
        self.tp = np.cumsum(pos[..., ::-1], axis=-1)[..., ::-1]
        self.fp = np.cumsum(neg[..., ::-1], axis=-1)[..., ::-1]
        self.n_pos = self.tp[..., :1]
        self.n_neg = self.fp[..., :1]


def _auroc_counts(c: _Counts) -> np.ndarray:
    # Mann-Whitney: P(score_anomalous > score_normal) + 0.5 P(tie); normal examples strictly
    # below group g number n_neg - fp_g.
    wins = (c.pos * (c.n_neg - c.fp + 0.5 * c.neg)).sum(-1)
    return wins / (c.n_pos * c.n_neg)[..., 0]


def _ap_counts(c: _Counts) -> np.ndarray:
    # sum over thresholds of (recall step) x precision, as sklearn's average_precision_score.
    flagged = c.tp + c.fp
    precision = np.divide(c.tp, flagged, out=np.zeros_like(c.tp), where=flagged > 0)
    return (c.pos * precision).sum(-1) / c.n_pos[..., 0]


def _fpr_at_tpr_counts(c: _Counts, tpr: float) -> np.ndarray:
    # FPR at the highest threshold whose TPR reaches `tpr`; FPR falls as the threshold rises.
    reached = c.tp / c.n_pos >= tpr
    return np.where(reached, c.fp / c.n_neg, np.inf).min(-1)


def _tpr_at_fpr_counts(c: _Counts, fpr: float) -> np.ndarray:
    # Best TPR among thresholds with FPR <= `fpr`; the threshold above every score gives TPR 0.
    allowed = c.fp / c.n_neg <= fpr
    return np.where(allowed, c.tp / c.n_pos, 0.0).max(-1)


def _aurc_counts(c: _Counts) -> np.ndarray:
    # Accept examples from the lowest score up; at coverage k (k accepted) the risk is the
    # fraction of anomalous ("bad") ones among them. AURC = (1/n) sum_k risk(k). Inside a group
    # of tied scores the anomalous examples are spread evenly, which is the expectation over
    # random tie-breaking. For the group covering k in (K0, K1] with `p` anomalous of `m`, and
    # C0 anomalous accepted before it:
    #   sum_k C(k)/k = C0 * H + (p/m) * (m - K0 * H),   H = sum_{k=K0+1}^{K1} 1/k.
    count = c.pos + c.neg
    k1 = np.cumsum(count, axis=-1)  # accepted up to and including the group
    n = int(round(float(k1.reshape(-1, k1.shape[-1])[0, -1])))
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])
    h1 = harmonic[k1.astype(np.int64)]  # counts are whole numbers, exact in float64
    h = np.diff(h1, axis=-1, prepend=0.0)
    k1 -= count  # now K0, accepted before the group
    rate = np.divide(c.pos, count, out=np.zeros_like(c.pos), where=count > 0)
    return ((c.n_pos - c.tp) * h + rate * (count - k1 * h)).sum(-1) / n


_TPR_TARGET = 0.95
_FPR_TARGET = 0.01

_COUNT_METRICS: dict[str, Callable[[_Counts], np.ndarray]] = {
    "auroc": _auroc_counts,
    "ap": _ap_counts,
    "fpr_at_95tpr": lambda c: _fpr_at_tpr_counts(c, _TPR_TARGET),
    "tpr_at_1fpr": lambda c: _tpr_at_fpr_counts(c, _FPR_TARGET),
    "aurc": _aurc_counts,
}


# --- input handling ----------------------------------------------------------------------------


class _Grouped:
    """Labels and scores reduced to counts per distinct score (ascending)."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        distinct, group = np.unique(scores, return_inverse=True)
        self.n_groups = len(distinct)
        self.group = group.reshape(-1)
        self.labels = labels
        self.pos = np.bincount(self.group[labels], minlength=self.n_groups).astype(np.float64)
        self.neg = np.bincount(self.group[~labels], minlength=self.n_groups).astype(np.float64)


def _prepare(labels: Any, scores: Any) -> tuple[_Grouped | None, str | None]:
    """Validate inputs; return the grouped counts, or None and why the metric is undefined."""
    labels_arr = np.asarray(labels)
    scores_arr = np.asarray(scores, dtype=np.float64)
    if labels_arr.ndim != 1 or scores_arr.ndim != 1:
        raise MadlensError(
            f"labels and scores must be 1-D, got shapes {labels_arr.shape} and {scores_arr.shape}"
        )
    if len(labels_arr) != len(scores_arr):
        raise MadlensError(f"{len(labels_arr)} labels but {len(scores_arr)} scores")
    if len(labels_arr) == 0:
        raise MadlensError("no examples to evaluate")
    if labels_arr.dtype != np.bool_:
        if not np.isin(labels_arr, (0, 1)).all():
            raise MadlensError("labels must be 0 (normal) or 1 (anomalous)")
        labels_arr = labels_arr.astype(bool)
    n_anomalous = int(labels_arr.sum())
    if n_anomalous in (0, len(labels_arr)):
        kind = "anomalous" if n_anomalous else "normal"
        return None, f"all {len(labels_arr)} examples are {kind}: need both classes"
    n_nan = int(np.isnan(scores_arr).sum())
    if n_nan:
        return None, f"{n_nan} of {len(scores_arr)} scores are NaN"
    grouped = _Grouped(labels_arr, scores_arr)
    if grouped.n_groups == 1:
        return None, "all scores are equal: the detector does not rank the examples"
    return grouped, None


def _undefined(metric: str, reason: str, stacklevel: int = 3) -> float:
    # stacklevel points the warning at the caller of the public function.
    message = f"{metric} is undefined: {reason}; returning NaN"
    warnings.warn(message, DegenerateMetricWarning, stacklevel=stacklevel)
    return float("nan")


def _point(name: str, labels: Any, scores: Any, fn: Callable) -> float:
    grouped, reason = _prepare(labels, scores)
    if grouped is None:
        return _undefined(name, reason, stacklevel=4)
    return float(fn(_Counts(grouped.pos, grouped.neg)))


# --- public metrics ----------------------------------------------------------------------------


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: P(anomalous score > normal score), ties counting half.

    Equals `sklearn.metrics.roc_auc_score(labels, scores)`. 1 is perfect, 0.5 chance.
    """
    return _point("AUROC", labels, scores, _auroc_counts)


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision, AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds (descending).

    R_n and P_n are recall and precision of flagging scores >= the n-th threshold, with the
    anomalous class positive; equals `sklearn.metrics.average_precision_score`.
    """
    return _point("AP", labels, scores, _ap_counts)


def fpr_at_tpr(labels: Any, scores: Any, tpr: float = _TPR_TARGET) -> float:
    """False-positive rate at the highest threshold that flags at least `tpr` of the anomalies.

    FPR@95TPR with the default; lower is better.
    """
    _check_fraction("tpr", tpr)
    return _point("FPR@TPR", labels, scores, lambda c: _fpr_at_tpr_counts(c, tpr))


def tpr_at_fpr(labels: Any, scores: Any, fpr: float = _FPR_TARGET) -> float:
    """Largest true-positive rate among thresholds whose false-positive rate is <= `fpr`.

    TPR@1%FPR with the default; higher is better.
    """
    _check_fraction("fpr", fpr)
    return _point("TPR@FPR", labels, scores, lambda c: _tpr_at_fpr_counts(c, fpr))


def aurc(labels: Any, scores: Any) -> float:
    """Area under the risk-coverage curve (learning to reject); lower is better.

    Examples are accepted in order of increasing score (the most anomalous are rejected first).
    With k examples accepted, risk(k) = (number of label-1 examples accepted) / k, and
    AURC = (1/n) sum_{k=1}^{n} risk(k). Label 1 marks a bad outcome: an anomaly, or, for
    selective prediction, an error of the model. Tied scores are accepted as a group with their
    bad outcomes spread evenly (the expectation over random tie-breaking). Equals
    1 - AURRA (Hendrycks et al.) of the confidence `-scores` when scores are distinct.
    """
    return _point("AURC", labels, scores, _aurc_counts)


METRICS: dict[str, Callable[..., float]] = {
    "auroc": auroc,
    "ap": average_precision,
    "fpr_at_95tpr": fpr_at_tpr,
    "tpr_at_1fpr": tpr_at_fpr,
    "aurc": aurc,
}


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise MadlensError(f"{name} must be in [0, 1], got {value}")


# --- bootstrap ---------------------------------------------------------------------------------


def _resampled_counts(grouped: _Grouped, n_resamples: int, rng: np.random.Generator):
    """Yield blocks of stratified bootstrap counts, each a `_Counts` of (block, G) arrays.

    Anomalous and normal examples are resampled separately, so every resample keeps both
    classes and the original class sizes.
    """
    groups = grouped.n_groups
    pos_groups = grouped.group[grouped.labels]
    neg_groups = grouped.group[~grouped.labels]
    block = max(1, min(n_resamples, _MAX_BLOCK_ENTRIES // max(groups, 1)))
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        offsets = (np.arange(b) * groups)[:, None]
        counts = []
        for members in (pos_groups, neg_groups):
            draws = members[rng.integers(0, len(members), size=(b, len(members)))]
            flat = np.bincount((draws + offsets).ravel(), minlength=b * groups)
            counts.append(flat.reshape(b, groups).astype(np.float64))
        done += b
        yield _Counts(counts[0], counts[1])


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _check_bootstrap(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise MadlensError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise MadlensError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    labels: Any,
    scores: Any,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "auroc",
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric, stratified by class.

    `metric` is a name in `METRICS` ("auroc", "ap", "fpr_at_95tpr", "tpr_at_1fpr", "aurc"),
    computed on all resamples at once, or any callable `(labels, scores) -> float`, called once
    per resample. The same `seed` gives the same interval. Resamples in which the metric is
    undefined (all resampled scores equal) are dropped; degenerate inputs give (NaN, NaN) and a
    `DegenerateMetricWarning`.
    """
    _check_bootstrap(n_resamples, confidence)
    grouped, reason = _prepare(labels, scores)
    if grouped is None:
        _undefined(f"bootstrap CI of {metric}", reason)
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if isinstance(metric, str):
        if metric not in _COUNT_METRICS:
            raise MadlensError(f"unknown metric {metric!r}; known: {', '.join(_COUNT_METRICS)}")
        fn = _COUNT_METRICS[metric]
        values = np.concatenate(
            [_safe(fn, c) for c in _resampled_counts(grouped, n_resamples, rng)]
        )
        return _interval(values, confidence)
    labels_arr = grouped.labels
    scores_arr = np.asarray(scores, dtype=np.float64)
    pos_idx, neg_idx = np.flatnonzero(labels_arr), np.flatnonzero(~labels_arr)
    values = np.empty(n_resamples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        for i in range(n_resamples):
            idx = np.concatenate(
                [rng.choice(pos_idx, len(pos_idx)), rng.choice(neg_idx, len(neg_idx))]
            )
            values[i] = metric(labels_arr[idx], scores_arr[idx])
    return _interval(values, confidence)


def _safe(fn: Callable, counts: _Counts) -> np.ndarray:
    """Metric values per resample, NaN where the resample has one distinct score only."""
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.asarray(fn(counts), dtype=np.float64)
    constant = ((counts.pos + counts.neg) > 0).sum(-1) <= 1
    return np.where(constant, np.nan, values)


def evaluate(
    labels: Any,
    scores: Any,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric with its bootstrap interval, from one set of resamples.

    Returns a JSON-ready dict with the keys of a bench results row: `auroc`, `auroc_ci`
    (`[lo, hi]`), `ap`, `ap_ci`, `fpr_at_95tpr`, `fpr_at_95tpr_ci`, `tpr_at_1fpr`,
    `tpr_at_1fpr_ci`, `aurc`, `aurc_ci`, `n_normal`, `n_anomalous`. Degenerate inputs give NaN
    values (and one `DegenerateMetricWarning`).
    """
    _check_bootstrap(n_resamples, confidence)
    grouped, reason = _prepare(labels, scores)
    labels_arr = np.asarray(labels).astype(bool)
    result: dict[str, Any] = {}
    if grouped is None:
        _undefined("every metric", reason)
        for name in _COUNT_METRICS:
            result[name] = float("nan")
            result[f"{name}_ci"] = [float("nan"), float("nan")]
    else:
        counts = _Counts(grouped.pos, grouped.neg)
        for name, fn in _COUNT_METRICS.items():
            result[name] = float(fn(counts))
        values: dict[str, list[np.ndarray]] = {name: [] for name in _COUNT_METRICS}
        rng = np.random.default_rng(seed)
        for resampled in _resampled_counts(grouped, n_resamples, rng):
            for name, fn in _COUNT_METRICS.items():
                values[name].append(_safe(fn, resampled))
        for name in _COUNT_METRICS:
            result[f"{name}_ci"] = list(_interval(np.concatenate(values[name]), confidence))
    result["n_normal"] = int((~labels_arr).sum())
    result["n_anomalous"] = int(labels_arr.sum())
    return result
