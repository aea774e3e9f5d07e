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
