"""Every registered detector separates a planted anomaly in synthetic data (AUROC > 0.95).

Detectors fitted on contrast pairs get pairs drawn apart from the test set (their own rows,
their own draw of a generic direction that only partly shares the anomaly's direction), never
the test set's own mean difference; a control checks that unrelated pairs fail."""

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


def _unit(v):
    return v / np.linalg.norm(v)


def mean_shift(rng):
    trusted, normal, anomalous = _base(rng, N_TRUSTED), _base(rng, N_TEST), _base(rng, N_TEST)
    direction = _unit(rng.normal(size=D_MODEL))
    anomalous += 3.0 * direction * np.sqrt(D_MODEL) / 2
    return trusted, normal, anomalous, direction


def rare_direction(rng):
    """Trusted activations lie near a 4-dimensional subspace; anomalies step off it."""
    basis, _ = np.linalg.qr(rng.normal(size=(D_MODEL, D_MODEL)))
    on, off = basis[:, :4], basis[:, 4]

    def draw(n):
        return rng.normal(size=(n, 4)) @ on.T + 0.05 * rng.normal(size=(n, D_MODEL)) + 2.0

    trusted, normal, anomalous = draw(N_TRUSTED), draw(N_TEST), draw(N_TEST)
    anomalous += 2.0 * off
    return trusted, normal, anomalous, off


def low_rank_spike(rng):
    """Anomalies carry +-4 along one direction: variance the trusted set never shows."""
    trusted, normal, anomalous = _base(rng, N_TRUSTED), _base(rng, N_TEST), _base(rng, N_TEST)
    direction = _unit(rng.normal(size=D_MODEL))
    signs = rng.choice([-1.0, 1.0], size=(N_TEST, 1))
    anomalous += 4.0 * signs * direction
    return trusted, normal, anomalous, direction


SCENARIOS = {
    "mahalanobis": mean_shift,
    "knn": rare_direction,
    "que": low_rank_spike,
    "spectral": low_rank_spike,
    "lof": rare_direction,
    "isolation-forest": mean_shift,
    "pca-residual": rare_direction,
    "defection-probe": mean_shift,
    "exclusion-probe": mean_shift,
    "refusal-direction": mean_shift,
    "mass-mean-probe-skyline": mean_shift,
    "logistic-probe-skyline": mean_shift,
    "ccs": mean_shift,
    "crc-tpc": mean_shift,
    "sae-recon": rare_direction,
    "sae-rare": rare_direction,
}


def generic_contrast(seed, concept, alignment=0.6, n_pairs=8, scale=4.0, noise=0.3):
    """Contrast pairs drawn on their own: fresh rows (not the test set's), the two sides of a
    pair one row apart by `scale` times a generic direction g plus independent noise on each
    side. g's cosine with the planted `concept` is `alignment`, the rest an independent
    random direction: the pairs carry a partial copy of the anomaly's direction, as generic
    yes/no questions carry a model's "defection" direction; with alignment 0 none of it."""
    rng = np.random.default_rng(1000 + seed)
    other = rng.normal(size=D_MODEL)
    other = _unit(other - (other @ concept) * concept)
    generic = alignment * concept + np.sqrt(1 - alignment**2) * other
    rows = _base(rng, n_pairs)
    positive = rows + scale * generic + noise * rng.normal(size=rows.shape)
    negative = rows + noise * rng.normal(size=rows.shape)
    return D.ContrastPairs(positive=positive, negative=negative)


def contrast_for(name, seed, concept, alignment=0.6):
    """8 generic pairs for the defection probe (as the bench asks 8 generic questions); 32 for
    the task-pair probes (CCS, CRC-TPC), which are fitted on a task's many pairs and need more
    pairs than dimensions to pin a direction down."""
    n_pairs = 32 if D.DETECTORS[name].contrast_source == "task" else 8
    return generic_contrast(seed, concept, alignment, n_pairs=n_pairs)


def test_every_activation_detector_has_a_scenario():
    activation = {n for n, c in D.DETECTORS.items() if c.input_kind == "activations"}
    assert activation == set(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("multi_hook", [False, True])
def test_activation_detector_separates_planted_anomaly(name, multi_hook):
    seed = sorted(SCENARIOS).index(name)
    rng = np.random.default_rng(seed)
    trusted, normal, anomalous, concept = SCENARIOS[name](rng)
    test = np.concatenate([normal, anomalous])
    fit_inputs = {}
    if "labels" in D.DETECTORS[name].fit_requires():
        fit_inputs["labels"] = LABELS
    if "contrast" in D.DETECTORS[name].fit_requires():
        fit_inputs["contrast"] = contrast_for(name, seed, concept)
    if "measured" in D.DETECTORS[name].fit_requires():
        # A trusted row's measurements all read positive when it sits below the trusted mean
        # along the concept; every test row reads positive (so all are excluded): the
        # anomalies, far along the concept, are positives the head cannot explain.
        fit_inputs["measured"] = ((trusted - trusted.mean(0)) @ concept < 0, np.ones(len(test)))
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
            n = len(pairs.positive)
            fit_inputs["contrast"] = D.ContrastPairs(
                positive={
                    "blocks.0.hook_resid_post": noise[:n],
                    "blocks.1.hook_resid_post": pairs.positive,
                },
                negative={
                    "blocks.0.hook_resid_post": noise[n : 2 * n],
                    "blocks.1.hook_resid_post": pairs.negative,
                },
            )
    det = D.get_detector(name).fit(trusted, test, **fit_inputs)
    score = det.score(test)
    assert score.shape == (2 * N_TEST,)
    threshold = 0.8 if multi_hook else 0.95  # a pure-noise hook dilutes the mean
    assert auroc(LABELS, score) > threshold, name


# CCS is left out: its direction is only ~0.75 aligned with the pairs' own (the rest follows
# the rows' spread), so with unrelated pairs it still lands near the anomaly by chance at
# some seeds; the defection probe, the refusal direction and CRC-TPC take the pairs'
# direction exactly.
@pytest.mark.parametrize("name", ["crc-tpc", "defection-probe", "refusal-direction"])
def test_contrast_pairs_without_the_anomaly_direction_do_not_separate_it(name):
    """The control that shows the planted test could fail: pairs drawn the same way but along
    a direction orthogonal to the anomaly's give a chance-level AUROC."""
    seed = sorted(SCENARIOS).index(name)
    trusted, normal, anomalous, concept = SCENARIOS[name](np.random.default_rng(seed))
    test = np.concatenate([normal, anomalous])
    contrast = contrast_for(name, seed, concept, alignment=0.0)
    score = D.get_detector(name).fit(trusted, test, contrast=contrast).score(test)
    assert abs(auroc(LABELS, score) - 0.5) < 0.2, name


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
