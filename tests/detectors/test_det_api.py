"""The shared detector API: registry, estimator conventions, save/load, hooks, input checks."""

import json
import re

import numpy as np
import pytest
import torch

import madlens.detectors as D
from madlens.errors import MadlensError

EXPECTED_NAMES = {
    "mahalanobis",
    "knn",
    "que",
    "spectral",
    "lof",
    "isolation-forest",
    "pca-residual",
    "defection-probe",
    "exclusion-probe",
    "refusal-direction",
    "mass-mean-probe-skyline",
    "logistic-probe-skyline",
    "msp",
    "max-logit",
    "energy",
    "entropy",
    "perplexity",
    "windowed-perplexity",
    "sae-recon",
    "sae-rare",
    "ccs",
    "crc-tpc",
    "lie-detector",
}
HOOKS = ("blocks.0.hook_resid_post", "blocks.2.hook_mlp_out")


def _acts(seed, n, d=8, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * scale + 1.0).astype(np.float32)


def _fit_inputs(name, untrusted_n, multi=False):
    """What the bench would pass: labels for skylines, contrast pairs for the defection probe."""
    cls = D.DETECTORS[name]
    inputs = {}
    if "labels" in cls.fit_requires():
        inputs["labels"] = np.arange(untrusted_n) % 2
    if "contrast" in cls.fit_requires():
        pos, neg = _acts(90, 4) + 1.0, _acts(91, 4)
        if multi:
            pos, neg = {h: pos for h in HOOKS}, {h: neg for h in HOOKS}
        inputs["contrast"] = D.ContrastPairs(positive=pos, negative=neg)
    if "measured" in cls.fit_requires():
        inputs["measured"] = (np.arange(300) % 2, np.arange(untrusted_n) % 3 == 0)
    return inputs


def _fitted(name, multi=False):
    trusted, untrusted, test = _acts(0, 300), _acts(1, 60), _acts(2, 40)
    cls = D.DETECTORS[name]
    if cls.input_kind == "outputs":
        rng = np.random.default_rng(3)
        stats = D.OutputStats(
            logits=rng.normal(size=(40, 20)).astype(np.float32),
            token_logprobs=[-rng.exponential(size=rng.integers(1, 30)) for _ in range(40)],
        )
        return D.get_detector(name).fit(stats), stats
    if multi:
        trusted = {HOOKS[0]: trusted, HOOKS[1]: trusted * 10}
        untrusted = {HOOKS[0]: untrusted, HOOKS[1]: untrusted * 10}
        test = {HOOKS[0]: test, HOOKS[1]: test * 10 + 1}
    det = D.get_detector(name).fit(trusted, untrusted, **_fit_inputs(name, 60, multi))
    return det, test


# --- registry -----------------------------------------------------------------------------------


def test_registry_names():
    assert set(D.DETECTORS) == EXPECTED_NAMES
    for name, cls in D.DETECTORS.items():
        assert cls.name == name
        assert name == name.lower() and " " not in name and "_" not in name
        # supervised detectors, and only they, say so in their name (the lie detector's name
        # is the issue's; it is supervised by construction, trained on lie labels)
        assert cls.supervised == ("skyline" in name or name == "lie-detector")
        assert cls.supervised == ("labels" in cls.fit_requires())
        assert cls.input_kind in ("activations", "outputs", "transcripts")


def test_get_detector_passes_params_and_rejects_unknowns():
    det = D.get_detector("knn", k=3)
    assert isinstance(det, D.KNN) and det.k == 3
    with pytest.raises(MadlensError, match="unknown detector"):
        D.get_detector("nope")
    with pytest.raises(MadlensError, match="bad parameters"):
        D.get_detector("knn", kk=3)


# --- estimator conventions ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_params_in_init_state_after_fit(name):
    det = D.get_detector(name)
    params = det.get_params()
    assert not det.is_fitted
    assert not [k for k in vars(det) if k.endswith("_")]  # nothing learned before fit
    assert type(det)(**params).get_params() == params
    assert repr(det).startswith(type(det).__name__ + "(")
    fitted, _ = _fitted(name)
    assert fitted.is_fitted
    assert fitted.get_params() == params  # fit does not touch parameters


def test_fit_returns_self_and_score_before_fit_fails():
    det = D.Mahalanobis()
    with pytest.raises(MadlensError, match="not fitted"):
        det.score(_acts(0, 5))
    assert det.fit(_acts(0, 50)) is det


# --- save / load --------------------------------------------------------------------------------


SAVE_CASES = [(name, False) for name in sorted(EXPECTED_NAMES)] + [
    (name, True) for name in sorted(EXPECTED_NAMES) if D.DETECTORS[name].input_kind == "activations"
]


@pytest.mark.parametrize("name, multi", SAVE_CASES)
def test_save_load_gives_the_same_scores(name, multi, tmp_path):
    det, test = _fitted(name, multi)
    det.save(tmp_path / "det")
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == [
        "detector.json",
        "state.safetensors",
    ]
    config = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert config["detector"] == name and config["params"] == det.get_params()
    loaded = D.load_detector(tmp_path / "det")
    assert type(loaded) is type(det) and loaded.get_params() == det.get_params()
    np.testing.assert_array_equal(loaded.score(test), det.score(test))


def test_load_checks_the_class_and_the_folder(tmp_path):
    det, _ = _fitted("knn")
    det.save(tmp_path / "knn")
    assert isinstance(D.KNN.load(tmp_path / "knn"), D.KNN)
    with pytest.raises(MadlensError, match="not a Mahalanobis"):
        D.Mahalanobis.load(tmp_path / "knn")
    with pytest.raises(MadlensError, match="no saved detector"):
        D.load_detector(tmp_path / "missing")
    with pytest.raises(MadlensError, match="not fitted"):
        D.KNN().save(tmp_path / "unfitted")


def _corrupt(folder, config=None, state=None):
    if config is not None:
        (folder / "detector.json").write_bytes(config)
    if state is not None:
        (folder / "state.safetensors").write_bytes(state)


@pytest.mark.parametrize(
    "config, state, message",
    [
        (b"{not json", None, "detector.json: not valid JSON"),
        (b"\xff\xfe\x00", None, "detector.json: not UTF-8 text"),
        (b"[1, 2]", None, "detector.json: expected a JSON object"),
        (b'{"format": 1, "detector": "knn", "params": [], "state": {}}', None,
         "'params' must be a dict"),
        (b'{"format": 1, "detector": "knn", "params": {"kk": 3}, "state": {}}', None,
         "bad params for 'knn'"),
        (b'{"format": 1, "detector": "knn", "params": {"k": -3}, "state": {}}', None,
         "k must be an int >= 1"),
        (b'{"format": 1, "detector": "knn", "params": {}, "state": {"__class__": 1}}', None,
         "malformed learned state"),
        (b'{"format": 9, "detector": "knn", "params": {}, "state": {}}', None,
         "unsupported detector format 9"),
        (None, b"\x00" * 40, "not a valid safetensors file"),
        (None, b"", "not a valid safetensors file"),
    ],
)  # fmt: skip
def test_load_of_a_malformed_folder_says_what_is_wrong(tmp_path, config, state, message):
    det, _ = _fitted("knn")
    det.save(tmp_path / "knn")
    _corrupt(tmp_path / "knn", config, state)
    with pytest.raises(MadlensError, match=re.escape(message)):
        D.load_detector(tmp_path / "knn")


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("knn", {"k": 0}, "k must be an int >= 1"),
        ("knn", {"k": 2.5}, "k must be an int >= 1"),
        ("knn", {"normalize": "yes"}, "normalize must be one of True, False"),
        ("logistic-probe-skyline", {"C": -1.0}, "C must be a number > 0"),
        ("logistic-probe-skyline", {"class_weight": "even"}, "class_weight must be one of"),
        ("isolation-forest", {"max_samples": 1.5}, "max_samples must be one of 'auto'"),
        ("lof", {"n_neighbors": True}, "n_neighbors must be an int >= 1"),
        ("sae-recon", {"latents": 0}, "latents must be an int >= 1"),
        ("que", {"alpha": float("nan")}, "alpha must be a number >= 0"),
        ("mahalanobis", {"aggregation": "median"}, "aggregation must be one of 'mean', 'max'"),
    ],
)
def test_bad_parameters_are_one_line_errors(name, params, message):
    det = D.get_detector(name, **params)
    trusted, test = _acts(0, 60), _acts(1, 20)
    kwargs = {"labels": np.r_[np.zeros(10), np.ones(10)].astype(int)} if det.supervised else {}
    with pytest.raises(MadlensError, match=re.escape(message)):
        det.fit(trusted, test if det.supervised else None, **kwargs)


@pytest.mark.parametrize("name", ["msp", "energy", "entropy"])
def test_bad_temperature_is_a_one_line_error_even_unfitted(name):
    with pytest.raises(MadlensError, match="temperature must be a number > 0"):
        D.get_detector(name, temperature="hot").score(np.zeros((3, 5)))


# --- multiple hooks -----------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_multi_hook_score_is_aggregated_z_score(aggregation):
    trusted = {HOOKS[0]: _acts(0, 400), HOOKS[1]: _acts(1, 400, scale=50.0)}
    test = {HOOKS[0]: _acts(2, 30), HOOKS[1]: _acts(3, 30, scale=60.0)}
    det = D.Mahalanobis(aggregation=aggregation).fit(trusted)
    z = []
    for hook in HOOKS:
        single = D.Mahalanobis().fit(trusted[hook])
        reference = single.score(trusted[hook])
        z.append((single.score(test[hook]) - reference.mean()) / reference.std())
    expected = np.max(z, 0) if aggregation == "max" else np.mean(z, 0)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-6)
    per_hook = det.score_per_hook(test)
    assert list(per_hook) == list(HOOKS)
    np.testing.assert_allclose(per_hook[HOOKS[1]], z[1], rtol=1e-6)


def test_multi_hook_knn_z_scores_trusted_without_self_matches():
    trusted = {HOOKS[0]: _acts(0, 200), HOOKS[1]: _acts(1, 200)}
    det = D.KNN(k=5).fit(trusted)
    single = D.KNN(k=6).fit(trusted[HOOKS[0]])
    leave_one_out = single.score(trusted[HOOKS[0]])  # 6th neighbour incl. itself = 5th other
    assert det.hook_loc_[0] == pytest.approx(leave_one_out.mean(), rel=1e-5)


def test_multi_hook_stream_matches_dict_fit():
    trusted = {HOOKS[0]: _acts(0, 500), HOOKS[1]: _acts(1, 500, scale=3.0)}
    test = {HOOKS[0]: _acts(2, 30), HOOKS[1]: _acts(3, 30)}
    whole = D.Mahalanobis().fit(trusted).score(test)
    batches = ({h: x[i : i + 64] for h, x in trusted.items()} for i in range(0, 500, 64))
    streamed = D.Mahalanobis().fit(batches).score(test)
    np.testing.assert_allclose(streamed, whole, rtol=1e-5, atol=1e-5)  # float32 Gram per batch


def test_large_trusted_sets_z_score_on_a_sample():
    from madlens.detectors.base import ZSCORE_MAX_ROWS, _Reservoir

    n = 3 * ZSCORE_MAX_ROWS
    trusted = {HOOKS[0]: _acts(0, n), HOOKS[1]: _acts(1, n, scale=4.0)}
    det = D.Mahalanobis().fit(trusted)
    for i, hook in enumerate(HOOKS):
        all_scores = det.per_hook_[hook].score(trusted[hook])
        assert det.hook_loc_[i] == pytest.approx(all_scores.mean(), rel=0.05)
        assert det.hook_scale_[i] == pytest.approx(all_scores.std(), rel=0.1)

    # the streaming path samples uniformly, keeping rows aligned across hooks
    reservoir = _Reservoir(ZSCORE_MAX_ROWS)
    index = np.arange(n, dtype=np.float64)[:, None]
    for start in range(0, n, 700):
        reservoir.add({h: index[start : start + 700] + k for k, h in enumerate(HOOKS)})
    kept = reservoir.rows[HOOKS[0]][:, 0]
    assert len(kept) == ZSCORE_MAX_ROWS and len(set(kept)) == ZSCORE_MAX_ROWS
    np.testing.assert_array_equal(reservoir.rows[HOOKS[1]][:, 0], kept + 1)
    assert kept.mean() == pytest.approx(n / 2, rel=0.05)


def test_multi_hook_input_errors():
    trusted = {HOOKS[0]: _acts(0, 100), HOOKS[1]: _acts(1, 100)}
    det = D.Mahalanobis().fit(trusted)
    with pytest.raises(MadlensError, match="lacks hooks"):
        det.score({HOOKS[0]: _acts(2, 5)})
    with pytest.raises(MadlensError, match="dict"):
        det.score(_acts(2, 5))
    with pytest.raises(MadlensError, match="different numbers"):
        D.Mahalanobis().fit({HOOKS[0]: _acts(0, 100), HOOKS[1]: _acts(1, 99)})
    with pytest.raises(MadlensError, match="untrusted has hooks"):
        D.QUE().fit(trusted, {HOOKS[0]: _acts(0, 50)})
    with pytest.raises(MadlensError, match="one array"):
        D.Mahalanobis().fit(_acts(0, 100)).score(trusted)
    with pytest.raises(MadlensError, match="aggregation"):
        D.Mahalanobis(aggregation="median").fit(trusted)


# --- inputs -------------------------------------------------------------------------------------


def test_input_checks():
    det = D.Mahalanobis().fit(_acts(0, 100))
    with pytest.raises(MadlensError, match="features"):
        det.score(_acts(1, 5, d=9))
    with pytest.raises(MadlensError, match="n x d"):
        det.score(np.ones(8))
    bad = _acts(2, 100)
    bad[3, 2] = np.nan
    with pytest.raises(MadlensError, match="NaN"):
        D.Mahalanobis().fit(bad)
    with pytest.raises(MadlensError, match="NaN"):
        D.KNN().fit(bad)
    with pytest.raises(MadlensError, match="empty"):
        D.KNN().fit(np.zeros((0, 4)))


def test_float16_and_torch_inputs_give_the_same_scores():
    trusted, test = _acts(0, 300), _acts(1, 20)
    reference = D.KNN(k=5).fit(trusted.astype(np.float16).astype(np.float32)).score(test)
    np.testing.assert_allclose(
        D.KNN(k=5).fit(trusted.astype(np.float16)).score(test), reference, rtol=1e-5
    )
    from_torch = D.KNN(k=5).fit(torch.from_numpy(trusted).to(torch.float16)).score(test)
    np.testing.assert_allclose(from_torch, reference, rtol=1e-5)
    np.testing.assert_allclose(
        D.Mahalanobis().fit(torch.from_numpy(trusted)).score(torch.from_numpy(test)),
        D.Mahalanobis().fit(trusted).score(test),
    )


def test_required_fit_inputs():
    trusted, untrusted = _acts(0, 100), _acts(1, 20)
    with pytest.raises(MadlensError, match="untrusted"):
        D.QUE().fit(trusted)
    with pytest.raises(MadlensError, match="untrusted"):
        D.SpectralSignature().fit(trusted)
    with pytest.raises(MadlensError, match="labels"):
        D.LogisticProbe().fit(trusted, untrusted)
    with pytest.raises(MadlensError, match="contrast"):
        D.DefectionProbe().fit(trusted)
    with pytest.raises(MadlensError, match="measured"):
        D.ExclusionProbe().fit(trusted, untrusted)
    with pytest.raises(MadlensError, match="19 values for 20 untrusted"):
        D.ExclusionProbe().fit(trusted, untrusted, measured=(np.ones(100), np.ones(19)))
    with pytest.raises(MadlensError, match="does not take labels"):
        D.Mahalanobis().fit(trusted, labels=np.zeros(20))
    with pytest.raises(MadlensError, match="20 labels"):
        D.MassMeanProbe().fit(trusted, _acts(1, 30), labels=np.zeros(20))
    with pytest.raises(MadlensError, match="both"):
        D.MassMeanProbe().fit(trusted, untrusted, labels=np.zeros(20))
    with pytest.raises(MadlensError, match="stream"):
        D.KNN().fit(iter([trusted]))
    with pytest.raises(MadlensError, match="no batches"):
        D.Mahalanobis().fit(iter([]))


def test_parameter_checks():
    trusted = _acts(0, 100)
    with pytest.raises(MadlensError, match="shrinkage"):
        D.Mahalanobis(shrinkage=2.0).fit(trusted)
    with pytest.raises(MadlensError, match="shrinkage"):
        D.Mahalanobis(shrinkage="oas").fit(trusted)
    with pytest.raises(MadlensError, match="exceeds"):
        D.KNN(k=101).fit(trusted)
    with pytest.raises(MadlensError, match="n_components"):
        D.PCAResidual(n_components=8).fit(trusted)
    with pytest.raises(MadlensError, match="n_components"):
        D.PCAResidual(n_components=1.5).fit(trusted)
    with pytest.raises(MadlensError, match="temperature"):
        D.Energy(temperature=0).score(np.ones((2, 3)))


# --- output statistics --------------------------------------------------------------------------


def test_output_stats_validation():
    with pytest.raises(MadlensError, match="needs logits"):
        D.OutputStats()
    with pytest.raises(MadlensError, match="vocab"):
        D.OutputStats(logits=np.ones(5))
    with pytest.raises(MadlensError, match="token_logprobs"):
        D.OutputStats(logits=np.ones((3, 4)), token_logprobs=[np.zeros(2)] * 2)
    stats = D.OutputStats(token_logprobs=[[-1.0, -2.0]])
    with pytest.raises(MadlensError, match="OutputStats.logits"):
        D.MSP().score(stats)
    with pytest.raises(MadlensError, match="no scored tokens"):
        D.Perplexity().score(D.OutputStats(token_logprobs=[np.zeros(0)]))
    with pytest.raises(MadlensError, match="<= 0"):
        D.Perplexity().score(D.OutputStats(token_logprobs=[np.array([0.5])]))
    with pytest.raises(MadlensError, match="activations per hook"):
        D.MSP().score({"hook": np.ones((2, 3))})
    with pytest.raises(MadlensError, match="NaN"):
        D.Entropy().score(np.array([[0.0, 1.0], [np.nan, 1.0]]))


def test_output_detectors_take_bare_arrays_and_torch():
    logits = np.random.default_rng(0).normal(size=(6, 11)).astype(np.float32)
    expected = D.MSP().score(D.OutputStats(logits=logits))
    np.testing.assert_array_equal(D.MSP().score(logits), expected)
    np.testing.assert_allclose(D.MSP().score(torch.from_numpy(logits)), expected)
    assert D.Perplexity().score([np.array([-1.0, -3.0])])[0] == pytest.approx(2.0)


def test_perplexity_and_windowed_perplexity_by_hand():
    nll = np.array([1.0] * 10 + [5.0] * 10 + [2.0] * 4)  # 24 tokens: windows [0,10) [10,24)
    stats = D.OutputStats(token_logprobs=[-nll, -nll[:7]])
    assert D.Perplexity().score(stats) == pytest.approx([nll.mean(), 1.0])
    windowed = D.WindowedPerplexity(window=10).score(stats)
    # the 4-token tail is merged into the second window; a 7-token span is one window
    assert windowed == pytest.approx([(50 + 8) / 14, 1.0])
    assert D.WindowedPerplexity(window=4).score(stats)[0] == pytest.approx(5.0)
