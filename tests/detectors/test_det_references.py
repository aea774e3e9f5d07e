"""Detector scores against independent references: pytorch-ood, pyod, scikit-learn, scipy,
closed forms on synthetic Gaussians."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

import madlens.detectors as D
from madlens.metrics import auroc


@pytest.fixture(scope="module")
def ood():
    """pytorch_ood.detector without pytorch_ood/__init__.py.

    The package __init__ imports pytorch_ood.model, which imports torchvision; torchvision's PyPI
    build does not import beside this torch. The detectors need only torch, so we register a bare
    package module whose __path__ is the installed folder and import the subpackage from it:
    nothing is stubbed, the real detector code runs.
    """
    if "pytorch_ood" not in sys.modules:
        spec = importlib.util.find_spec("pytorch_ood")
        assert spec is not None, "pytorch-ood is a test dependency: pip install --no-deps"
        package = types.ModuleType("pytorch_ood")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["pytorch_ood"] = package
    import pytorch_ood.detector

    return pytorch_ood.detector


def _gaussian(n, d, seed, mean=0.0):
    """n draws of a correlated Gaussian whose covariance has condition number 16."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mixing = np.diag(np.linspace(0.5, 2.0, d)) @ rotation
    return rng.normal(size=(n, d)) @ mixing + mean, mixing


@pytest.fixture(scope="module")
def data():
    trusted, mixing = _gaussian(800, 24, seed=0, mean=3.0)
    rng = np.random.default_rng(1)
    test = rng.normal(size=(100, 24)) @ mixing + 3.0 + rng.normal(size=(100, 24)) * 0.5
    return trusted.astype(np.float32), test.astype(np.float32)


def _zeros(n):
    return torch.zeros(n, dtype=torch.long)


# --- pytorch-ood --------------------------------------------------------------------------------


def test_mahalanobis_matches_pytorch_ood(ood, data):
    trusted, test = data
    ref = ood.Mahalanobis(None).fit_features(torch.from_numpy(trusted), _zeros(len(trusted)))
    theirs = ref.predict_features(torch.from_numpy(test)).double().numpy()
    ours = D.Mahalanobis(shrinkage=None).fit(trusted).score(test)
    # pytorch-ood: 0.5 d^T (sum of centred outer products)^-1 d = MD^2 / (2 n)
    np.testing.assert_allclose(ours, 2 * len(trusted) * theirs, rtol=1e-4)


def test_knn_matches_pytorch_ood(ood, data):
    trusted, test = data
    ref = ood.KNN(None, k=7).fit_features(torch.from_numpy(trusted), _zeros(len(trusted)))
    theirs = ref.predict_features(torch.from_numpy(test)).numpy()
    ours = D.KNN(k=7).fit(trusted).score(test)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_knn_unnormalized_matches_brute_force(data):
    trusted, test = data
    dist = np.linalg.norm(test[:, None, :].astype(float) - trusted[None].astype(float), axis=-1)
    expected = np.sort(dist, axis=1)[:, 4]
    ours = D.KNN(k=5, normalize=False).fit(trusted).score(test)
    np.testing.assert_allclose(ours, expected, rtol=1e-4)


def test_pca_residual_matches_pytorch_ood_vim(ood, data):
    trusted, test = data
    rng = np.random.default_rng(2)
    w = torch.tensor(rng.normal(size=(5, trusted.shape[1])), dtype=torch.float32)
    b = torch.zeros(5)  # ViM's origin -W^+ b is then 0: our center=False
    vim = ood.ViM(None, d=6, w=w, b=b).fit_features(torch.from_numpy(trusted), _zeros(len(trusted)))
    x = torch.from_numpy(test)
    # ViM score = alpha |x_residual| - logsumexp(logits): recover the residual norm
    residual = ((vim.predict_features(x) + torch.logsumexp(x @ w.T, 1)) / vim.alpha).numpy()
    ours = D.PCAResidual(n_components=6, center=False).fit(trusted).score(test)
    np.testing.assert_allclose(ours, residual, rtol=1e-4)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(3)
    return (rng.normal(size=(64, 300)) * rng.uniform(0.5, 4, size=(64, 1))).astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_msp_and_energy_match_pytorch_ood(ood, logits, temperature):
    x = torch.from_numpy(logits)
    msp = D.MSP(temperature=temperature).score(D.OutputStats(logits=logits))
    np.testing.assert_allclose(msp, ood.MaxSoftmax.score(x, temperature).numpy(), atol=1e-6)
    energy = D.Energy(temperature=temperature).score(D.OutputStats(logits=logits))
    np.testing.assert_allclose(
        energy, ood.EnergyBased.score(x, temperature).numpy(), rtol=1e-5, atol=1e-5
    )


def test_max_logit_matches_pytorch_ood_and_entropy_matches_scipy(ood, logits):
    stats = D.OutputStats(logits=logits)
    expected = ood.MaxLogit.score(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(D.MaxLogit().score(stats), expected)
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    # float32 blocks against scipy's float64
    np.testing.assert_allclose(
        D.Entropy().score(stats), scipy.stats.entropy(probs, axis=1), rtol=1e-5
    )


# --- pyod ---------------------------------------------------------------------------------------


def test_lof_matches_pyod(data):
    from pyod.models.lof import LOF as PyodLOF

    trusted, test = data
    theirs = PyodLOF(n_neighbors=15).fit(trusted).decision_function(test)
    np.testing.assert_allclose(D.LOF(n_neighbors=15).fit(trusted).score(test), theirs, rtol=1e-6)


def test_isolation_forest_matches_pyod_up_to_its_offset(data):
    from pyod.models.iforest import IForest

    trusted, test = data
    # pyod's decision_function is -(score_samples - offset_), offset_ set by its contamination
    reference = IForest(random_state=0).fit(trusted)
    theirs = reference.decision_function(test)
    ours = D.IsolationForest(seed=0).fit(trusted).score(test)
    np.testing.assert_allclose(ours, theirs - reference.detector_.offset_, atol=1e-9)


# --- Gaussian closed forms ----------------------------------------------------------------------


def test_mahalanobis_equals_the_closed_form():
    trusted, _ = _gaussian(600, 10, seed=4, mean=50.0)
    test, _ = _gaussian(50, 10, seed=5, mean=50.0)
    mean = trusted.mean(0)
    precision = np.linalg.inv(np.cov(trusted.T, bias=True))
    delta = test - mean
    expected = np.einsum("ij,jk,ik->i", delta, precision, delta)
    ours = D.Mahalanobis(shrinkage=None).fit(trusted).score(test)
    np.testing.assert_allclose(ours, expected, rtol=1e-9)

    # relative variant: minus the diagonal-covariance distance
    diag = np.diag(np.cov(trusted.T, bias=True))
    relative = D.Mahalanobis(shrinkage=None, relative=True).fit(trusted).score(test)
    np.testing.assert_allclose(relative, expected - (delta**2 / diag).sum(1), rtol=1e-8, atol=1e-9)


def test_mahalanobis_converges_to_the_true_distance_and_detects_a_shift():
    rng = np.random.default_rng(6)
    d = 8
    mixing = rng.normal(size=(d, d))
    true_cov = mixing.T @ mixing
    mean = rng.normal(size=d) * 5
    trusted = rng.normal(size=(100_000, d)) @ mixing + mean
    normal = rng.normal(size=(500, d)) @ mixing + mean
    shifted = normal + 2.0 * np.sqrt(np.diag(true_cov))  # 2 sd on every axis
    test = np.concatenate([normal, shifted])
    det = D.Mahalanobis(shrinkage=None).fit(trusted)
    delta = test - mean
    true_md = np.einsum("ij,jk,ik->i", delta, np.linalg.inv(true_cov), delta)
    np.testing.assert_allclose(det.score(test), true_md, rtol=0.03)
    # squared MD of fresh normal points is chi-square with d degrees of freedom
    assert det.score(normal).mean() == pytest.approx(d, rel=0.15)
    shrunk = D.Mahalanobis().fit(trusted)  # Ledoit-Wolf, the default
    assert auroc(np.r_[np.zeros(500), np.ones(500)], shrunk.score(test)) > 0.99


def test_ledoit_wolf_matches_sklearn():
    trusted, _ = _gaussian(150, 40, seed=7, mean=10.0)
    det = D.Mahalanobis(shrinkage="ledoit-wolf").fit(trusted)
    reference = LedoitWolf().fit(trusted)
    assert det.shrinkage_ == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(det.covariance_, reference.covariance_, atol=1e-10)
    np.testing.assert_allclose(det.precision_, reference.precision_, rtol=1e-6, atol=1e-8)


def test_fixed_shrinkage():
    trusted, _ = _gaussian(100, 6, seed=8)
    cov = np.cov(trusted.T, bias=True)
    target = (1 - 0.3) * cov + 0.3 * np.trace(cov) / 6 * np.eye(6)
    np.testing.assert_allclose(D.Mahalanobis(shrinkage=0.3).fit(trusted).covariance_, target)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_streaming_covariance_equals_batch_covariance(dtype, tol):
    x, _ = _gaussian(1000, 30, seed=9, mean=1000.0)  # large mean: a cancellation trap
    x = x.astype(dtype)
    moments = D.StreamingMoments()
    for part in np.array_split(x, [1, 10, 333, 334, 900]):
        moments.update(part, chunk_rows=17)
    reference = np.cov(x.astype(np.float64).T, bias=True)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(moments.covariance(), reference, atol=tol * scale)
    np.testing.assert_allclose(
        moments.covariance(ddof=1), np.cov(x.astype(np.float64).T), atol=tol * scale
    )
    np.testing.assert_allclose(moments.mean, x.astype(np.float64).mean(0), rtol=1e-9)


def test_streamed_fit_equals_array_fit():
    x, _ = _gaussian(900, 12, seed=10, mean=3.0)
    test, _ = _gaussian(40, 12, seed=11, mean=3.0)
    for name in ["mahalanobis", "pca-residual"]:
        whole = D.get_detector(name).fit(x).score(test)
        streamed = D.get_detector(name).fit(iter(np.array_split(x, 7))).score(test)
        np.testing.assert_allclose(streamed, whole, rtol=1e-9)
    # a float16 memmap-like array is converted chunk by chunk
    half = x.astype(np.float16)
    np.testing.assert_allclose(
        D.Mahalanobis().fit(half).score(test),
        D.Mahalanobis().fit(half.astype(np.float64)).score(test),
        rtol=1e-4,
    )


def test_que_with_alpha_zero_is_mahalanobis_over_d():
    trusted, _ = _gaussian(500, 10, seed=12)
    untrusted, _ = _gaussian(200, 10, seed=13)
    que = D.QUE(alpha=0.0).fit(trusted, untrusted).score(untrusted)
    md = D.Mahalanobis().fit(trusted).score(untrusted)
    np.testing.assert_allclose(que, md / 10, rtol=1e-9)


def _spiked_batch(spike_size, seed=24, d=12):
    """(trusted, untrusted, test): the untrusted batch has a fifth of its rows pushed +-spike
    along one direction, variance the trusted set never shows; test adds shifted rows."""
    trusted, mixing = _gaussian(400, d, seed=seed, mean=3.0)
    rng = np.random.default_rng(seed + 1)
    untrusted = rng.normal(size=(150, d)) @ mixing + 3.0
    spike = rng.normal(size=d)
    untrusted[:30] += (
        spike_size * rng.choice([-1.0, 1.0], size=(30, 1)) * spike / np.linalg.norm(spike)
    )
    test = np.concatenate([untrusted, rng.normal(size=(20, d)) @ mixing + 4.0])
    return trusted, untrusted, test


def _inverse_sqrt(cov):
    """cov^(-1/2), the symmetric (ZCA) whitening: a different W from the detector's PCA
    whitening; the scores must not depend on that choice."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    return eigvecs @ np.diag(eigvals**-0.5) @ eigvecs.T


@pytest.mark.parametrize("alpha", [4.0, 0.5, 30.0])
@pytest.mark.parametrize("spike_size", [4.0, 0.0])
def test_que_equals_the_quantum_entropy_formula(alpha, spike_size):
    """Dong, Hopkins & Li 2019 computed directly: whiten with the trusted mean and the
    Ledoit-Wolf covariance (sklearn), S_u = ML covariance of the whitened untrusted batch,
    Q = expm(alpha (S_u - I) / (|S_u|_2 - 1)) / tr(.), tau(x) = z^T Q z. spike_size=0 is an
    untrusted batch drawn like the trusted set (|S_u|_2 just above 1 by sampling noise)."""
    trusted, untrusted, test = _spiked_batch(spike_size)
    d = trusted.shape[1]
    mu = trusted.mean(0)
    whiten = _inverse_sqrt(LedoitWolf().fit(trusted).covariance_)
    s_u = np.cov(((untrusted - mu) @ whiten).T, bias=True)
    top = np.linalg.norm(s_u, 2)
    assert top > 1.0 + 1e-3  # the formula is defined (and the detector's own branch taken)
    q = scipy.linalg.expm(alpha * (s_u - np.eye(d)) / (top - 1.0))
    q /= np.trace(q)
    z = (test - mu) @ whiten
    expected = np.einsum("ij,jk,ik->i", z, q, z)
    det = D.QUE(alpha=alpha).fit(trusted, untrusted)
    assert det.untrusted_top_eigenvalue_ == pytest.approx(top, rel=1e-10)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-9)


def test_que_without_shrinkage_uses_the_ml_covariance():
    trusted, untrusted, test = _spiked_batch(3.0, seed=26)
    mu = trusted.mean(0)
    whiten = _inverse_sqrt(np.cov(trusted.T, bias=True))
    s_u = np.cov(((untrusted - mu) @ whiten).T, bias=True)
    q = scipy.linalg.expm(4.0 * (s_u - np.eye(len(s_u))) / (np.linalg.norm(s_u, 2) - 1.0))
    z = (test - mu) @ whiten
    expected = np.einsum("ij,jk,ik->i", z, q / np.trace(q), z)
    ours = D.QUE(shrinkage=None).fit(trusted, untrusted).score(test)
    np.testing.assert_allclose(ours, expected, rtol=1e-9)


def _top_right_singular_vector(x):
    return np.linalg.svd(x, full_matrices=False)[2][0]


def test_spectral_signature_equals_tran_li_madry():
    """whiten=False: v = top right singular vector of the centred untrusted activations (SVD
    by numpy), score ((x - mu) . v)^2 with mu the trusted mean (madlens centres on the
    trusted mean; Tran et al. centre on the batch's own mean, the same v)."""
    trusted, untrusted, test = _spiked_batch(4.0, seed=28)
    v = _top_right_singular_vector(untrusted - untrusted.mean(0))
    expected = ((test - trusted.mean(0)) @ v) ** 2
    det = D.SpectralSignature(whiten=False).fit(trusted, untrusted)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-8)
    # the same direction PCA finds, and on a batch without excess variance too
    trusted, _ = _gaussian(500, 10, seed=14)
    untrusted, _ = _gaussian(300, 10, seed=15)
    top = PCA(n_components=1).fit(untrusted).components_[0]
    expected = ((untrusted - trusted.mean(0)) @ top) ** 2
    det = D.SpectralSignature(whiten=False).fit(trusted, untrusted)
    np.testing.assert_allclose(det.score(untrusted), expected, rtol=1e-8)


def test_whitened_spectral_signature_is_tran_li_madry_in_whitened_coordinates():
    """whiten=True: the same formula on z = (x - mu) Sigma^(-1/2), Sigma the trusted
    Ledoit-Wolf covariance (sklearn)."""
    trusted, untrusted, test = _spiked_batch(4.0, seed=30)
    mu = trusted.mean(0)
    whiten = _inverse_sqrt(LedoitWolf().fit(trusted).covariance_)
    z_untrusted = (untrusted - mu) @ whiten
    v = _top_right_singular_vector(z_untrusted - z_untrusted.mean(0))
    expected = (((test - mu) @ whiten) @ v) ** 2
    det = D.SpectralSignature().fit(trusted, untrusted)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-8)


def test_pca_residual_fraction_of_variance():
    trusted, _ = _gaussian(2000, 10, seed=16)
    pca = PCA().fit(trusted)
    k = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), 0.8) + 1)
    det = D.PCAResidual(n_components=0.8).fit(trusted)
    assert det.n_components_ == k
    test, _ = _gaussian(20, 10, seed=17)
    centred = test - pca.mean_
    kept = centred @ pca.components_[:k].T @ pca.components_[:k]
    np.testing.assert_allclose(det.score(test), np.linalg.norm(centred - kept, axis=1), rtol=1e-7)


# --- probes -------------------------------------------------------------------------------------


def test_mass_mean_probe_closed_form():
    trusted, _ = _gaussian(300, 6, seed=18)
    untrusted, _ = _gaussian(100, 6, seed=19)
    labels = np.r_[np.zeros(60), np.ones(40)]
    untrusted[40 + 20 :] += 1.0  # the last 40 rows are anomalous
    normal = np.concatenate([trusted, untrusted[:60]])
    anomalous = untrusted[60:]
    direction = anomalous.mean(0) - normal.mean(0)
    expected = (untrusted - (anomalous.mean(0) + normal.mean(0)) / 2) @ direction
    det = D.MassMeanProbe().fit(trusted, untrusted, labels=labels)
    np.testing.assert_allclose(det.score(untrusted), expected / np.linalg.norm(direction))


def test_logistic_probe_matches_sklearn():
    trusted, _ = _gaussian(300, 6, seed=20)
    untrusted, _ = _gaussian(100, 6, seed=21)
    untrusted[50:] += 0.8
    labels = np.r_[np.zeros(50), np.ones(50)]
    x = np.concatenate([trusted, untrusted])
    y = np.r_[np.zeros(300), labels]
    mean, scale = x.mean(0), x.std(0)
    ref = LogisticRegression(class_weight="balanced", max_iter=1000).fit((x - mean) / scale, y)
    expected = ref.decision_function((untrusted - mean) / scale)
    ours = D.LogisticProbe().fit(trusted, untrusted, labels=labels).score(untrusted)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-8)


def test_defection_probe_projects_on_the_contrast_mean_difference():
    trusted, _ = _gaussian(200, 5, seed=22)
    rng = np.random.default_rng(23)
    positive, negative = rng.normal(size=(4, 5)) + 1.0, rng.normal(size=(4, 5))
    test = rng.normal(size=(10, 5))
    direction = positive.mean(0) - negative.mean(0)
    expected = (test - trusted.mean(0)) @ direction / np.linalg.norm(direction)
    pairs = D.ContrastPairs(positive, negative)
    det = D.DefectionProbe(orient="contrast").fit(trusted, test, contrast=pairs)
    np.testing.assert_allclose(det.score(test), expected)


def test_logit_detectors_allow_masked_tokens(logits):
    """-inf logits (masked vocabulary) drop out of the softmax; NaN still raises."""
    masked = logits.copy()
    masked[:, 200:] = -np.inf
    stats = D.OutputStats(logits=masked)
    kept = D.OutputStats(logits=logits[:, :200])
    for det in (D.MSP(), D.Energy(temperature=2.0), D.Entropy(), D.MaxLogit()):
        np.testing.assert_allclose(det.score(stats), det.score(kept), rtol=1e-6)
