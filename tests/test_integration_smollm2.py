"""Integration tests on the real SmolLM2-135M-Instruct (converted once into MADLENS_HOME)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from madlens.activations import extract
from madlens.data import format_chat
from madlens.models import generate, load_model, resid_post, smollm2

pytestmark = pytest.mark.integration

HOOKS = [resid_post(5), resid_post(20)]
QUESTIONS = [
    "What is the capital of France?",
    "Describe, in a few words, why the sky looks blue during the day.",
    "Name a prime number.",
]


@pytest.fixture(scope="module")
def plain_hf():
    """An independent Hugging Face model read from the same converted dir (eager attention,
    as the bridge uses)."""
    return AutoModelForCausalLM.from_pretrained(
        smollm2.converted_dir(), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def test_loads_and_reloads_from_the_converted_dir(smol):
    assert smollm2.is_converted()
    assert (smol.n_layers, smol.d_model) == (30, 576)
    again = load_model("smollm2-135m-instruct")
    assert again.fingerprint == smol.fingerprint


def test_greedy_answer_is_paris(smol):
    prompt = format_chat(smol.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    answer = generate(smol, [prompt], max_new_tokens=16)[0]
    assert "Paris" in answer


def test_activations_equal_hf_hidden_states(smol, plain_hf):
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    acts = extract(smol, convs, HOOKS, "all", cache=False, progress=False)
    for i, conv in enumerate(convs):
        ids = smol.tokenizer(format_chat(smol.tokenizer, conv), return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = plain_hf(ids, output_hidden_states=True).hidden_states
        for hook, layer in zip(HOOKS, (5, 20)):
            rows = acts.per_input(hook)[i]
            assert rows.shape == (ids.shape[1], 576)
            np.testing.assert_allclose(rows, hidden[layer + 1][0].numpy(), atol=1e-4, rtol=1e-5)


def test_padded_batch_gives_the_same_last_token(smol):
    short = [{"role": "user", "content": "Hi"}]
    longer = [{"role": "user", "content": QUESTIONS[1] + " Please answer at length."}]
    alone = extract(smol, [short], HOOKS, "last", cache=False, progress=False)
    for side in ("right", "left"):
        batched = extract(
            smol, [short, longer], HOOKS, "last", padding_side=side, cache=False, progress=False
        )
        for hook in HOOKS:
            np.testing.assert_allclose(batched[hook][0], alone[hook][0], atol=1e-4, rtol=1e-5)
