import pytest
import torch
from transformer_lens import patching as tl_patching

from madlens.circuits.patching import (
    PatchingSession,
    ablate_heads,
    attention_between,
    head_means,
    patch_head_out,
    patch_layer_pos,
    path_patch,
    resid_pre,
)
from madlens.errors import MadlensError


def logit_diff(logits, data):
    """Reference metric on full logits: mean over prompts of logit(IO) - logit(S) at END."""
    last = logits[torch.arange(len(data)), data.end]
    picked = last.gather(1, data.answers)
    return (picked[:, 0] - picked[:, 1]).mean()


def session_for(model, data):
    return PatchingSession(
        model, data.tokens, data.corrupted_tokens, data.answers, data.end, progress=False
    )


def test_logit_diffs_match_a_plain_hugging_face_forward(tiny_session, tiny_data, tiny_hf):
    with torch.inference_mode():
        for run, tokens in (("clean", tiny_data.tokens), ("corrupted", tiny_data.corrupted_tokens)):
            logits = tiny_hf(tokens).logits
            last = logits[torch.arange(len(tiny_data)), tiny_data.end].gather(1, tiny_data.answers)
            expected = last[:, 0] - last[:, 1]
            torch.testing.assert_close(tiny_session.logit_diffs[run], expected, atol=1e-5, rtol=0)


def test_clean_into_clean_is_the_identity(tiny_session, tiny_data):
    s = tiny_session
    ones = torch.ones(s.n_layers, s.n_heads)
    torch.testing.assert_close(patch_head_out(s, source="clean"), ones, atol=1e-3, rtol=0)
    for hook in ("resid_pre", "attn_out", "mlp_out"):
        values, labels = patch_layer_pos(s, hook, tiny_data.positions, source="clean")
        assert labels == list(tiny_data.positions)
        torch.testing.assert_close(values, torch.ones_like(values), atol=1e-3, rtol=0)
    for receiver_input in ("q", "k", "v"):
        values = path_patch(s, [(1, 0), (1, 3)], receiver_input, source="clean")
        torch.testing.assert_close(values[0], torch.ones(s.n_heads), atol=1e-3, rtol=0)
        assert values[1].isnan().all()  # no path from a receiver's own layer
    torch.testing.assert_close(path_patch(s, "logits", "logits", source="clean"), ones)


def test_patching_everything_from_the_corrupted_run_gives_zero(tiny_session, tiny_data):
    s = tiny_session
    for group in s.groups:
        corrupted = s.take("corrupted", resid_pre(0), group)
        hooks = [(resid_pre(0), lambda act, hook, new=corrupted: new)]
        lds = s.logit_diff_from(0, s.take("clean", resid_pre(0), group), group, hooks)
        torch.testing.assert_close(
            lds[0], s.logit_diffs["corrupted"][group.rows], atol=1e-5, rtol=0
        )
    # One position at a time at layer 0: where the two prompts share the token, nothing moves.
    raw, _ = patch_layer_pos(s, "resid_pre", normalise=False)
    same = (tiny_data.tokens == tiny_data.corrupted_tokens).all(0)
    clean = s.logit_diffs["clean"].mean()
    torch.testing.assert_close(raw[0, same], clean.expand(int(same.sum())), atol=1e-5, rtol=0)
    assert (raw[0, ~same] - clean).abs().max() > 1e-4


def test_batched_patching_matches_transformer_lens(tiny, tiny_session, tiny_data):
    """TransformerLens's own per-index loop (clean activations into the corrupted run)."""
    s, d = tiny_session, tiny_data
    with torch.inference_mode():
        _, clean_cache = tiny.bridge.run_with_cache(d.tokens)
        metric = lambda logits: logit_diff(logits, d)  # noqa: E731
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(
            tiny.bridge, d.corrupted_tokens, clean_cache, metric
        )
        resid = tl_patching.get_act_patch_resid_pre(
            tiny.bridge, d.corrupted_tokens, clean_cache, metric
        )
        mlp = tl_patching.get_act_patch_mlp_out(
            tiny.bridge, d.corrupted_tokens, clean_cache, metric
        )
    mine = patch_head_out(s, base="corrupted", source="clean", normalise=False)
    torch.testing.assert_close(mine, heads, atol=1e-5, rtol=0)
    for hook, expected in (("resid_pre", resid), ("mlp_out", mlp)):
        mine, _ = patch_layer_pos(s, hook, base="corrupted", source="clean", normalise=False)
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("receiver_input", ["q", "k", "v"])
def test_direct_path_patching_matches_transformer_lens(mha, letters_ioi, receiver_input):
    """With MLPs frozen, path patching is TransformerLens's direct edge A -> B (defined for
    keys and values on a model without grouped-query attention)."""
    d = letters_ioi(mha.tokenizer, 6, seed=1, templates=["When [A] and [B] met, [B] thanked [A]"])
    s = session_for(mha, d)
    with torch.inference_mode():
        _, clean_cache = mha.bridge.run_with_cache(d.tokens)
        _, corrupted_cache = mha.bridge.run_with_cache(d.corrupted_tokens)
        expected = tl_patching.get_act_patch_direct_path(
            mha.bridge, d.corrupted_tokens, clean_cache, corrupted_cache,
            lambda logits: logit_diff(logits, d), 0, 2, component=receiver_input, verbose=False,
        )  # fmt: skip
    for head in range(4):
        mine = path_patch(
            s, [(1, head)], receiver_input, senders=[(0, 2)], base="corrupted", source="clean",
            through_mlps=False, normalise=False,
        )  # fmt: skip
        torch.testing.assert_close(mine[0, 2], expected[1, head], atol=1e-5, rtol=0)
    assert (expected[1] - s.logit_diffs["corrupted"].mean()).abs().max() > 1e-4


def test_query_path_patching_under_grouped_query_attention(tiny, tiny_session, tiny_data):
    d = tiny_data
    with torch.inference_mode():
        _, clean_cache = tiny.bridge.run_with_cache(d.tokens)
        _, corrupted_cache = tiny.bridge.run_with_cache(d.corrupted_tokens)
        expected = tl_patching.get_act_patch_direct_path(
            tiny.bridge, d.corrupted_tokens, clean_cache, corrupted_cache,
            lambda logits: logit_diff(logits, d), 0, 1, component="q", verbose=False,
        )  # fmt: skip
    mine = [
        path_patch(
            tiny_session, [(1, head)], "q", senders=[(0, 1)], base="corrupted", source="clean",
            through_mlps=False, normalise=False,
        )[0, 1]
        for head in range(4)
    ]  # fmt: skip
    torch.testing.assert_close(torch.stack(mine), expected[1], atol=1e-5, rtol=0)


def test_a_head_with_zero_output_changes_nothing(silenced, tiny_data):
    s = session_for(silenced, tiny_data)
    clean = s.logit_diffs["clean"].mean()
    receivers = [(1, 0), (1, 1), (1, 3)]
    for receiver_input in ("q", "k", "v"):
        silent = path_patch(s, receivers, receiver_input, senders=[(0, 1)], normalise=False)
        torch.testing.assert_close(silent[0, 1], clean, atol=1e-5, rtol=0)
    direct = path_patch(s, "logits", "logits", normalise=False)
    torch.testing.assert_close(direct[0, 1], clean, atol=1e-6, rtol=0)
    # The same measurements on an ordinary head do move the metric.
    for receiver_input in ("q", "k", "v"):
        loud = path_patch(s, receivers, receiver_input, senders=[(0, 2)], normalise=False)
        assert abs(float(loud[0, 2] - clean)) > 1e-3
    assert abs(float(direct[0, 2] - clean)) > 1e-3


def test_direct_path_is_the_heads_write_through_the_unembedding(tiny, tiny_session, tiny_hf):
    """Closed form: final residual + (z_corrupted - z_clean) @ W_O[h] at END, then the plain
    HF final norm and unembedding."""
    s = tiny_session
    rows = torch.arange(s.n)
    direct = path_patch(s, "logits", "logits", normalise=False)
    final = s.caches["clean"]["ln_final.hook_in"][rows, s.end]
    for layer in range(s.n_layers):
        w_o = tiny.bridge.blocks[layer].attn.W_O  # (head, d_head, d_model)
        z = {run: s.caches[run][f"blocks.{layer}.attn.hook_z"][rows, s.end] for run in s.caches}
        for head in range(s.n_heads):
            delta = (z["corrupted"][:, head] - z["clean"][:, head]) @ w_o[head]
            with torch.inference_mode():
                logits = tiny_hf.lm_head(tiny_hf.model.norm(final + delta))
            picked = logits.gather(1, s.answers)
            expected = (picked[:, 0] - picked[:, 1]).mean()
            torch.testing.assert_close(direct[layer, head], expected, atol=1e-5, rtol=0)


def test_one_layer_attention_only_direct_path_equals_activation_patching(planted, planted_data):
    s = session_for(planted, planted_data)
    direct = path_patch(s, "logits", "logits")
    torch.testing.assert_close(direct, patch_head_out(s), atol=1e-5, rtol=0)
    assert direct[0, 0] < 0.8 and direct[0, 1] > 1.1  # the planted mover and its opposite


def test_mean_ablation(tiny, tiny_session, tiny_data):
    s, d = tiny_session, tiny_data
    means = head_means(s, d.groups())
    z = s.caches["corrupted"]["blocks.1.attn.hook_z"]
    members = d.groups() == d.groups()[0]
    torch.testing.assert_close(means[1][0], z[members].mean(0), atol=1e-6, rtol=0)
    # Each prompt its own group: the "means" are its corrupted activations, so ablating every
    # head is the corrupted run's heads pasted into the clean run, done here by TransformerLens.
    own = head_means(s, torch.arange(s.n))
    everything = torch.ones(s.n_layers, s.n_heads, dtype=torch.bool)
    nothing = torch.zeros_like(everything)
    lds = ablate_heads(s, torch.stack([everything, nothing]), own, normalise=False)
    with torch.inference_mode():
        _, corrupted = tiny.bridge.run_with_cache(d.corrupted_tokens)
        hooks = [
            (f"blocks.{layer}.attn.hook_z", lambda act, hook: corrupted[hook.name])
            for layer in range(s.n_layers)
        ]
        logits = tiny.bridge.run_with_hooks(d.tokens, fwd_hooks=hooks)
    torch.testing.assert_close(lds[0], logit_diff(logits, d), atol=1e-5, rtol=0)
    torch.testing.assert_close(lds[1], s.logit_diffs["clean"].mean(), atol=1e-5, rtol=0)


def test_attention_between_reads_the_pattern(tiny, tiny_session, tiny_data):
    d = tiny_data
    with torch.inference_mode():
        _, cache = tiny.bridge.run_with_cache(d.tokens)
    got = attention_between(tiny_session, d.end, d.positions["IO"])
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        expected = torch.stack(
            [pattern[i, :, d.end[i], d.positions["IO"][i]] for i in range(len(d))]
        ).mean(0)
        torch.testing.assert_close(got[layer], expected)
    assert got.min() >= 0 and got.max() <= 1


def test_bad_arguments_are_madlens_errors(tiny, tiny_session, tiny_data):
    d = tiny_data
    with pytest.raises(MadlensError, match="line up"):
        PatchingSession(tiny, d.tokens, d.corrupted_tokens[:, :-1], d.answers, d.end)
    with pytest.raises(MadlensError, match="receiver_input"):
        path_patch(tiny_session, [(1, 0)], "z")
    with pytest.raises(MadlensError, match="logits"):
        path_patch(tiny_session, [(1, 0)], "logits")
    with pytest.raises(MadlensError, match="run must be"):
        patch_head_out(tiny_session, base="dirty")
    with pytest.raises(MadlensError, match="hook"):
        patch_layer_pos(tiny_session, "attn_z")
