"""CCS and its baselines: the loss by hand, a planted truth direction, sign fixing, and the
bench detectors `ccs` / `crc-tpc`."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from madlens.detectors import ContrastPairs, get_detector
from madlens.detectors.ccs import (
    CCS,
    accuracy,
    ccs_loss,
    crc_tpc_direction,
    normalize,
    random_direction,
    sign_fixed,
)


def _cos(a, b):
    return abs(float(a @ b)) / (np.linalg.norm(a) * np.linalg.norm(b))


def _planted(n=300, d=32, seed=1):
    """Pairs whose sides differ by a constant "True"/"False" offset, a shared per-statement
    content vector (large), and +-u by the statement's truth."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    labels = rng.integers(0, 2, n)
    sign = (2 * labels - 1)[:, None]
    content = rng.standard_normal((n, d)) * 2.0
    offset = rng.standard_normal(d) * 3.0
    pos = content + offset + 2 * sign * u + 0.3 * rng.standard_normal((n, d))
    neg = content - offset - 2 * sign * u + 0.3 * rng.standard_normal((n, d))
    return pos, neg, labels, u


def test_loss_equals_a_hand_computation():
    p_pos, p_neg = np.array([0.9, 0.2, 0.6]), np.array([0.3, 0.7, 0.5])
    # pair 1: (0.9 - 0.7)^2 + 0.3^2 = 0.04 + 0.09; pair 2: (0.2 - 0.3)^2 + 0.2^2 = 0.01 + 0.04;
    # pair 3: (0.6 - 0.5)^2 + 0.5^2 = 0.01 + 0.25
    assert ccs_loss(p_pos, p_neg) == pytest.approx((0.13 + 0.05 + 0.26) / 3)
    torch_loss = ccs_loss(torch.tensor(p_pos), torch.tensor(p_neg))
    assert float(torch_loss) == pytest.approx((0.13 + 0.05 + 0.26) / 3)


def test_normalize_centres_each_side_and_optionally_scales():
    x = np.random.default_rng(0).normal(3.0, 5.0, size=(50, 4))
    assert np.allclose(normalize(x).mean(0), 0)
    assert np.allclose(normalize(x, var_normalize=True).std(0), 1, atol=1e-6)


def test_ccs_recovers_a_planted_truth_direction_and_random_does_not():
    pos, neg, labels, u = _planted()
    probe = CCS(n_tries=5, n_epochs=1000, lr=1e-2).fit(pos, neg)
    assert _cos(probe.direction_, u) > 0.9
    assert probe.loss_ == pytest.approx(probe.losses_.min())
    assert sign_fixed(accuracy(probe.predict(pos, neg), labels)) > 0.95
    assert _cos(crc_tpc_direction(pos, neg), u) > 0.9
    assert _cos(random_direction(len(u), seed=7), u) < 0.5


def test_sign_fixed_and_unfixed_accuracies():
    pos, neg, labels, _ = _planted(n=200, seed=2)
    probe = CCS(n_tries=3, n_epochs=300, lr=1e-2).fit(pos, neg)
    p = probe.predict(pos, neg)
    acc = accuracy(p, labels)
    assert sign_fixed(acc) == max(acc, 1 - acc) >= 0.5
    # the flipped probe predicts 1 - p: its unfixed accuracy is 1 - acc, same sign-fixed one
    flipped = accuracy(1 - p, labels)
    assert flipped == pytest.approx(1 - acc)
    assert sign_fixed(flipped) == pytest.approx(sign_fixed(acc))
    assert accuracy(labels.astype(float), labels) == 1.0 and sign_fixed(0.3) == 0.7


def test_same_seed_same_probe():
    pos, neg, _, _ = _planted(n=60, d=8)
    a = CCS(n_tries=2, n_epochs=50).fit(pos, neg)
    b = CCS(n_tries=2, n_epochs=50).fit(pos, neg)
    assert np.array_equal(a.direction_, b.direction_)


@pytest.mark.parametrize("name", ["ccs", "crc-tpc"])
def test_bench_detectors_flag_false_answers_oriented_by_trusted(name):
    # Task-style pairs: the positive side is always the true answer (the detector shuffles).
    rng = np.random.default_rng(3)
    d, u = 16, np.eye(16)[0]
    content = rng.standard_normal((200, d))
    true_side, false_side = content + 2 * u, content - 2 * u
    trusted = rng.standard_normal((50, d)) + 2 * u  # truthful answers
    test = np.concatenate(
        [rng.standard_normal((40, d)) + 2 * u, rng.standard_normal((40, d)) - 2 * u]
    )
    labels = np.r_[np.zeros(40), np.ones(40)]
    det = get_detector(name, seed=0).fit(trusted, contrast=ContrastPairs(true_side, false_side))
    scores = det.score(test)
    assert roc_auc_score(labels, scores) > 0.95
    if name == "ccs":
        assert np.all((0 <= scores) & (scores <= 1))
