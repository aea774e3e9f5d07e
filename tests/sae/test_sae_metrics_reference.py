"""`downstream_loss` at interior values against a plain Hugging Face forward with the SAE's
reconstruction (or zeros) hooked into the decoder layer's output, scored with SAELens's
formulas: ce_loss_score = (CE_ablate - CE_sae) / (CE_ablate - CE_clean),
kl_div_score = (KL_ablate - KL_sae) / KL_ablate, KL(p_clean || p_run) per token.

The model is a 2-layer Llama on tiny-test's byte tokenizer with larger weights (init 0.2), so
that zero-ablating a layer moves the loss by ~0.3 nats, not ~0.01 as in tiny-test, and the
scores are ratios of differences well above float noise."""

import numpy as np
import pytest
import torch

from madlens.models import load_model
from madlens.models.tiny import tiny_tokenizer
from madlens.sae import ReLUConfig, ReLUSAE, TopKConfig, TopKSAE
from madlens.sae.metrics import downstream_loss

D_MODEL = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(madlens model, independent plain HF copy read from the same folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=259, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        initializer_range=0.2,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("llama")
    state = torch.random.get_rng_state()
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    torch.random.set_rng_state(state)
    tiny_tokenizer().save_pretrained(folder)
    plain = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return load_model(str(folder)), plain


def _random_topk(seed=0):
    sae = TopKSAE(TopKConfig(D_MODEL, 256, k=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        sae.normalize_decoder()
    return sae


def _scaled_identity(scale):
    """ReLU SAE with W_enc = [I, -I], W_dec = scale [I; -I]: reconstruction = scale * x, a
    known mix of the clean activation (weight `scale`) and the zero ablation."""
    sae = ReLUSAE(ReLUConfig(D_MODEL, 2 * D_MODEL))
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(scale * torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _hooked_logits(hf, layer, ids, replace):
    """Logits of the plain HF model with `replace` applied to layer `layer`'s output at every
    position but the first (which `downstream_loss` leaves clean with skip_first)."""
    outputs = {}

    def hook(module, args, output):
        outputs["norms"] = output[:, 1:].norm(dim=-1)
        if replace is None:
            return output
        new = output.clone()
        new[:, 1:] = replace(output[:, 1:])
        return new

    handle = hf.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = hf(ids).logits.double()
    finally:
        handle.remove()
    return logits, outputs["norms"]


def _reference(hf, layer, ids, sae):
    """CE and KL by hand over positions 1..n-2 (each predicting the next token)."""
    runs = {}
    for name, replace in (
        ("clean", None),
        ("sae", lambda act: sae(act).reconstruction),
        ("ablation", torch.zeros_like),
    ):
        logits, norms = _hooked_logits(hf, layer, ids, replace)
        runs[name] = logits[:, 1:-1].log_softmax(-1)
        if name == "clean":
            # the reference splices every row: valid only if no row is an attention sink
            assert float(norms.max() / norms.median()) < 5
    targets = ids[:, 2:]
    ce = {k: float(-v.gather(-1, targets[..., None]).mean()) for k, v in runs.items()}
    p = runs["clean"].exp()
    kl = {k: float((p * (runs["clean"] - runs[k])).sum(-1).mean()) for k in ("sae", "ablation")}
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_ablation": ce["ablation"],
        "kl_sae": kl["sae"],
        "kl_ablation": kl["ablation"],
        "ce_loss_score": (ce["ablation"] - ce["sae"]) / (ce["ablation"] - ce["clean"]),
        "kl_div_score": (kl["ablation"] - kl["sae"]) / kl["ablation"],
    }


@pytest.mark.parametrize(
    "layer, make_sae, interior",
    [
        (0, lambda: _scaled_identity(0.25), True),
        (0, lambda: _scaled_identity(0.5), True),
        (0, _random_topk, False),
        (1, _random_topk, False),
    ],
    ids=["quarter-identity-layer0", "half-identity-layer0", "topk-layer0", "topk-layer1"],
)
def test_downstream_loss_equals_a_hooked_hf_forward(models, layer, make_sae, interior):
    model, plain = models
    sae = make_sae()
    windows = np.random.default_rng(1).integers(5, 250, size=(6, 24))
    expected = _reference(plain, layer, torch.as_tensor(windows), sae)
    ours = downstream_loss(model, sae, f"blocks.{layer}.hook_resid_post", windows,
                           batch_size=4, progress=False)  # fmt: skip
    if interior:  # neither the perfect SAE (1) nor the ablating one (0)
        assert 0.1 < expected["ce_loss_score"] < 0.9
        assert 0.1 < expected["kl_div_score"] < 0.9
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert ours["tokens"] == windows.shape[0] * (windows.shape[1] - 2)


def test_a_scaled_reconstruction_before_the_final_norm_costs_nothing(models):
    """Closed form: the last layer's output feeds only the final RMSNorm, which divides out a
    positive scale, so x_hat = x / 2 there gives ce_loss_score = kl_div_score = 1 while the
    ablation costs a lot."""
    model, _ = models
    windows = np.random.default_rng(2).integers(5, 250, size=(4, 24))
    out = downstream_loss(model, _scaled_identity(0.5), "blocks.1.hook_resid_post", windows,
                          progress=False)  # fmt: skip
    assert out["kl_ablation"] > 0.5
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert out["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
