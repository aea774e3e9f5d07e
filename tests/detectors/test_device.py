"""The device path: given torch tensors, the heavy detectors compute on the tensors' device
and agree with the numpy path (which test_det_references checks against sklearn, scipy and
pytorch-ood). Runs on `cpu`, and on `cuda` when there is one; `-m device` selects these."""

import numpy as np
import pytest
import torch

import madlens.detectors as D
from madlens.detectors import get_detector, load_detector
from madlens.errors import MadlensError
from madlens.sae import TopKConfig, TopKSAE, save_sae

pytestmark = pytest.mark.device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
D_IN = 12
# name, params; kNN and the SAE detectors compute in float32 in both paths (the numpy path's
# own precision), the others in float64 for float64 input
DETECTORS = [
    ("mahalanobis", {}),
    ("mahalanobis", {"shrinkage": 0.2, "relative": True}),
    ("mahalanobis", {"shrinkage": None}),
    ("pca-residual", {}),
    ("pca-residual", {"n_components": 4, "center": False}),
    ("knn", {"k": 5}),
    ("knn", {"k": 3, "normalize": False}),
    ("que", {}),
    ("que", {"alpha": 0.5, "shrinkage": None}),
    ("spectral", {}),
    ("spectral", {"whiten": False}),
    ("sae-recon", {"sae": "tiny"}),
    ("sae-rare", {"sae": "tiny"}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(DETECTORS)]
FLOAT32 = {"knn", "sae-recon", "sae-rare"}
STREAMING = [(name, params) for name, params in DETECTORS if D.DETECTORS[name].streaming]


def _rows(seed, n, shift=0.0):
    """Correlated Gaussian rows with a large offset (float64)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(D_IN, D_IN)) / np.sqrt(D_IN)
    return rng.normal(size=(n, D_IN)) @ mixing + 3.0 + shift


@pytest.fixture(scope="module")
def data():
    trusted = _rows(0, 300)
    untrusted = np.concatenate([_rows(1, 50), _rows(2, 15, shift=np.eye(D_IN)[0] * 4)])
    test = np.concatenate([_rows(3, 30), _rows(4, 10, shift=np.eye(D_IN)[1] * 3)])
    return trusted, untrusted, test


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    sae = TopKSAE(TopKConfig(D_IN, 40, k=5), seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(torch.full((D_IN,), 3.0))
    folder = tmp_path_factory.mktemp("sae") / "sae"
    save_sae(sae, folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _home(monkeypatch, tmp_path_factory):
    """SAEs the SAE detectors train are cached in a throwaway MADLENS_HOME."""
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def _make(name, params, tiny_sae):
    params = {**params, "sae": tiny_sae} if params.get("sae") == "tiny" else params
    return get_detector(name, **params)


def _fit(det, trusted, untrusted):
    return det.fit(trusted, untrusted) if det.uses_untrusted else det.fit(trusted)


def _t(x, device, dtype=None):
    if isinstance(x, dict):
        return {k: _t(v, device, dtype) for k, v in x.items()}
    return torch.from_numpy(x).to(device=device, dtype=dtype)


def _rtol(name):
    return 1e-5 if name in FLOAT32 else 1e-6


def _assert_same_state(ours, ref, rtol):
    """Every learned array and value equal (arrays to rtol of their largest entry), and the
    learned arrays numpy, so that save / load is unchanged."""
    arrays, values = ours._state()
    ref_arrays, ref_values = ref._state()
    assert sorted(arrays) == sorted(ref_arrays) and sorted(values) == sorted(ref_values)
    for key, value in arrays.items():
        assert isinstance(value, np.ndarray) and value.dtype == ref_arrays[key].dtype, key
        scale = max(float(np.abs(ref_arrays[key]).max()), 1e-300)
        np.testing.assert_allclose(
            value, ref_arrays[key], rtol=rtol, atol=rtol * scale, err_msg=key
        )
    for key, value in values.items():
        if isinstance(value, float):
            assert value == pytest.approx(ref_values[key], rel=rtol, abs=1e-12), key
        else:
            assert value == ref_values[key], key
    for hook, det in getattr(ours, "per_hook_", {}).items():
        _assert_same_state(det, ref.per_hook_[hook], rtol)


def _device_copies(det):
    """The devices of the learned arrays a detector copied for tensor inputs."""
    dets = [det, *getattr(det, "per_hook_", {}).values()]
    return {t.device.type for d in dets for _, t in vars(d).get("_on_device", {}).values()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, params", DETECTORS, ids=IDS)
def test_tensors_equal_the_numpy_path(name, params, device, data, tiny_sae):
    trusted, untrusted, test = data
    ref = _fit(_make(name, params, tiny_sae), trusted, untrusted)
    det = _fit(_make(name, params, tiny_sae), _t(trusted, device), _t(untrusted, device))
    scores = det.score(_t(test, device))
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    assert scores.shape == (len(test),)
    np.testing.assert_allclose(scores, ref.score(test), rtol=_rtol(name))
    _assert_same_state(det, ref, _rtol(name))
    assert _device_copies(det) == {device}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, params", DETECTORS, ids=IDS)
def test_multi_hook_tensors_equal_the_numpy_path(name, params, device, data, tiny_sae):
    if params.get("sae"):  # a pretrained SAE reads one hook; the SAE-trained case is below
        params = {"latents": 24, "k": 4, "steps": 5}
    trusted, untrusted, test = data
    hooks = {"blocks.0.hook_resid_post": 1.0, "blocks.1.hook_resid_post": -2.0}

    def split(x):
        return {h: a * x[:, ::-1].copy() + a for h, a in hooks.items()}

    ref = _fit(_make(name, params, tiny_sae), split(trusted), split(untrusted))
    det = _fit(
        _make(name, params, tiny_sae), _t(split(trusted), device), _t(split(untrusted), device)
    )
    # z-scores are O(1) and cross 0: float32 rounding (kNN, SAE) shows as an absolute error
    atol = 1e-4 if name in FLOAT32 else 1e-9
    np.testing.assert_allclose(
        det.score(_t(split(test), device)), ref.score(split(test)), rtol=_rtol(name), atol=atol
    )
    _assert_same_state(det, ref, _rtol(name))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, params", STREAMING)
def test_tensor_streams_equal_the_numpy_path(name, params, device, data):
    trusted, _, test = data
    parts = np.array_split(np.arange(len(trusted)), 4)
    ref = get_detector(name, **params).fit(iter([trusted[p] for p in parts]))
    det = get_detector(name, **params).fit(iter([_t(trusted[p], device) for p in parts]))
    np.testing.assert_allclose(det.score(_t(test, device)), ref.score(test), rtol=1e-6)
    _assert_same_state(det, ref, 1e-6)
    # a stream of dicts of hooks; the z-scoring sample is drawn alike from both
    hooks = ["a", "b"]
    ref = get_detector(name, **params).fit(iter([{h: trusted[p] for h in hooks} for p in parts]))
    det = get_detector(name, **params).fit(
        iter([{h: _t(trusted[p], device) for h in hooks} for p in parts])
    )
    batch = {h: test for h in hooks}
    np.testing.assert_allclose(det.score(_t(batch, device)), ref.score(batch), rtol=1e-6)
    _assert_same_state(det, ref, 1e-6)
    np.testing.assert_allclose(det.hook_loc_, ref.hook_loc_, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streaming_moments_on_tensors(device, dtype, data):
    trusted = data[0].astype(dtype)
    ref = D.StreamingMoments().update(trusted[:100], chunk_rows=7).update(trusted[100:])
    ours = D.StreamingMoments().update(_t(trusted[:100], device), chunk_rows=7)
    ours.update(trusted[100:])  # a numpy batch joins sums kept on the device
    assert ours.device.type == device and ours.n == ref.n == len(trusted)
    np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(ours.covariance(1), ref.covariance(1), rtol=1e-5, atol=1e-6)
    assert ours.centered_quartic_sum() == pytest.approx(ref.centered_quartic_sum(), rel=1e-5)
    assert D.ledoit_wolf_shrinkage(ours) == pytest.approx(D.ledoit_wolf_shrinkage(ref), rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, params", DETECTORS, ids=IDS)
def test_tensor_fitted_detectors_save_load_and_mix(name, params, device, data, tiny_sae, tmp_path):
    trusted, untrusted, test = data
    det = _fit(_make(name, params, tiny_sae), _t(trusted, device), _t(untrusted, device))
    scores = det.score(_t(test, device))
    det.save(tmp_path / "det")
    loaded = load_detector(tmp_path / "det")
    np.testing.assert_allclose(loaded.score(_t(test, device)), scores, rtol=1e-12)
    # fit on tensors, score numpy; fit on numpy, score tensors; trusted and untrusted mixed
    np.testing.assert_allclose(loaded.score(test), scores, rtol=_rtol(name))
    np.testing.assert_allclose(det.score(test), scores, rtol=_rtol(name))
    ref = _fit(_make(name, params, tiny_sae), trusted, untrusted)
    np.testing.assert_allclose(ref.score(_t(test, device)), scores, rtol=_rtol(name))
    mixed = _fit(_make(name, params, tiny_sae), _t(trusted, device), untrusted)
    np.testing.assert_allclose(mixed.score(test), scores, rtol=_rtol(name))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, params", DETECTORS, ids=IDS)
def test_half_precision_tensors_compute_in_float32_like_numpy(name, params, device, data, tiny_sae):
    """bfloat16 trusted rows, float16 untrusted and test ones (numpy has no bfloat16: its path
    gets the same numbers in float32)."""
    untrusted, test = (x.astype(np.float16) for x in data[1:])
    trusted = torch.from_numpy(data[0]).to(torch.bfloat16)
    ref = _fit(_make(name, params, tiny_sae), trusted.float().numpy(), untrusted)
    det = _fit(_make(name, params, tiny_sae), trusted.to(device), _t(untrusted, device))
    # float32 arithmetic in both paths, summed in different orders. An unshrunk covariance is
    # inverted as it is, and the rounding of a float32 solve grows with its condition number
    # (about 4e4 here; on an H200 the scores differed by 3.4e-4, the precision matrix by
    # 3.9e-4): the bound is kappa * eps
    rtol = 2e-4
    if "shrinkage" in params and params["shrinkage"] is None:
        kappa = np.linalg.cond(np.cov(trusted.float().numpy().T))
        rtol = max(rtol, kappa * float(np.finfo(np.float32).eps))
    np.testing.assert_allclose(det.score(_t(test, device)), ref.score(test), rtol=rtol, atol=1e-4)
    _assert_same_state(det, ref, max(rtol, 1e-4))  # the precision matrix is that inverse


@pytest.mark.parametrize("device", DEVICES)
def test_trained_sae_is_shared_by_both_paths(device, data, tmp_path, monkeypatch):
    """Without a pretrained SAE the detector trains one on the host, cached by the trusted
    data: the tensor path finds the numpy path's entry (same key) and scores alike."""
    monkeypatch.setenv("MADLENS_HOME", str(tmp_path))
    trusted, _, test = (x.astype(np.float32) for x in data)
    params = {"latents": 24, "k": 4, "steps": 5}
    ref = D.SAERecon(**params).fit(trusted)
    det = D.SAERecon(**params).fit(_t(trusted, device))
    assert len(list((tmp_path / "sae_detectors").iterdir())) == 1
    np.testing.assert_allclose(det.score(_t(test, device)), ref.score(test), rtol=1e-5)
    _assert_same_state(det, ref, 1e-6)
    rare = D.SAERare(**params).fit(_t(trusted, device))
    np.testing.assert_array_equal(rare.surprise(_t(test[:3], device)), rare.surprise(test[:3]))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_tensors_fail_in_one_line(device):
    good = torch.zeros(20, 4, device=device)
    with pytest.raises(MadlensError, match="n x d"):
        D.Mahalanobis().fit(torch.zeros(20, device=device))
    with pytest.raises(MadlensError, match="NaN"):
        D.KNN(k=2).fit(torch.full((20, 4), float("nan"), device=device))
    with pytest.raises(MadlensError, match="NaN"):
        D.Mahalanobis().fit(iter([torch.full((20, 4), float("inf"), device=device)]))
    with pytest.raises(MadlensError, match="numeric"):
        D.QUE().fit(good, torch.zeros(20, 4, dtype=torch.bool, device=device))
    with pytest.raises(MadlensError, match="empty"):
        D.SpectralSignature().fit(good, torch.zeros(0, 4, device=device))
    with pytest.raises(MadlensError, match="5 features"):
        D.KNN(k=2).fit(good + torch.rand(20, 4, device=device)).score(torch.zeros(3, 5))
