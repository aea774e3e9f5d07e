"""Every registered detector separates a planted anomaly in synthetic data (AUROC > 0.95)."""

import numpy as np
import pytest

import madlens.detectors as D
from madlens.metrics import auroc

D_MODEL = 16
N_TRUSTED, N_TEST = 1000, 200  # N_TEST normal + N_TEST anomalous test rows
LABELS = np.r_[np.zeros(N_TEST), np.ones(N_TEST)]


def _base(rng, n):
    """Correlated Gaussian activations with a large common offset, like a residual stream."""
    mixing = np.diag(np.linspace(0.5, 1.5, D_MODEL))
    return rng.normal(size=(n, D_MODEL)) @ mixing + 4.0


def mean_shift(rng):
    trusted, normal, anomalous = _base(rng, N_TRUSTED), _base(rng, N_TEST), _base(rng, N_TEST)
    direction = rng.normal(size=D_MODEL)
    anomalous += 3.0 * direction / np.linalg.norm(direction) * np.sqrt(D_MODEL) / 2
    return trusted, normal, anomalous


def rare_direction(rng):
    """Trusted activations lie near a 4-dimensional subspace; anomalies step off it."""
    basis, _ = np.linalg.qr(rng.normal(size=(D_MODEL, D_MODEL)))
    on, off = basis[:, :4], basis[:, 4]

    def draw(n):
        return rng.normal(size=(n, 4)) @ on.T + 0.05 * rng.normal(size=(n, D_MODEL)) + 2.0

    trusted, normal, anomalous = draw(N_TRUSTED), draw(N_TEST), draw(N_TEST)
    anomalous += 2.0 * off
    return trusted, normal, anomalous


def low_rank_spike(rng):
    """Anomalies carry +-4 along one direction: variance the trusted set never shows."""
    trusted, normal, anomalous = _base(rng, N_TRUSTED), _base(rng, N_TEST), _base(rng, N_TEST)
    direction = rng.normal(size=D_MODEL)
    signs = rng.choice([-1.0, 1.0], size=(N_TEST, 1))
    anomalous += 4.0 * signs * direction / np.linalg.norm(direction)
    return trusted, normal, anomalous


SCENARIOS = {
    "mahalanobis": mean_shift,
    "knn": rare_direction,
    "que": low_rank_spike,
    "spectral": low_rank_spike,
    "lof": rare_direction,
    "isolation-forest": mean_shift,
    "pca-residual": rare_direction,
    "defection-probe": mean_shift,
    "mass-mean-probe-skyline": mean_shift,
    "logistic-probe-skyline": mean_shift,
    "ccs": mean_shift,
    "crc-tpc": mean_shift,
    "sae-recon": rare_direction,
    "sae-rare": rare_direction,
}


def test_every_activation_detector_has_a_scenario():
    activation = {n for n, c in D.DETECTORS.items() if c.input_kind == "activations"}
    assert activation == set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("multi_hook", [False, True])
def test_activation_detector_separates_planted_anomaly(name, multi_hook):
    rng = np.random.default_rng(sorted(SCENARIOS).index(name))
    trusted, normal, anomalous = SCENARIOS[name](rng)
    test = np.concatenate([normal, anomalous])
    fit_inputs = {}
    if "labels" in D.DETECTORS[name].fit_requires():
        fit_inputs["labels"] = LABELS
    if "contrast" in D.DETECTORS[name].fit_requires():
        # 8 contrast pairs whose "yes" side differs by the same direction as the anomalies
        pairs = _base(rng, 8)
        shift = anomalous.mean(0) - normal.mean(0)
        fit_inputs["contrast"] = D.ContrastPairs(positive=pairs + shift, negative=pairs)
    if multi_hook:
        # a second hook that only carries noise, at another scale: aggregation must cope
        noise = rng.normal(size=(N_TRUSTED + 2 * N_TEST, D_MODEL)) * 100 + 7
        trusted = {
            "blocks.0.hook_resid_post": noise[:N_TRUSTED],
            "blocks.1.hook_resid_post": trusted,
        }
        test = {"blocks.0.hook_resid_post": noise[N_TRUSTED:], "blocks.1.hook_resid_post": test}
        if "contrast" in fit_inputs:
            pairs = fit_inputs["contrast"]
            fit_inputs["contrast"] = D.ContrastPairs(
                positive={
                    "blocks.0.hook_resid_post": noise[:8],
                    "blocks.1.hook_resid_post": pairs.positive,
                },
                negative={
                    "blocks.0.hook_resid_post": noise[8:16],
                    "blocks.1.hook_resid_post": pairs.negative,
                },
            )
    det = D.get_detector(name).fit(trusted, test, **fit_inputs)
    score = det.score(test)
    assert score.shape == (2 * N_TEST,)
    threshold = 0.8 if multi_hook else 0.95  # a pure-noise hook dilutes the mean
    assert auroc(LABELS, score) > threshold, name


def _peaked_and_flat_logits(rng, n=200, vocab=50):
    normal = rng.normal(size=(n, vocab))
    normal[np.arange(n), rng.integers(0, vocab, n)] += 8.0  # confident
    anomalous = rng.normal(size=(n, vocab))  # uncertain
    return np.concatenate([normal, anomalous]).astype(np.float32)


@pytest.mark.parametrize("name", ["msp", "max-logit", "energy", "entropy"])
def test_logit_detectors_flag_uncertain_outputs(name):
    rng = np.random.default_rng(0)
    logits = _peaked_and_flat_logits(rng)
    stats = D.OutputStats(logits=logits)
    det = D.get_detector(name).fit(D.OutputStats(logits=_peaked_and_flat_logits(rng)[:200]))
    assert auroc(LABELS, det.score(stats)) > 0.95


def test_perplexity_flags_unlikely_text_and_windowed_perplexity_a_gibberish_burst():
    rng = np.random.default_rng(1)

    def fluent(n):
        return -rng.exponential(1.0, size=n)

    fluent_texts = [fluent(rng.integers(40, 80)) for _ in range(N_TEST)]
    unlikely = [fluent(rng.integers(40, 80)) * 2.0 for _ in range(N_TEST)]
    stats = D.OutputStats(token_logprobs=fluent_texts + unlikely)
    assert auroc(LABELS, D.Perplexity().fit(stats).score(stats)) > 0.95

    # a 10-token adversarial suffix of very unlikely tokens inside otherwise fluent text
    burst = []
    for _ in range(N_TEST):
        seq = fluent(rng.integers(60, 100))
        start = rng.integers(0, len(seq) - 20)
        seq[start : start + 20] -= 4.0
        burst.append(seq)
    stats = D.OutputStats(token_logprobs=fluent_texts + burst)
    windowed = auroc(LABELS, D.WindowedPerplexity().score(stats))
    assert windowed > 0.95
    assert windowed >= auroc(LABELS, D.Perplexity().score(stats))
