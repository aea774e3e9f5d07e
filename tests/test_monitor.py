"""`madlens.Monitor`: split-conformal calibration checked against its closed form and a
brute-force count, the realised false-positive rate on fresh normal inputs, save / load,
the fingerprint check, the Bonferroni rule, the contributing hook, bad input, and the CLI."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from madlens import Monitor
from madlens.data import write_jsonl
from madlens.data.generators import english_questions
from madlens.errors import MadlensError
from madlens.monitor import Features, conformal

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def prompts():
    """900 distinct questions in a random order (the generator's own order is not
    exchangeable: it walks its templates in turn)."""
    questions = english_questions(900, seed=11)
    random.Random(0).shuffle(questions)
    return [[{"role": "user", "content": q}] for q in questions]


# --- the conformal rules -----------------------------------------------------------------------

ALPHAS = st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.37, 0.5])
SCORES = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=150)  # ties on purpose


@settings(max_examples=200, deadline=None, derandomize=True)
@given(SCORES, ALPHAS)
def test_threshold_is_the_smallest_score_covering_the_conformal_rank(cal, alpha):
    n = len(cal)
    need = (n + 1) * (1 - alpha)
    covering = [x for x in cal if sum(c <= x for c in cal) >= need - 1e-9]
    if not covering:  # no calibration score is high enough: too few for this alpha
        with pytest.raises(MadlensError, match="at least"):
            conformal.threshold(np.array(cal), alpha)
        assert n < conformal.min_calibration(alpha)
        return
    assert conformal.threshold(np.array(cal), alpha) == min(covering)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(SCORES, st.lists(st.integers(-6, 6).map(float), min_size=1, max_size=20), ALPHAS)
def test_p_value_counts_and_matches_the_threshold(cal, new, alpha):
    p = conformal.p_values(np.array(cal), np.array(new))
    brute = [(1 + sum(c >= s for c in cal)) / (len(cal) + 1) for s in new]
    np.testing.assert_allclose(p, brute)
    if len(cal) >= conformal.min_calibration(alpha):
        t = conformal.threshold(np.array(cal), alpha)
        assert list(p <= alpha + 1e-12) == [s > t for s in new]


def test_false_positive_rate_matches_the_closed_form():
    """Continuous exchangeable scores: P(flag) = 1 - ceil((n+1)(1-alpha)) / (n+1) <= alpha."""
    rng = np.random.default_rng(0)
    n, alpha, trials = 99, 0.05, 20_000
    flags = 0
    for _ in range(trials):
        cal = rng.standard_normal(n)
        flags += rng.standard_normal() > conformal.threshold(cal, alpha)
    exact = 1 - math.ceil((n + 1) * (1 - alpha)) / (n + 1)
    assert exact <= alpha + 1e-12
    low, high = stats.binom.interval(0.999, trials, exact)
    assert low <= flags <= high


def test_bonferroni_combination():
    p = np.array([[0.5, 0.01, 0.2], [0.03, 0.6, 0.9]])
    np.testing.assert_allclose(conformal.combine(p), [0.06, 0.02, 0.4])
    np.testing.assert_allclose(conformal.combine(np.array([[0.7, 0.2]])), [0.7, 0.2])
    assert conformal.combine(np.array([[0.9], [0.8]]))[0] == 1.0


# --- the monitor on tiny-test -----------------------------------------------------------------


def test_realised_false_positive_rate_on_fresh_normal_inputs(tiny, prompts):
    """Fit and calibrate on different random splits of 600 trusted prompts; the flag rate
    on 300 fresh prompts, pooled over the splits, lies in the binomial interval of alpha."""
    pool, fresh = prompts[:600], prompts[600:]
    alpha, seeds = 0.1, range(6)
    flags = 0
    for seed in seeds:
        monitor = Monitor(tiny, hooks=HOOKS, detectors=["mahalanobis"], holdout=0.5, seed=seed,
                          progress=False)  # fmt: skip
        monitor.fit(pool).calibrate(alpha)
        assert monitor.config()["n_calibration"] == 300
        flags += int(monitor.score(fresh).flagged.sum())
    trials = len(seeds) * len(fresh)
    low, high = stats.binom.interval(0.999, trials, alpha)
    assert low <= flags <= high, f"{flags} flags in {trials}"


def test_save_load_gives_identical_verdicts(tiny, prompts, tmp_path):
    monitor = Monitor(tiny, hooks=HOOKS, detectors=["mahalanobis", "knn", "perplexity"],
                      holdout=0.3, progress=False)  # fmt: skip
    monitor.fit(prompts[:200]).calibrate(0.05)
    before = monitor.score(prompts[600:700])
    monitor.save(tmp_path / "mon")
    files = sorted(p.relative_to(tmp_path / "mon").as_posix()
                   for p in (tmp_path / "mon").rglob("*") if p.is_file())  # fmt: skip
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # no pickle
    config = json.loads((tmp_path / "mon" / "monitor.json").read_text())
    assert config["model"]["fingerprint"] == tiny.fingerprint
    assert config["n_fit"] == 140 and config["n_calibration"] == 60
    assert config["hooks"] == HOOKS and config["fpr"] == 0.05
    loaded = Monitor.load(tmp_path / "mon", progress=False)  # loads tiny-test from its spec
    after = loaded.score(prompts[600:700])
    for name in monitor.detectors:
        np.testing.assert_array_equal(before.scores[name], after.scores[name])
        np.testing.assert_array_equal(before.p_values[name], after.p_values[name])
    np.testing.assert_array_equal(before.flagged, after.flagged)
    assert before.top_hook == after.top_hook
    assert before.thresholds == after.thresholds


def test_flags_follow_the_bonferroni_rule(tiny, prompts):
    monitor = Monitor(tiny, hooks=HOOKS, detectors=["mahalanobis", "knn"], holdout=0.5,
                      progress=False)  # fmt: skip
    monitor.fit(prompts[:400]).calibrate(0.1)
    noise = ["".join(random.Random(i).choices("#@!%&*~^", k=40)) for i in range(20)]
    verdict = monitor.score(prompts[600:680] + noise)
    p = np.stack([verdict.p_values[d] for d in monitor.detectors])
    np.testing.assert_allclose(verdict.combined_p, np.minimum(1, 2 * p.min(0)))
    # the same flag as: any detector above its own threshold at alpha / k
    above = np.zeros(len(verdict), dtype=bool)
    for d in monitor.detectors:
        cal = np.sort(monitor.calibration_[d])
        rank = math.ceil((len(cal) + 1) * (1 - 0.1 / 2))
        above |= verdict.scores[d] > cal[rank - 1]
    np.testing.assert_array_equal(verdict.flagged, above)
    assert verdict.flagged[-20:].all()  # random symbol strings are far from the questions


def test_fingerprint_mismatch_is_one_clear_line(tiny, prompts, tmp_path):
    monitor = Monitor(tiny, hooks=HOOKS, holdout=0.5, progress=False)
    monitor.fit(prompts[:60]).calibrate(0.1).save(tmp_path / "mon")
    other = dataclasses.replace(tiny, fingerprint="0" * 16)
    with pytest.raises(MadlensError, match="fingerprint"):
        Monitor.load(tmp_path / "mon", model=other)
    config = json.loads((tmp_path / "mon" / "monitor.json").read_text())
    config["model"]["fingerprint"] = "f" * 16
    (tmp_path / "mon" / "monitor.json").write_text(json.dumps(config))
    loaded = Monitor.load(tmp_path / "mon", progress=False)
    with pytest.raises(MadlensError, match="refit the monitor"):
        loaded.score(prompts[:2])


def test_top_hook_is_where_the_anomaly_is(tiny):
    rng = np.random.default_rng(0)
    normal = Features(300, {h: rng.standard_normal((300, 6)) for h in HOOKS})
    monitor = Monitor(tiny, hooks=HOOKS, detectors=["mahalanobis"], progress=False)
    monitor.fit_features(normal.take(range(200)))
    test = {h: rng.standard_normal((20, 6)) for h in HOOKS}
    test[HOOKS[1]][10:] += 6.0  # the last ten are anomalous at the second hook only
    verdict = monitor.score_features(Features(20, test))
    assert verdict.p_values is None and verdict.flagged is None
    assert verdict.top_hook[10:] == [HOOKS[1]] * 10
    z = verdict.hook_scores["mahalanobis"]
    assert (z[HOOKS[1]][10:] > z[HOOKS[0]][10:]).all()
    assert verdict.scores["mahalanobis"][10:].min() > verdict.scores["mahalanobis"][:10].max()


def test_measurements_reach_the_exclusion_probe_on_the_fit_split(tiny, prompts):
    import madlens.detectors as D

    trusted, untrusted = prompts[:40], prompts[40:60]
    m_t, m_u = np.arange(40) % 2, np.arange(20) % 3 == 0
    monitor = Monitor(tiny, hooks=HOOKS[:1], detectors=["exclusion-probe", "mahalanobis"],
                      holdout=0.25, progress=False).fit(trusted, untrusted,
                                                        measured=(m_t, m_u))  # fmt: skip
    fit_idx, cal_idx = monitor._split(40)
    # it calibrates on the held-out inputs whose measurements all read positive; the others
    # on every held-out input
    assert len(monitor.calibration_["exclusion-probe"]) == int(m_t[cal_idx].sum()) > 0
    assert len(monitor.calibration_["mahalanobis"]) == len(cal_idx)
    acts = monitor.features(trusted).take(fit_idx).acts[HOOKS[0]]
    direct = D.ExclusionProbe().fit(acts, monitor.features(untrusted).acts[HOOKS[0]],
                                    measured=(m_t[fit_idx], m_u))  # fmt: skip
    learned = monitor.fitted_["exclusion-probe"]
    np.testing.assert_allclose(learned.direction_, direct.direction_)
    with pytest.raises(MadlensError, match="reads measurements: fit it with measured="):
        Monitor(tiny, hooks=HOOKS, detectors=["exclusion-probe"], progress=False).fit(
            trusted, untrusted
        )
    with pytest.raises(MadlensError, match="measured: 39 values for 40 trusted inputs"):
        Monitor(tiny, hooks=HOOKS, detectors=["exclusion-probe"], progress=False).fit(
            trusted, untrusted, measured=(m_t[:39], m_u)
        )


def test_bad_input_is_one_line(tiny, prompts, tmp_path):
    with pytest.raises(MadlensError, match="unknown detector"):
        Monitor(tiny, detectors=["nope"])
    with pytest.raises(MadlensError, match="position"):
        Monitor(tiny, position="all")
    with pytest.raises(MadlensError, match="holdout"):
        Monitor(tiny, holdout=1.5)
    with pytest.raises(MadlensError, match="not fitted"):
        Monitor(tiny, hooks=HOOKS).calibrate(0.1)
    with pytest.raises(MadlensError, match="unknown hook|not a hook|no hook"):
        Monitor(tiny, hooks=["blocks.7.hook_nothing"])
    small = Monitor(tiny, hooks=HOOKS, holdout=0.5, progress=False).fit(prompts[:40])
    with pytest.raises(MadlensError, match="at least 99"):
        small.calibrate(0.01)
    with pytest.raises(MadlensError, match="fpr"):
        small.calibrate(1.5)
    with pytest.raises(MadlensError, match="untrusted"):
        Monitor(tiny, hooks=HOOKS, detectors=["que"], progress=False).fit(prompts[:40])
    with pytest.raises(MadlensError, match="not a directory"):
        Monitor.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "monitor.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(MadlensError, match="UTF-8"):
        Monitor.load(tmp_path / "bad")
    (tmp_path / "bad" / "monitor.json").write_text('{"format": 1, "model": {}}')
    with pytest.raises(MadlensError, match="missing or has the wrong type"):
        Monitor.load(tmp_path / "bad")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(MadlensError, match="not overwriting"):
        small.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_fit_score_show(run_cli, prompts, tmp_path):
    trusted = write_jsonl(tmp_path / "trusted.jsonl", [{"messages": m} for m in prompts[:200]])
    noise = "".join(random.Random(0).choices("#@!%&*~^", k=60))
    lines = [{"id": f"q{i}", "messages": m} for i, m in enumerate(prompts[600:630])]
    data = write_jsonl(tmp_path / "new.jsonl", lines + [{"id": "noise", "text": noise}])
    code, out, err = run_cli("monitor", "fit", "--trusted", str(trusted), "--model", "tiny-test",
                             "--hooks", "0,1", "--detectors", "mahalanobis,knn", "--fpr", "0.05",
                             "--holdout", "0.5", "--dtype", "float32",
                             "--out", str(tmp_path / "mon"))  # fmt: skip
    assert code == 0, err
    scores = tmp_path / "scores.jsonl"
    code, out, err = run_cli("monitor", "score", "--monitor", str(tmp_path / "mon"),
                             "--data", str(data), "--out", str(scores))  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(30)] + ["noise"]
    assert [r["line"] for r in rows] == list(range(1, 32))
    assert rows[-1]["flagged"] is True
    reference = Monitor.load(tmp_path / "mon", progress=False).score(prompts[600:630] + [noise])
    for row, expected in zip(rows, reference.rows()):
        assert row["scores"] == pytest.approx(expected["scores"], rel=1e-6)
        assert row["flagged"] == expected["flagged"]
    code, out, err = run_cli("monitor", "show", str(tmp_path / "mon"))
    assert code == 0 and "threshold" in out and "blocks.1.hook_resid_post" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["monitor", "fit", "--trusted", "{trusted}", "--model", "tiny-test", "--fpr", "2",
          "--out", "{tmp}/m"], "--fpr"),
        (["monitor", "fit", "--trusted", "{tmp}/missing.jsonl", "--model", "tiny-test",
          "--out", "{tmp}/m"], "no such file"),
        (["monitor", "fit", "--trusted", "{trusted}", "--model", "tiny-test",
          "--detectors", "nope", "--out", "{tmp}/m"], "unknown detector"),
        (["monitor", "score", "--monitor", "{tmp}/none", "--data", "{trusted}",
          "--out", "{tmp}/s.jsonl"], "no saved monitor"),
        (["monitor", "show", "{tmp}"], "monitor.json is missing"),
    ],
)  # fmt: skip
def test_cli_bad_input(run_cli, tmp_path, args, message):
    trusted = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    args = [a.format(trusted=trusted, tmp=tmp_path) for a in args]
    code, out, err = run_cli(*args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
