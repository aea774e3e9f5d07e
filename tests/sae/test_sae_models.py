"""TopK and ReLU SAEs against SAELens: same latents from the same files (both directions),
same training loss and gradients; geometric median, buffer and resampling by hand."""

import json

import numpy as np
import pytest
import torch
from saelens_compat import saelens

from madlens.errors import MadlensError
from madlens.sae import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE, load_sae, save_sae
from madlens.sae.base import geometric_median
from madlens.sae.buffer import shuffled_batches
from madlens.sae.relu import resample_dead_latents

D_IN, D_SAE = 16, 64


def _randomised(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.normalize_decoder()
    return sae


def _x(n=200, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_saelens_loads_a_madlens_sae_to_the_same_latents(arch, tmp_path):
    sae = (TopKSAE(TopKConfig(D_IN, D_SAE, k=5)) if arch == "topk"
           else ReLUSAE(ReLUConfig(D_IN, D_SAE)))  # fmt: skip
    _randomised(sae)
    sae.cfg.metadata = {"model_name": "tiny-test", "hook_name": "blocks.0.hook_resid_post"}
    save_sae(sae, tmp_path / "sae")
    theirs = saelens().SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs).__name__ == ("TopKSAE" if arch == "topk" else "StandardSAE")
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = _x()
    with torch.no_grad():
        ours, reference = sae.encode(x), theirs.encode(x)
        torch.testing.assert_close(ours, reference)
        torch.testing.assert_close(sae(x).reconstruction, theirs(x))
    if arch == "topk":
        assert ((ours > 0).sum(1) <= 5).all() and (ours > 0).sum() > len(x)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_madlens_loads_an_saelens_sae(arch, tmp_path):
    saes = saelens()
    if arch == "topk":  # a training SAE that rescales by decoder norms: the norms get folded
        cfg = saes.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6,
                                         rescale_acts_by_decoder_norm=True)  # fmt: skip
        theirs = saes.TopKTrainingSAE(cfg)
    else:
        theirs = saes.StandardSAE(saes.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = _x()
    with torch.no_grad():
        expected_out = theirs(x)
    if arch == "topk":
        theirs.save_inference_model(tmp_path / "sae")
    else:
        theirs.save_model(tmp_path / "sae")
    reloaded = saes.SAE.load_from_disk(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), reloaded.encode(x))
        torch.testing.assert_close(ours(x).reconstruction, expected_out, rtol=1e-4, atol=1e-4)


def test_topk_training_loss_and_gradients_match_saelens():
    saes = saelens()
    cfg = saes.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss_coefficient=0.5,
                                     rescale_acts_by_decoder_norm=False)  # fmt: skip
    theirs = saes.TopKTrainingSAE(cfg)
    ours = _randomised(TopKSAE(TopKConfig(D_IN, D_SAE, k=4, aux_coefficient=0.5)))
    x = _x(64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    # AuxK reads the largest dead pre-activations; madlens ReLUs them (as sparsify does),
    # SAELens does not, so the dead latents get pre-activations that are positive anyway
    with torch.no_grad():
        ours.b_enc[dead] += 8.0
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
    from sae_lens.saes.sae import TrainStepInput

    out = theirs.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    out.loss.backward()
    loss = ours.training_loss(x, dead)
    loss.total.backward()
    torch.testing.assert_close(loss.mse, out.losses["mse_loss"], rtol=1e-4, atol=1e-4)
    aux = out.losses["auxiliary_reconstruction_loss"]
    torch.testing.assert_close(loss.auxiliary, aux, rtol=1e-4, atol=1e-4)
    assert float(loss.auxiliary.detach()) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_load_errors(tmp_path):
    with pytest.raises(MadlensError, match="not a directory"):
        load_sae(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(MadlensError, match="cfg.json is missing"):
        load_sae(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text("{not json")
    with pytest.raises(MadlensError, match="not valid JSON"):
        load_sae(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({"architecture": "gated"}))
    with pytest.raises(MadlensError, match="'gated' is not supported"):
        load_sae(tmp_path / "a")
    save_sae(TopKSAE(TopKConfig(D_IN, D_SAE, k=2)), tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(cfg | {"d_sae": 32}))
    with pytest.raises(MadlensError, match="shape"):
        load_sae(tmp_path / "b")


def test_geometric_median_of_collinear_points_is_their_median():
    values = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0])
    points = values[:, None] * torch.tensor([[3.0, 4.0]]) / 5 + torch.tensor([1.0, -1.0])
    expected = torch.tensor([1.0, -1.0]) + 2.0 * torch.tensor([3.0, 4.0]) / 5
    torch.testing.assert_close(geometric_median(points, iterations=500), expected, atol=1e-3,
                               rtol=0)  # fmt: skip
    assert (points.mean(0) - expected).norm() > 1  # the mean is elsewhere


def test_shuffle_buffer_yields_every_row_once_in_mixed_order():
    chunks = [np.arange(i * 100, (i + 1) * 100)[:, None].repeat(2, 1) for i in range(7)]
    batches = list(shuffled_batches(chunks, batch_size=32, capacity=128, seed=0))
    rows = np.concatenate(batches)[:, 0]
    assert sorted(rows.tolist()) == list(range(700))
    assert all(len(b) == 32 for b in batches[:-1])
    assert np.abs(np.diff(rows)).mean() > 10  # not in input order
    again = np.concatenate(list(shuffled_batches(chunks, 32, 128, seed=0)))[:, 0]
    np.testing.assert_array_equal(rows, again)  # seeded


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs():
    sae = _randomised(ReLUSAE(ReLUConfig(D_IN, D_SAE)))
    x = torch.zeros(50, D_IN)
    x[7] = torch.arange(D_IN, dtype=torch.float32) + 100  # the one input with a large error
    with torch.no_grad():
        sae.b_dec.zero_()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[3, 9]] = True
    alive_before = sae.W_dec[~dead].clone()
    assert resample_dead_latents(sae, x, dead) == 2
    direction = x[7] / x[7].norm()
    for j in (3, 9):
        torch.testing.assert_close(sae.W_dec[j], direction)
        assert torch.nn.functional.cosine_similarity(sae.W_enc[:, j], direction, dim=0) > 0.999
        assert sae.b_enc[j] == 0
    torch.testing.assert_close(sae.W_dec[~dead], alive_before)
