"""The exclusion probe (exclusion fine-tuning's aggregate head, on frozen activations): its
scores against scikit-learn's logistic regression, and a planted measurement-tampering world
in which leaving the untrusted all-positive inputs out is what makes it work."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import madlens.detectors as D
from madlens.errors import MadlensError
from madlens.metrics import auroc

D_MODEL = 12


def _world(seed: int, n: int = 200):
    """Activations of a vault world. Orthonormal directions: `real` (the diamond is there)
    and one per sensor (it reads positive). Trusted episodes have no tampering, so the sensors
    read positive exactly when the diamond is there. Untrusted: real positives, fake positives
    (diamond gone, all three sensors tampered), and partial tamperings (1-2 sensors, diamond
    gone: some reading negative). Returns trusted, measured trusted, untrusted, measured
    untrusted, and the test rows (real positives, then fakes)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(D_MODEL, D_MODEL)))
    real, sensors = basis[:, 0], basis[:, 1:4]

    def rows(present, on):
        noise = 0.5 * rng.normal(size=(len(present), D_MODEL))
        return 2.0 * present[:, None] * real + 2.0 * on @ sensors.T + noise + 3.0

    present = rng.random(n) < 0.5
    trusted = rows(present.astype(float), np.repeat(present[:, None], 3, 1).astype(float))
    real_pos = rows(np.ones(n), np.ones((n, 3)))
    fake = rows(np.zeros(n), np.ones((n, 3)))
    partial = np.zeros((n, 3))
    for i in range(n):
        partial[i, rng.choice(3, size=rng.integers(1, 3), replace=False)] = 1.0
    partial_rows = rows(np.zeros(n), partial)
    untrusted = np.concatenate([real_pos, fake, partial_rows])
    measured_u = np.r_[np.ones(2 * n), np.zeros(n)]
    return trusted, present, untrusted, measured_u, np.concatenate([real_pos, fake])


LABELS = np.r_[np.zeros(200), np.ones(200)]


def test_scores_are_minus_scikit_learns_logit_on_the_rows_it_keeps():
    trusted, m_t, untrusted, m_u, test = _world(0)
    probe = D.ExclusionProbe(C=0.5).fit(trusted, untrusted, measured=(m_t, m_u))
    kept = np.concatenate([trusted, untrusted[m_u == 0]])
    y = np.r_[m_t, m_u[m_u == 0]]
    mean, scale = kept.mean(0), kept.std(0)
    reference = LogisticRegression(C=0.5, class_weight="balanced", max_iter=1000)
    reference.fit((kept - mean) / scale, y)
    expected = -reference.decision_function((test - mean) / scale)
    np.testing.assert_allclose(probe.score(test), expected, rtol=1e-6, atol=1e-8)
    assert probe.n_excluded_ == int(m_u.sum())


def test_it_flags_tampered_positives_and_needs_the_exclusion():
    trusted, m_t, untrusted, m_u, test = _world(0)
    score = D.ExclusionProbe().fit(trusted, untrusted, measured=(m_t, m_u)).score(test)
    # score > 0: the head does not call the input all-positive (minus its logit)
    assert auroc(LABELS, score) > 0.95
    assert (score[200:] > 0).mean() > 0.8 and (score[:200] > 0).mean() < 0.05
    # The controls that show it could fail. Trained on every row with its measurement (no
    # exclusion), the head calls most fakes positive, and ranks them worse:
    x, y = np.concatenate([trusted, untrusted]), np.r_[m_t, m_u]
    mean, scale = x.mean(0), x.std(0)
    naive = LogisticRegression(class_weight="balanced", max_iter=1000).fit((x - mean) / scale, y)
    naive_score = -naive.decision_function((test - mean) / scale)
    assert (naive_score[200:] < 0).mean() > 0.85 and auroc(LABELS, naive_score) < 0.9
    # Without untrusted negatives (the partial tamperings), the trusted data alone, where
    # sensors and diamond always agree, does not tell the head which to read:
    alone = D.ExclusionProbe().fit(trusted, test, measured=(m_t, np.ones(len(test)))).score(test)
    assert (alone[200:] < 0).mean() > 0.9 and auroc(LABELS, alone) < 0.9


def test_bad_measurements_fail_in_one_line():
    trusted, m_t, untrusted, m_u, _ = _world(2, n=20)
    with pytest.raises(MadlensError, match="both all-positive and negative"):
        D.ExclusionProbe().fit(trusted, untrusted, measured=(np.ones(20), np.ones(60)))
    with pytest.raises(MadlensError, match="1 \\(all measurements positive\\) or 0"):
        D.ExclusionProbe().fit(trusted, untrusted, measured=(m_t * 2, m_u))
    with pytest.raises(MadlensError, match="measured must be"):
        D.ExclusionProbe().fit(trusted, untrusted, measured=m_t)
