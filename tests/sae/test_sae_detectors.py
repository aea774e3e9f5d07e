"""`sae-recon` and `sae-rare`: by-hand scores with a given SAE, planted anomalies with the
SAE fit on trusted data, and one-hook pretrained use."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from madlens.detectors import get_detector
from madlens.errors import MadlensError
from madlens.sae import TopKConfig, TopKSAE, save_sae


def _planted(seed=0, d=32, n_trusted=400, n_test=100):
    """Trusted rows: sparse sums of 24 common directions in a 16-d subspace. Anomalies: the
    same plus 3 of 8 directions trusted data almost never uses, outside that subspace."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    common = rng.normal(size=(24, 16)) @ basis[:, :16].T
    rare = rng.normal(size=(8, 16)) @ basis[:, 16:].T

    def rows(n, n_rare):
        x = np.zeros((n, d))
        for i in range(n):
            x[i] = rng.exponential(size=3) @ common[rng.choice(24, 3, replace=False)]
            if n_rare:
                x[i] += rng.exponential(size=n_rare) @ rare[rng.choice(8, n_rare, replace=False)]
        return (x + rng.normal(scale=0.05, size=x.shape)).astype(np.float32)

    test = np.concatenate([rows(n_test, 0), rows(n_test, 3)])
    labels = np.r_[np.zeros(n_test), np.ones(n_test)]
    return rows(n_trusted, 0), test, labels


@pytest.mark.parametrize("name, floor", [("sae-recon", 0.9), ("sae-rare", 0.8)])
def test_planted_anomalies_score_higher(name, floor):
    trusted, test, labels = _planted()
    scores = get_detector(name).fit(trusted).score(test)  # the bench's defaults
    assert roc_auc_score(labels, scores) > floor


def test_scores_by_hand_with_a_pretrained_sae(tmp_path):
    trusted, test, _ = _planted(1)
    sae = TopKSAE(TopKConfig(32, 96, k=5), seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(trusted.mean(0)))
    save_sae(sae, tmp_path / "sae")
    hook = "blocks.3.hook_resid_post"
    recon = get_detector("sae-recon", sae=str(tmp_path / "sae")).fit({hook: trusted})
    with torch.no_grad():
        expected = sae(torch.from_numpy(test)).reconstruction - torch.from_numpy(test)
    np.testing.assert_allclose(recon.per_hook_[hook].score(test),
                               expected.pow(2).sum(1).numpy(), rtol=1e-4)  # fmt: skip
    rare = get_detector("sae-rare", sae=str(tmp_path / "sae")).fit(trusted)
    with torch.no_grad():
        fired_trusted = (sae.encode(torch.from_numpy(trusted)) > 0).numpy()
        fired_test = (sae.encode(torch.from_numpy(test)) > 0).numpy()
    p = (fired_trusted.sum(0) + 1) / (len(trusted) + 2)
    nll = -(fired_test * np.log(p) + (~fired_test) * np.log1p(-p)).sum(1)
    np.testing.assert_allclose(rare.score(test), nll, rtol=1e-6)
    top = np.argmax(rare.surprise(test[:1])[0])
    assert fired_test[0, top] and p[top] == p[fired_test[0]].min()
    with pytest.raises(MadlensError, match="belongs to one hook"):
        get_detector("sae-recon", sae=str(tmp_path / "sae")).fit({hook: trusted, "h2": trusted})
    with pytest.raises(MadlensError, match="reads 32 features"):
        get_detector("sae-recon", sae=str(tmp_path / "sae")).fit(trusted[:, :8])
