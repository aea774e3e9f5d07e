"""`activations.prefill`: one forward pass gives `extract`'s activations and a KV cache that
generation continues from, equal to Hugging Face's own `generate` on a model whose answers
depend on the prompt (the sharp tiny model: with tiny-test every prompt gets the same
answer, so an empty cache would go unnoticed)."""

import numpy as np
import torch

from madlens.activations import extract, prefill
from madlens.data import format_chat
from madlens.models import load_model

PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What is the capital of France, and why is it there?"}],
    [{"role": "user", "content": "zq"}],
]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


def test_prefill_cache_continues_like_hf_generate(sharp_dir):
    model = load_model(str(sharp_dir), dtype="float32", device="cpu")
    acts, state = prefill(model, PROMPTS, HOOKS, "last", logits=True)
    reference = extract(model, PROMPTS, HOOKS, "last", logits=True, cache=False, progress=False)
    for hook in HOOKS:
        np.testing.assert_allclose(acts[hook], reference[hook], rtol=1e-5, atol=1e-5)
    assert state.kv_cache.get_seq_length() == state.input_ids.shape[1]
    # greedy decoding from the prefill's cache, row by row against HF generate
    mask = state.attention_mask.clone()
    cache = state.kv_cache
    next_ids = state.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [next_ids]
    with torch.inference_mode():
        for _ in range(7):
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
            positions = (mask.cumsum(-1) - 1)[:, -1:]
            out = model.hf_model(next_ids, past_key_values=cache, attention_mask=mask,
                                 position_ids=positions, use_cache=True)  # fmt: skip
            cache = out.past_key_values
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_ids)
    ours = torch.cat(tokens, dim=1)
    answers = set()
    for i, prompt in enumerate(PROMPTS):
        ids = model.tokenizer(format_chat(model.tokenizer, prompt), return_tensors="pt")
        with torch.inference_mode():
            hf = model.hf_model.generate(**ids, max_new_tokens=8, do_sample=False,
                                         eos_token_id=None, pad_token_id=2)  # fmt: skip
        expected = hf[0, ids["input_ids"].shape[1] :]
        assert ours[i].tolist() == expected.tolist()
        answers.add(tuple(expected.tolist()))
    assert len(answers) == len(PROMPTS)  # the answers depend on the prompt


def test_other_forward_passes_fill_no_cache(sharp_dir):
    """Outside `prefill` the bridge's forward is untouched (no cache is filled)."""
    model = load_model(str(sharp_dir), dtype="float32", device="cpu")
    prefill(model, PROMPTS[:1], [], "last")  # installs the bridging once
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        model.bridge(ids, return_type="logits", past_key_values=None, cache=cache)
    assert cache.get_seq_length() == 0
