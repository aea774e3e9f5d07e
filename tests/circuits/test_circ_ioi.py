import pytest
import torch
from transformers import AutoTokenizer

from madlens.circuits.ioi import NAMES, TEMPLATES, make_ioi, single_token_words
from madlens.errors import MadlensError
from madlens.models import smollm2
from madlens.models.tiny import tiny_tokenizer


def check_alignment(data, tokenizer):
    rows = torch.arange(len(data))
    tokens, bad = data.tokens, data.corrupted_tokens
    assert torch.equal(tokens[rows, data.positions["IO"]], data.io_tokens)
    assert torch.equal(tokens[rows, data.positions["S1"]], data.s_tokens)
    assert torch.equal(tokens[rows, data.positions["S2"]], data.s_tokens)
    assert torch.equal(data.positions["S1+1"], data.positions["S1"] + 1)
    assert torch.equal(data.end, data.lengths - 1)
    assert (data.io_tokens != data.s_tokens).all()
    for i in range(len(data)):
        names = {int(data.positions[k][i]) for k in ("IO", "S1", "S2")}
        n = int(data.lengths[i])
        differ = {p for p in range(n) if tokens[i, p] != bad[i, p]}
        # The corruption swaps the three names and nothing else; its names are fresh.
        assert differ == names
        fresh = {int(bad[i, p]) for p in names}
        assert len(fresh) == 3 and not fresh & {int(data.io_tokens[i]), int(data.s_tokens[i])}
        # The prompt stops right before the answer: prompt + IO is the full sentence.
        full = tokenizer.decode(tokens[i, :n].tolist() + [int(data.io_tokens[i])])
        assert full.endswith(data.io_names[i]) and data.s_names[i] in full


def test_real_tokenizer_prompts_line_up_in_both_orders():
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.converted_dir()))
    assert len(single_token_words(tokenizer, NAMES)) >= 50
    data = make_ioi(tokenizer, n=24, seed=1)
    check_alignment(data, tokenizer)
    assert set(data.orders) == {"ABBA", "BABA"}
    for i, order in enumerate(data.orders):
        io, s1 = int(data.positions["IO"][i]), int(data.positions["S1"][i])
        assert (io < s1) == (order == "ABBA")
    assert data.prompts[0].startswith("When") and data.prompts[0].endswith(" to")
    assert set(data.template_ids.tolist()) == set(range(12))
    # Prompts of one template (either order) put names at the same token positions: the
    # basis of mean-ablation over ABC per template.
    for t in data.template_ids.unique():
        members = data.template_ids == t
        for name in ("S2", "END"):
            assert len(data.positions[name][members].unique()) == 1
        pairs = {
            frozenset((int(a), int(b)))
            for a, b in zip(data.positions["IO"][members], data.positions["S1"][members])
        }
        assert len(pairs) == 1


def test_byte_tokenizer_falls_back_to_letters_and_is_seeded():
    tokenizer = tiny_tokenizer()
    with pytest.warns(UserWarning, match="capital letters"):
        data = make_ioi(tokenizer, n=10, seed=5)
    check_alignment(data, tokenizer)
    assert all(len(name) == 1 for name in data.io_names + data.s_names)
    with pytest.warns(UserWarning):
        same = make_ioi(tokenizer, n=10, seed=5)
        other = make_ioi(tokenizer, n=10, seed=6)
    assert torch.equal(same.tokens, data.tokens) and same.prompts == data.prompts
    assert not torch.equal(other.tokens, data.tokens)


def test_baba_swaps_the_first_two_names_only():
    tokenizer = tiny_tokenizer()
    with pytest.warns(UserWarning):
        data = make_ioi(tokenizer, n=2, templates=[TEMPLATES[0]], orders=("ABBA", "BABA"))
    abba, baba = data.prompts
    assert (
        abba == f"When {data.io_names[0]} and {data.s_names[0]} went to the store, "
        f"{data.s_names[0]} gave a drink to"
    )
    assert baba.startswith(f"When {data.s_names[1]} and {data.io_names[1]} went")


def test_bad_requests_are_one_line_errors():
    tokenizer = tiny_tokenizer()
    with pytest.raises(MadlensError):
        make_ioi(tokenizer, n=0)
    with pytest.raises(MadlensError, match="orders"):
        make_ioi(tokenizer, n=2, orders=("AABB",))
    with pytest.raises(MadlensError, match="template"):
        make_ioi(tokenizer, n=2, templates=["[A] met [B]."])


# --- the circuit discovery finds on SmolLM2, checked by its properties ------------------------

# Two templates, so the prompts form two equal-length groups and every patched forward is one
# batch; a fresh sample (seed 7), not the prompts docs/circuits.md was written from.
IOI_TEMPLATES = [TEMPLATES[0], TEMPLATES[5]]
# (query position, key position, positions it must attend to less) for each class's role
ROLES = {
    "name_mover": ("END", "IO", ("S1", "S2")),
    "negative_name_mover": ("END", "IO", ("S1", "S2")),
    "s_suppression": ("END", "S2", ("IO",)),
    "s_inhibition": ("END", "S2", ("IO",)),
    "induction": ("S2", "S1+1", ("S1",)),
    "duplicate_token": ("S2", "S1", ("S1+1",)),
    "previous_token": ("S1+1", "S1", ()),
}
# The attention a sender needs to be selectable from each path-patching scan's map.
SCAN_ATTENTION = {"q": [("END", "S2")], "v": [("S2", "S1+1"), ("S2", "S1")], "k": [("S1+1", "S1")]}


@pytest.fixture(scope="module")
def smol_ioi():
    """(discovered circuit, prompts, a plain float32 HF copy of SmolLM2 with eager attention).

    Two shortcuts cut discovery to about 11 minutes on a busy two-core machine, neither
    changing what it selects: each path-patching scan measures only the senders that attend to
    the key their class needs (at least `min_attention`; no other head can be selected from
    that scan, and every sender's path effect is measured alone, so the kept values are those
    of a full scan); the activation-patching maps, which only the report draws, are not
    computed. Results are cached under MADLENS_HOME/circuits-test (their own folder: the
    shortcut maps are not the full ones), so a rerun takes about 10 s, as the bench test
    reuses its fine-tune.
    """
    from transformers import AutoModelForCausalLM

    from madlens import cache
    from madlens.circuits import patching
    from madlens.circuits.discovery import discover_ioi
    from madlens.models import load_model

    model = load_model("smollm2-135m-instruct", dtype="bfloat16")
    data = make_ioi(model.tokenizer, n=16, seed=7, templates=IOI_TEMPLATES)
    path_patch = patching.path_patch

    def attending_senders(session, receivers, receiver_input="q", **kwargs):
        if receiver_input in SCAN_ATTENTION and "senders" not in kwargs:
            attends = sum(
                patching.attention_between(session, data.positions[q], data.positions[k]) >= 0.1
                for q, k in SCAN_ATTENTION[receiver_input]
            )
            kwargs["senders"] = [tuple(h) for h in torch.nonzero(attends).tolist()]
        return path_patch(session, receivers, receiver_input, **kwargs)

    def not_drawn(session, *args, **kwargs):
        return torch.full((session.n_layers, session.n_heads), float("nan"))

    threads = torch.get_num_threads()
    # the package's one-thread rule is for many tiny forwards; these are large ones
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(patching, "path_patch", attending_senders)
            mp.setattr(patching, "patch_head_out", not_drawn)
            mp.setattr(patching, "patch_layer_pos", lambda s, *a, **k: (not_drawn(s), []))
            circuit = discover_ioi(model, data=data, min_attention=0.1, progress=False,
                                   cache_dir=cache.folder("circuits-test"))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    plain = AutoModelForCausalLM.from_pretrained(
        smollm2.converted_dir(), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return circuit, data, plain


def _head_outputs(plain, tokens):
    """Every layer's o_proj input (the heads' outputs z, concatenated) on `tokens`."""
    captured, handles = {}, []
    for layer, block in enumerate(plain.model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, layer=layer: captured.__setitem__(layer, args[0].clone())
        ))  # fmt: skip
    try:
        with torch.no_grad():
            plain(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _hf_run(plain, data, replace=None):
    """(attentions, IO - S logit difference per prompt) of a plain HF forward on the clean
    prompts; `replace[(layer, head)]` (n, pos, d_head) is written over that head's output."""
    d_head = plain.config.hidden_size // plain.config.num_attention_heads
    by_layer = {}
    for (layer, head), value in (replace or {}).items():
        by_layer.setdefault(layer, []).append((head, value))

    def patch(args, layer):
        z = args[0].clone()
        for head, value in by_layer[layer]:
            z[..., head * d_head : (head + 1) * d_head] = value
        return (z,)

    handles = [
        plain.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, layer=layer: patch(args, layer)
        )
        for layer in by_layer
    ]
    try:
        with torch.no_grad():
            out = plain(data.tokens, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    rows = torch.arange(len(data))
    final = out.logits[rows, data.end]
    return out.attentions, final[rows, data.io_tokens] - final[rows, data.s_tokens]


def _head(z, head, d_head):
    return z[..., head * d_head : (head + 1) * d_head]


def _attention(attentions, data, layer, head, query, key):
    rows = torch.arange(len(data))
    pattern = attentions[layer][rows, head]
    return float(pattern[rows, data.positions[query], data.positions[key]].mean())


@pytest.mark.integration
def test_smollm2_ioi_circuit_has_the_papers_properties(smol_ioi):
    """Whatever heads discovery picks, the circuit must be small and faithful, and each head
    must do its class's job, all re-measured in a plain float32 HF forward (not the bf16
    bridge discovery used): its attention on the IOI prompts, the faithfulness of the circuit
    with every other head mean-ablated over the ABC prompts of its template, and the logit
    difference lost when the name movers or S-inhibition heads read the ABC prompts."""
    circuit, data, plain = smol_ioi
    n_layers, n_heads = circuit.n_layers, circuit.n_heads
    d_head = plain.config.hidden_size // plain.config.num_attention_heads
    attentions, clean = _hf_run(plain, data)
    gap = float(clean.mean()) - circuit.corrupted_logit_diff
    assert clean.mean() > 2 and (clean > 0).float().mean() >= 0.9
    assert circuit.clean_logit_diff == pytest.approx(float(clean.mean()), abs=0.3)  # bf16
    assert gap > 2
    assert 0 < len(circuit.circuit) <= n_layers * n_heads // 10
    assert circuit.heads["name_mover"] and circuit.heads["s_inhibition"]

    for name, heads in circuit.heads.items():
        query, key, others = ROLES[name]
        for layer, head in heads:
            to_key = _attention(attentions, data, layer, head, query, key)
            to_others = [_attention(attentions, data, layer, head, query, k) for k in others]
            assert to_key >= 0.08, (name, layer, head, to_key)
            if name in ("name_mover", "negative_name_mover"):
                assert to_key > sum(to_others), (name, layer, head, to_key, to_others)
            else:
                assert all(to_key > other for other in to_others), (name, layer, head)

    corrupted = _head_outputs(plain, data.corrupted_tokens)
    means = {}
    for layer, z in corrupted.items():  # mean over the ABC prompts of each template
        means[layer] = torch.empty_like(z)
        for t in data.template_ids.unique():
            members = data.template_ids == t
            means[layer][members] = z[members].mean(0, keepdim=True)
    kept = set(circuit.circuit)
    ablate = {(layer, head): _head(means[layer], head, d_head)
              for layer in range(n_layers) for head in range(n_heads)
              if (layer, head) not in kept}  # fmt: skip
    _, circuit_only = _hf_run(plain, data, ablate)
    faithfulness = float(circuit_only.mean() / clean.mean())
    assert faithfulness > 0.6
    assert circuit.faithfulness == pytest.approx(faithfulness, abs=0.1)

    for name, least in (("name_mover", 0.05), ("s_inhibition", 0.2)):
        patched = {(layer, head): _head(corrupted[layer], head, d_head)
                   for layer, head in circuit.heads[name]}  # fmt: skip
        _, diff = _hf_run(plain, data, patched)
        assert float(clean.mean() - diff.mean()) > least * gap, name
