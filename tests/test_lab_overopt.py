"""`overoptimization` and `reward-outliers`: the best-of-n estimator against brute force, the
KL_bon closed form against numerical integration, the R(d) fit against synthetic data and
scipy, the sampler's activations against a plain forward pass, and tiny-test runs."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import curve_fit

from madlens.errors import MadlensError
from madlens.lab import overoptimization as ovo
from madlens.lab import reward_outliers as ro

TINY = ovo.Budget(
    prompts=2,
    samples=8,
    new_tokens=3,
    proxy_labels=(4, 8),
    ns=(1, 2, 4, 8),
    bootstrap=20,
    trusted_per_prompt=4,
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    return tmp_path


def brute_force_best_of_n(select, rewards, n):
    """Mean reward of the argmax-`select` sample over every size-n subset of the pool."""
    picked = [rewards[max(subset, key=lambda i: select[i])]
              for subset in itertools.combinations(range(len(select)), n)]  # fmt: skip
    return float(np.mean(picked))


def test_best_of_n_equals_enumeration_over_all_subsets():
    rng = np.random.default_rng(0)
    select, rewards = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    ns = tuple(range(1, 8))
    got = ovo.best_of_n(select, rewards, ns)
    want = [[brute_force_best_of_n(s, r, n) for n in ns] for s, r in zip(select, rewards)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # n = 1 is the pool mean, n = pool the argmax
    np.testing.assert_allclose(got[:, 0], rewards.mean(1))
    np.testing.assert_allclose(got[:, -1], rewards[np.arange(3), select.argmax(1)])


def test_bon_weights_are_a_distribution_at_large_pools():
    for n in (1, 2, 17, 255, 256):
        w = ovo.bon_weights(256, n)
        assert w.min() >= 0 and math.isclose(w.sum(), 1.0, rel_tol=1e-9)
        assert np.all(w[: n - 1] == 0)
    np.testing.assert_allclose(ovo.bon_weights(256, 1), np.full(256, 1 / 256))
    # P(rank pool is the max of 2) = 2 / pool
    assert math.isclose(ovo.bon_weights(256, 2)[-1], 2 / 256, rel_tol=1e-9)
    with pytest.raises(MadlensError):
        ovo.bon_weights(8, 9)


@pytest.mark.parametrize("n", [1, 2, 4, 16, 256])
def test_kl_bon_matches_numerical_kl_of_the_max_of_n(n):
    # best-of-n of a continuous score has the density n u^(n-1) on the policy's quantile u
    def integrand(u):
        p = n * u ** (n - 1)
        return p * math.log(p) if p > 0 else 0.0

    numeric, _ = quad(integrand, 0, 1, limit=200)
    assert float(ovo.kl_bon(n)) == pytest.approx(numeric, abs=1e-6)
    assert float(ovo.kl_bon(n)) == pytest.approx(math.log(n) - (n - 1) / n)


def test_kl_bon_known_values():
    np.testing.assert_allclose(ovo.kl_bon(np.array([1, 2, 256])),
                               [0.0, math.log(2) - 0.5, 8 * math.log(2) - 255 / 256])  # fmt: skip


def test_fit_rd_recovers_alpha_beta_from_synthetic_data():
    rng = np.random.default_rng(1)
    d = np.sqrt(ovo.kl_bon(np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096])))
    alpha, beta = 0.8, 0.3
    reward = d * (alpha - beta * d) + rng.normal(0, 0.005, size=len(d))
    got = ovo.fit_rd(d, reward)
    assert got == pytest.approx((alpha, beta), abs=0.02)
    (ref_a, ref_b), _ = curve_fit(lambda x, a, b: x * (a - b * x), d, reward, p0=(0.0, 0.0))
    assert got == pytest.approx((ref_a, ref_b), rel=1e-6)


def test_gold_reward_reads_sentiment():
    gold = ovo.gold_reward(["What a wonderful, lovely day!", "This is awful and I hate it.", "x"])
    assert gold[0] > 0.5 and gold[1] < -0.5 and gold[2] == 0.0


def test_sample_pool_activations_equal_a_plain_forward(tiny_hf):
    from madlens.data import format_chat
    from madlens.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    pool = ovo.sample_pool(tiny_hf, tokenizer, ["Hello there", "Say hi"], 5, 6, 0, seed=3)
    assert pool["tokens"].shape == (2, 5, 6) and pool["acts"].shape == (2, 5, 64)
    eos = tokenizer.eos_token_id
    for p, prompt in enumerate(["Hello there", "Say hi"]):
        text = format_chat(tokenizer, [{"role": "user", "content": prompt}])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for s in range(5):
            tokens = pool["tokens"][p, s].tolist()
            n = pool["lengths"][p, s]
            assert tokens[0] != eos  # never an empty completion
            assert n == (tokens.index(eos) if eos in tokens else len(tokens))
            with torch.inference_mode():
                out = tiny_hf(torch.tensor([ids + tokens]), output_hidden_states=True)
            want = out.hidden_states[1][0, len(ids) : len(ids) + n].mean(0).numpy()
            np.testing.assert_allclose(pool["acts"][p, s], want, rtol=1e-4, atol=1e-5)


def test_outlier_labels_are_the_largest_gaps():
    proxy = np.arange(100.0)
    gold = np.zeros(100)
    gold[:50] = 1.0
    labels = ro.outlier_labels(proxy, gold, share=0.02)
    assert labels.sum() == 2 and labels[[98, 99]].all()


def test_bad_budget_is_one_line(home):
    with pytest.raises(MadlensError, match="best-of-n sizes"):
        ovo.measure("tiny-test", ovo.Budget(samples=8, ns=(1, 16)))
    with pytest.raises(MadlensError, match="prompts"):
        ovo.measure("tiny-test", ovo.Budget(prompts=1))


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_tiny_runs_return_finite_figures_and_reuse_the_pool(home):
    result = ovo.measure("tiny-test", TINY, seed=0, device="cpu")
    figures = result.figures
    assert not figures["pool_cached"]
    assert figures["n"] == [1, 2, 4, 8] and set(figures["proxies"]) == {"4", "8"}
    assert all(math.isfinite(x) for x in _numbers(figures))
    for row in figures["proxies"].values():
        assert row["gold"][0] == 0.0 and row["proxy"][0] == pytest.approx(0.0, abs=1e-12)
        # best-of-n by the proxy can only raise the proxy's own expected score
        assert np.all(np.diff(row["proxy"]) >= -1e-12)
    assert result.sections and result.verdict
    outliers = ro.measure("tiny-test", TINY, seed=0, device="cpu")
    assert outliers.figures["pool_cached"]
    for row in outliers.figures["proxies"].values():
        assert row["n_test"] == 2 * (8 - 4) and row["n_outliers"] == 1
        assert set(ro.DETECTOR_NAMES) <= set(row["detectors"])
    assert all(math.isfinite(x) for x in _numbers(outliers.figures["best"]["auroc"]))
