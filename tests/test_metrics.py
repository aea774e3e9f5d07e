"""Metrics against scikit-learn, brute-force references, and their invariants."""

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from madlens import metrics
from madlens.errors import MadlensError
from madlens.metrics import DegenerateMetricWarning


def _random_case(seed, n=200, n_levels=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + labels
    if n_levels:  # coarse scores: many ties
        scores = np.round(scores * n_levels / 4)
    return labels, scores


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_levels", [None, 3])
def test_auroc_and_ap_equal_sklearn(seed, n_levels):
    labels, scores = _random_case(seed, n_levels=n_levels)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_bool_labels_and_lists_accepted():
    labels, scores = _random_case(0)
    expected = roc_auc_score(labels, scores)
    assert metrics.auroc(labels.astype(bool), list(scores)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_levels", [None, 3])
def test_fpr_and_tpr_at_operating_points_match_sklearn_roc_curve(seed, n_levels):
    labels, scores = _random_case(seed, n=300, n_levels=n_levels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # first ROC point (highest threshold) reaching 95% TPR
    expected_fpr = fpr[np.flatnonzero(tpr >= 0.95)[0]]
    expected_tpr = tpr[fpr <= 0.01].max()
    assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(expected_fpr)
    assert metrics.tpr_at_fpr(labels, scores) == pytest.approx(expected_tpr)
    assert metrics.fpr_at_tpr(labels, scores, tpr=0.5) == pytest.approx(
        fpr[np.flatnonzero(tpr >= 0.5)[0]]
    )


def _aurc_brute_force(labels, scores):
    """Mean over every acceptance order consistent with the scores (ties in any order)."""
    values = []
    for order in itertools.permutations(range(len(scores))):
        if np.all(np.diff(scores[list(order)]) >= 0):
            bad = np.cumsum(labels[list(order)])
            values.append(np.mean(bad / np.arange(1, len(scores) + 1)))
    return np.mean(values)


@pytest.mark.parametrize("seed", range(6))
def test_aurc_equals_brute_force_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = rng.integers(0, 3, 6).astype(float)
    if len(set(scores)) == 1:
        scores[0] += 1
    assert metrics.aurc(labels, scores) == pytest.approx(_aurc_brute_force(labels, scores))


def test_aurc_is_one_minus_aurra_for_distinct_scores():
    # AURRA (Hendrycks et al.): mean accuracy over response rates, answering by confidence.
    rng = np.random.default_rng(3)
    errors = rng.integers(0, 2, 50)
    confidence = rng.normal(size=50)
    order = np.argsort(-confidence)
    aurra = np.mean(np.cumsum(1 - errors[order]) / np.arange(1, 51))
    assert metrics.aurc(errors, -confidence) == pytest.approx(1 - aurra)


def test_perfect_and_reversed_rankings():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert metrics.auroc(labels, scores) == 1.0
    assert metrics.average_precision(labels, scores) == 1.0
    assert metrics.fpr_at_tpr(labels, scores) == 0.0
    assert metrics.tpr_at_fpr(labels, scores) == 1.0
    assert metrics.aurc(labels, scores) == pytest.approx(np.mean([0, 0, 0, 1 / 4, 2 / 5]))
    assert metrics.auroc(labels, -scores) == 0.0


@pytest.mark.parametrize(
    "labels, scores, reason",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "anomalous"),
        ([0, 0, 0], [0.1, 0.2, 0.3], "normal"),
        ([0, 1, 0], [0.1, float("nan"), 0.3], "NaN"),
        ([0, 1, 0], [0.5, 0.5, 0.5], "equal"),
    ],
)
def test_degenerate_inputs_give_nan_and_warning_never_half(labels, scores, reason):
    for name, fn in metrics.METRICS.items():
        with pytest.warns(DegenerateMetricWarning, match=reason):
            value = fn(labels, scores)
        assert np.isnan(value), name
    with pytest.warns(DegenerateMetricWarning):
        lo, hi = metrics.bootstrap_ci(labels, scores)
    assert np.isnan(lo) and np.isnan(hi)
    with pytest.warns(DegenerateMetricWarning):
        result = metrics.evaluate(labels, scores, n_resamples=10)
    assert np.isnan(result["auroc"]) and np.isnan(result["auroc_ci"][0])


@pytest.mark.parametrize(
    "labels, scores",
    [
        ([0, 2, 1], [0.1, 0.2, 0.3]),  # not binary
        ([0, 1], [0.1, 0.2, 0.3]),  # lengths differ
        ([], []),  # empty
        ([[0, 1]], [[0.1, 0.2]]),  # 2-D
    ],
)
def test_malformed_inputs_raise(labels, scores):
    with pytest.raises(MadlensError):
        metrics.auroc(labels, scores)


def test_fraction_arguments_checked():
    labels, scores = _random_case(0)
    with pytest.raises(MadlensError):
        metrics.fpr_at_tpr(labels, scores, tpr=1.5)
    with pytest.raises(MadlensError):
        metrics.bootstrap_ci(labels, scores, confidence=1.0)
    with pytest.raises(MadlensError):
        metrics.bootstrap_ci(labels, scores, metric="accuracy")


def test_bootstrap_matches_explicit_stratified_resampling():
    """The count-reweighting bootstrap equals resampling examples and calling sklearn."""
    labels, scores = _random_case(7, n=120, n_levels=5)
    n_resamples, seed = 200, 11
    lo, hi = metrics.bootstrap_ci(labels, scores, "auroc", n_resamples=n_resamples, seed=seed)

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pos_draws = pos[rng.integers(0, len(pos), size=(n_resamples, len(pos)))]
    neg_draws = neg[rng.integers(0, len(neg), size=(n_resamples, len(neg)))]
    values = [
        roc_auc_score(labels[np.r_[p, n]], scores[np.r_[p, n]])
        for p, n in zip(pos_draws, neg_draws, strict=True)
    ]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    labels, scores = _random_case(1, n=400)
    a = metrics.bootstrap_ci(labels, scores, "ap", seed=5)
    assert a == metrics.bootstrap_ci(labels, scores, "ap", seed=5)
    assert a != metrics.bootstrap_ci(labels, scores, "ap", seed=6)
    assert a[0] < metrics.average_precision(labels, scores) < a[1]
    narrow = metrics.bootstrap_ci(labels, scores, "ap", confidence=0.5)
    assert a[0] < narrow[0] < narrow[1] < a[1]


def test_bootstrap_with_a_callable_metric():
    labels, scores = _random_case(2, n=300)
    lo, hi = metrics.bootstrap_ci(labels, scores, roc_auc_score, n_resamples=300)
    vec_lo, vec_hi = metrics.bootstrap_ci(labels, scores, "auroc", n_resamples=300)
    # different random draws, same sampling distribution
    assert lo == pytest.approx(vec_lo, abs=0.03) and hi == pytest.approx(vec_hi, abs=0.03)


def test_evaluate_row_matches_the_single_metrics():
    labels, scores = _random_case(4, n=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = metrics.evaluate(labels, scores, n_resamples=300, seed=3)
    assert row["auroc"] == pytest.approx(metrics.auroc(labels, scores))
    assert row["ap"] == pytest.approx(metrics.average_precision(labels, scores))
    assert row["fpr_at_95tpr"] == pytest.approx(metrics.fpr_at_tpr(labels, scores))
    assert row["tpr_at_1fpr"] == pytest.approx(metrics.tpr_at_fpr(labels, scores))
    assert row["aurc"] == pytest.approx(metrics.aurc(labels, scores))
    assert row["auroc_ci"] == pytest.approx(
        list(metrics.bootstrap_ci(labels, scores, "auroc", n_resamples=300, seed=3))
    )
    assert row["n_normal"] == int((labels == 0).sum())
    assert row["n_anomalous"] == int(labels.sum())
    for name in metrics.METRICS:
        lo, hi = row[f"{name}_ci"]
        assert lo <= hi


# --- property tests ------------------------------------------------------------------------------

binary_cases = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < n),
        st.lists(st.integers(-6, 6), min_size=n, max_size=n).filter(lambda s: len(set(s)) > 1),
    )
)


@settings(max_examples=150, deadline=None)
@given(binary_cases)
def test_reversed_scores_give_one_minus_auroc(case):
    labels, scores = np.array(case[0]), np.array(case[1], dtype=float)
    assert metrics.auroc(labels, -scores) == pytest.approx(1 - metrics.auroc(labels, scores))
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


@settings(max_examples=150, deadline=None)
@given(binary_cases, st.sampled_from(["exp", "affine", "arctan", "cube"]))
def test_metrics_invariant_to_strictly_increasing_transforms(case, transform):
    labels, scores = np.array(case[0]), np.array(case[1], dtype=float)
    f = {
        "exp": lambda s: np.exp(s / 3.0),
        "affine": lambda s: 7.0 * s - 2.0,
        "arctan": np.arctan,
        "cube": lambda s: s**3,
    }[transform]
    for name, fn in metrics.METRICS.items():
        assert fn(labels, f(scores)) == pytest.approx(fn(labels, scores)), name


@settings(max_examples=100, deadline=None)
@given(binary_cases)
def test_metric_ranges_and_ap_matches_sklearn(case):
    labels, scores = np.array(case[0]), np.array(case[1], dtype=float)
    for fn in metrics.METRICS.values():
        assert 0.0 <= fn(labels, scores) <= 1.0
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores)
    )
    # AURC is at least the risk of a perfect ranking, at most that of the worst one
    ordered = np.sort(labels)
    best = metrics.aurc(ordered, np.arange(len(ordered)))
    worst = metrics.aurc(ordered[::-1], np.arange(len(ordered)))
    assert best - 1e-12 <= metrics.aurc(labels, scores) <= worst + 1e-12


def _tpr_at_1fpr_brute_force(labels, scores):
    """The largest share of anomalies flagged by any threshold that flags at most 1% of the
    normal examples (a threshold above every score flags nothing)."""
    best = 0.0
    for t in np.r_[np.unique(scores), np.inf]:
        flagged = scores >= t
        if flagged[labels == 0].mean() <= 0.01:
            best = max(best, flagged[labels == 1].mean())
    return best


@pytest.mark.parametrize("n_levels", [None, 4])
def test_recall_at_1pct_fpr_ci_equals_a_brute_force_bootstrap(n_levels):
    labels, scores = _random_case(5, n=300, n_levels=n_levels)
    scores = scores + 1.5 * labels  # a useful detector: recall at 1% FPR well above 0
    n_resamples, seed = 150, 2
    row = metrics.evaluate(labels, scores, n_resamples=n_resamples, seed=seed)

    rng = np.random.default_rng(seed)  # stratified: anomalous drawn first, then normal
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pos_draws = pos[rng.integers(0, len(pos), size=(n_resamples, len(pos)))]
    neg_draws = neg[rng.integers(0, len(neg), size=(n_resamples, len(neg)))]
    values = [
        _tpr_at_1fpr_brute_force(labels[np.r_[p, n]], scores[np.r_[p, n]])
        for p, n in zip(pos_draws, neg_draws, strict=True)
    ]
    assert row["tpr_at_1fpr"] == pytest.approx(_tpr_at_1fpr_brute_force(labels, scores))
    assert row["tpr_at_1fpr_ci"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])))
    lo, hi = row["tpr_at_1fpr_ci"]
    assert 0 < lo < row["tpr_at_1fpr"] < hi < 1
