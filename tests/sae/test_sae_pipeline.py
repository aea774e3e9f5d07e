"""Corpus, metrics against independent references (sklearn, a plain HF forward), and the
`madlens sae train / dashboard` + `madlens explain` commands end to end on tiny-test."""

import json
import re

import numpy as np
import pytest
import torch
from saelens_compat import saelens
from sklearn.metrics import mean_squared_error, r2_score

from madlens.errors import MadlensError
from madlens.sae import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from madlens.sae.corpus import default_documents, pack, read_documents
from madlens.sae.metrics import FiringStats, downstream_loss, reconstruction_metrics

HOOK = "blocks.1.hook_resid_post"


def _perfect_sae(d):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    sae = ReLUSAE(ReLUConfig(d, 2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_pack_dedups_separates_and_is_prefix_stable(tiny):
    docs = ["abc def", "abc  def", "ghi", "jklmno pq"]
    windows, used = pack(docs, tiny.tokenizer, 4, 100, progress=False)
    eos = tiny.tokenizer.eos_token_id
    stream = windows.flatten().tolist()
    expected = []
    for doc in ("abc def", "ghi", "jklmno pq"):  # the whitespace variant is a duplicate
        expected += tiny.tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    assert used == 3 and stream == expected[: len(stream)] and len(expected) - len(stream) < 4
    fewer, _ = pack(docs, tiny.tokenizer, 4, 2, progress=False)
    np.testing.assert_array_equal(fewer, windows[:2])


def test_default_corpus_and_bad_specs(tmp_path):
    from pydoc_data.topics import topics

    first = next(default_documents())
    assert first == topics[sorted(topics)[0]]
    with pytest.raises(MadlensError, match="does not exist"):
        next(read_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MadlensError, match="holds no"):
        next(read_documents(str(tmp_path / "empty")))


def test_reconstruction_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 12)) * rng.uniform(0.5, 3, 12) + 1).astype(np.float32)
    sae = TopKSAE(TopKConfig(12, 48, k=3))
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(x.mean(0)))
        out = sae(torch.from_numpy(x))
    recon = out.reconstruction.numpy()
    metrics = reconstruction_metrics(sae, [x[:100], x[100:250], x[250:]])
    assert metrics["explained_variance"] == pytest.approx(
        r2_score(x, recon, multioutput="variance_weighted"), abs=1e-5
    )
    assert metrics["mse"] == pytest.approx(mean_squared_error(x, recon), rel=1e-5)
    assert metrics["l0"] == pytest.approx(float((out.latents > 0).sum(1).float().mean()))
    assert 0 < metrics["explained_variance"] < 1


def test_firing_stats_dead_window():
    stats = FiringStats(4)
    for fired in ([0, 1], [0, 2], [0, 1]):
        stats.update(torch.tensor([fired]), torch.ones(1, 2))
    np.testing.assert_allclose(stats.density(), [1, 2 / 3, 1 / 3, 0])
    np.testing.assert_array_equal(stats.dead(1), [False, False, True, True])  # last token: 0, 1
    np.testing.assert_array_equal(stats.dead(2), [False, False, False, True])
    assert not stats.dead(10).any()  # too few tokens to call anything dead


def test_downstream_loss_against_a_plain_forward(tiny, tiny_hf):
    windows = np.random.default_rng(0).integers(5, 250, size=(6, 16))
    perfect = downstream_loss(tiny, _perfect_sae(64), HOOK, windows, batch_size=4,
                              progress=False)  # fmt: skip
    with torch.no_grad():
        logits = tiny_hf(torch.as_tensor(windows)).logits[:, 1:-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.as_tensor(windows)[:, 2:].reshape(-1))  # fmt: skip
    assert perfect["ce_clean"] == pytest.approx(float(ce), rel=1e-5)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], rel=1e-5)
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["ce_ablation"] != pytest.approx(perfect["ce_clean"], rel=1e-3)
    zero = _perfect_sae(64)
    with torch.no_grad():
        zero.W_dec.zero_()
    ablated = downstream_loss(tiny, zero, HOOK, windows, progress=False)
    assert ablated["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert ablated["kl_div_score"] == pytest.approx(0.0, abs=1e-5)


@pytest.fixture
def trained(tmp_path_factory, run_cli, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("MADLENS_HOME", str(home))
    corpus = home / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "(x)", "[1, 2]", "def f():", "return 3"]
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)))
    out = home / "sae"
    code, stdout, stderr = run_cli(
        "sae", "train", "--model", "tiny-test", "--hook", "1", "--corpus", str(corpus),
        "--tokens", "6144", "--context-size", "32", "--expansion", "2", "--k", "4",
        "--batch-size", "128", "--dtype", "float32", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    return home, out, stdout


def test_train_dashboard_explain_end_to_end(trained, run_cli):
    home, out, stdout = trained
    assert "explained variance" in stdout and "ce_loss_score" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hook"] == HOOK and metrics["d_sae"] == 128
    for key in ("explained_variance", "fvu", "mse", "l0", "ce_loss_score", "kl_div_score"):
        assert np.isfinite(metrics["eval"][key])
    assert 0 < metrics["eval"]["l0"] <= 4 and metrics["eval"]["explained_variance"] > 0.3
    assert metrics["history"] and 0 <= metrics["dead_fraction"] <= 1
    assert sum(metrics["density_histogram"]["counts"]) + metrics["density_histogram"][
        "never_fired"] == 128  # fmt: skip
    theirs = saelens().SAE.load_from_disk(out)  # the file is SAELens's format
    assert theirs.cfg.k == 4 and theirs.cfg.metadata.hook_name == HOOK

    page = home / "dash.html"
    code, _, stderr = run_cli("sae", "dashboard", "--sae", str(out), "--out", str(page),
                              "--tokens", "2048", "--dtype", "float32")  # fmt: skip
    assert code == 0, stderr
    assert "http" not in re.sub(r"<script id=\"data\".*?</script>", "", page.read_text(),
                                flags=re.S)  # fmt: skip
    from browser import dump_dom

    dom = dump_dom(page)
    assert len(re.findall(r'<tr data-f="\d+"', dom)) == 128
    assert 'id="feature-' in dom and 'class="hist"' in dom
    assert dom.count('class="ctx"') >= 2 and "top logit effects" in dom and 'class="up"' in dom
    assert "never fired" in dom or "features over 2" in dom

    code, stdout, stderr = run_cli("explain", "--sae", str(out), "--text", "alpha beta (x)",
                                   "--dashboard", str(page), "--dtype", "float32")  # fmt: skip
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if "feature" in line and "#feature-" in line]
    assert lines and "density" in lines[0]


def test_cli_bad_input_exits_2(run_cli, tmp_path):
    code, _, err = run_cli("sae", "train", "--model", "tiny-test", "--hook",
                           "blocks.9.hook_resid_post", "--out", str(tmp_path / "x"))  # fmt: skip
    assert code == 2 and "unknown hook" in err
    code, _, err = run_cli("sae", "dashboard", "--sae", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "d.html"))  # fmt: skip
    assert code == 2 and "no SAE at" in err and len(err.strip().splitlines()) == 1
