import numpy as np
import pytest
import torch

from madlens.activations import Activations, TruncationWarning, extract, stream
from madlens.activations import capture as capture_module
from madlens.data import format_chat
from madlens.errors import MadlensError
from madlens.models import resid_post

TEXTS = [
    "short",
    "a somewhat longer text, so the batch needs padding",
    "mid-length input here",
    "x",
    "The quick brown fox jumps over the lazy dog, twice over and again.",
]
CONVS = [
    [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]
HOOKS = [resid_post(0), resid_post(1)]


def hf_reference(model, hf, text):
    """A plain Hugging Face forward pass, with forward hooks on the decoder layers (the
    output of the final layer is not in `hidden_states`, which applies the final norm)."""
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    outs = {}
    handles = [
        layer.register_forward_hook(
            lambda mod, inp, out, i=i: outs.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i, layer in enumerate(hf.model.layers)
    ]
    try:
        with torch.no_grad():
            result = hf(ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return ids, result, outs


def test_last_position_matches_plain_hf_forward(tiny, tiny_hf):
    acts = extract(tiny, TEXTS, HOOKS, "last", cache=False, logits=True, progress=False)
    for i, text in enumerate(TEXTS):
        ids, result, layer_out = hf_reference(tiny, tiny_hf, text)
        np.testing.assert_allclose(acts[HOOKS[0]][i], result.hidden_states[1][0, -1], atol=1e-5)
        np.testing.assert_allclose(acts[HOOKS[1]][i], layer_out[1][0, -1], atol=1e-5)
        np.testing.assert_allclose(acts.logits[i], result.logits[0, -1], atol=1e-4)


def test_other_hooks_match_hf_modules(tiny, tiny_hf):
    hooks = ["hook_embed", "blocks.0.hook_mlp_out"]
    acts = extract(tiny, TEXTS[:2], hooks, "all", cache=False, progress=False)
    grabbed = {}
    handle = tiny_hf.model.layers[0].mlp.register_forward_hook(
        lambda mod, inp, out: grabbed.__setitem__("mlp", out)
    )
    try:
        for i, text in enumerate(TEXTS[:2]):
            ids = tiny.tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                tiny_hf(ids)
            embed = tiny_hf.model.embed_tokens(ids)[0].detach()
            np.testing.assert_allclose(acts.per_input("hook_embed")[i], embed, atol=1e-6)
            np.testing.assert_allclose(
                acts.per_input("blocks.0.hook_mlp_out")[i], grabbed["mlp"][0], atol=1e-5
            )
    finally:
        handle.remove()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_results_do_not_depend_on_batch(tiny, padding_side):
    alone = [extract(tiny, [t], HOOKS, "last", cache=False, progress=False) for t in TEXTS]
    batched = extract(
        tiny, TEXTS, HOOKS, "last", batch_size=4, padding_side=padding_side, cache=False,
        progress=False,
    )  # fmt: skip
    for hook in HOOKS:
        np.testing.assert_allclose(
            batched[hook], np.concatenate([a[hook] for a in alone]), atol=1e-5
        )


def test_all_positions_are_ragged_rows_per_input(tiny):
    acts = extract(tiny, TEXTS, HOOKS, "all", batch_size=2, cache=False, progress=False)
    n_tokens = [len(tiny.tokenizer(t).input_ids) for t in TEXTS]
    assert acts.lengths.tolist() == n_tokens
    assert acts[HOOKS[0]].shape == (sum(n_tokens), tiny.d_model)
    last = extract(tiny, TEXTS, HOOKS, "last", cache=False, progress=False)
    np.testing.assert_allclose(
        np.stack([rows[-1] for rows in acts.per_input(HOOKS[1])]), last[HOOKS[1]], atol=1e-5
    )


def test_response_and_mean_cover_the_answer_only(tiny):
    response = extract(tiny, CONVS, HOOKS, "response", cache=False, progress=False, logprobs=True)
    mean = extract(tiny, CONVS, HOOKS, "mean", cache=False, progress=False)
    answers = [conv[-1]["content"] for conv in CONVS]
    # The tiny tokenizer is byte level: one token per byte of the answer.
    assert response.lengths.tolist() == [len(a.encode()) for a in answers]
    assert [len(lp) for lp in response.token_logprobs] == response.lengths.tolist()
    for i, rows in enumerate(response.per_input(HOOKS[1])):
        np.testing.assert_allclose(mean[HOOKS[1]][i], rows.mean(0), atol=1e-5)
    # The response rows are the tail of the full transcript's rows, before <|im_end|>\n.
    full = extract(tiny, CONVS, HOOKS, "all", cache=False, progress=False)
    rows = full.per_input(HOOKS[0])[0]
    n = response.lengths[0]
    np.testing.assert_allclose(response.per_input(HOOKS[0])[0], rows[-n - 2 : -2], atol=1e-5)


def test_logprobs_match_log_softmax_of_hf_logits(tiny, tiny_hf):
    acts = extract(tiny, TEXTS[:3], [], "last", cache=False, progress=False, logprobs=True)
    for i, text in enumerate(TEXTS[:3]):
        ids, result, _ = hf_reference(tiny, tiny_hf, text)
        expected = torch.log_softmax(result.logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        np.testing.assert_allclose(acts.token_logprobs[i], expected, atol=1e-5)


def test_chat_input_uses_the_chat_template(tiny):
    conv = [{"role": "user", "content": "Hello"}]
    via_chat = extract(tiny, [conv], HOOKS, "last", cache=False, progress=False)
    via_text = extract(
        tiny, [format_chat(tiny.tokenizer, conv)], HOOKS, "last", cache=False, progress=False
    )
    np.testing.assert_array_equal(via_chat[HOOKS[1]], via_text[HOOKS[1]])


def test_cache_hit_skips_the_model(tiny, tmp_path, monkeypatch):
    first = extract(tiny, TEXTS, HOOKS, "last", logits=True, logprobs=True, cache_dir=tmp_path,
                    progress=False)  # fmt: skip

    def fail(*args, **kwargs):
        raise AssertionError("the model ran on a cache hit")

    monkeypatch.setattr(capture_module, "_run_batch", fail)
    second = extract(tiny, TEXTS, HOOKS, "last", logits=True, logprobs=True, cache_dir=tmp_path,
                     progress=False)  # fmt: skip
    for hook in HOOKS:
        np.testing.assert_array_equal(first[hook], second[hook])
    np.testing.assert_array_equal(first.logits, second.logits)
    for a, b in zip(first.token_logprobs, second.token_logprobs):
        np.testing.assert_array_equal(a, b)
    # A different position or different data is a different entry, so it must compute.
    with pytest.raises(AssertionError, match="cache hit"):
        extract(tiny, TEXTS[:2], HOOKS, "last", cache_dir=tmp_path, progress=False)


def test_cache_computes_only_missing_hooks(tiny, tmp_path, monkeypatch):
    extract(tiny, TEXTS, [HOOKS[0]], "last", cache_dir=tmp_path, progress=False)
    seen = []
    real = capture_module._run_batch

    def spy(model, batch, hooks, *args):
        seen.append(list(hooks))
        return real(model, batch, hooks, *args)

    monkeypatch.setattr(capture_module, "_run_batch", spy)
    both = extract(tiny, TEXTS, HOOKS, "last", cache_dir=tmp_path, progress=False)
    assert seen and all(hooks == [HOOKS[1]] for hooks in seen)
    assert both.hooks == HOOKS


def test_stream_yields_chunks_in_order(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "CHUNK", 2)
    chunks = list(stream(tiny, TEXTS, HOOKS, "all", cache_dir=tmp_path, progress=False))
    assert [len(c) for c in chunks] == [2, 2, 1]
    whole = extract(tiny, TEXTS, HOOKS, "all", cache=False, progress=False)
    joined = Activations.concat(chunks)
    np.testing.assert_allclose(joined[HOOKS[1]], whole[HOOKS[1]], atol=1e-5)
    assert joined.lengths.tolist() == whole.lengths.tolist()


def test_truncation_warns_or_fails(tiny):
    long_text = "word " * 100
    with pytest.warns(TruncationWarning, match="kept only their last 32"):
        acts = extract(tiny, [long_text, "hi"], HOOKS, "all", max_length=32, cache=False,
                       progress=False)  # fmt: skip
    assert acts.lengths.tolist() == [32, 2] and acts.truncated.tolist() == [True, False]
    with pytest.raises(MadlensError, match="longer than the context"):
        extract(tiny, [long_text], HOOKS, max_length=32, strict=True, cache=False, progress=False)


def test_bad_arguments_are_clear(tiny):
    with pytest.raises(MadlensError, match="unknown position"):
        extract(tiny, TEXTS, HOOKS, "first", cache=False)
    with pytest.raises(MadlensError, match="needs conversations"):
        extract(tiny, TEXTS, HOOKS, "response", cache=False)
    with pytest.raises(MadlensError, match="unknown hook"):
        extract(tiny, TEXTS, ["blocks.9.hook_resid_post"], cache=False)
    with pytest.raises(MadlensError, match="no inputs"):
        extract(tiny, [], HOOKS, cache=False)
    with pytest.raises(MadlensError, match="padding_side"):
        extract(tiny, TEXTS, HOOKS, padding_side="middle", cache=False)


def test_bfloat16_is_close_to_float32(tiny):
    from madlens.models import load_model

    bf = load_model("tiny-test", dtype="bfloat16")
    a = extract(tiny, TEXTS, HOOKS, cache=False, progress=False)[HOOKS[1]]
    b = extract(bf, TEXTS, HOOKS, cache=False, progress=False)[HOOKS[1]]
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_prompt_logprobs_cover_the_users_text_only(tiny, tiny_hf):
    conv = [{"role": "user", "content": "Tell me a joke"}]
    acts = extract(tiny, [conv], [], "last", cache=False, progress=False, logprobs=True)
    # byte-level tokenizer: one log-prob per byte of the user's message, not of the template
    assert len(acts.token_logprobs[0]) == len("Tell me a joke")
    text = format_chat(tiny.tokenizer, conv)
    ids = tiny.tokenizer(text, return_tensors="pt").input_ids
    start = len(tiny.tokenizer(text[: text.index("Tell me a joke")]).input_ids)
    with torch.no_grad():
        logits = tiny_hf(ids).logits[0]
    expected = torch.log_softmax(logits[start - 1 : start + 13], -1)
    expected = expected.gather(-1, ids[0, start : start + 14, None])[:, 0]
    np.testing.assert_allclose(acts.token_logprobs[0], expected, atol=1e-5)
