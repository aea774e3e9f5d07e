import pytest
import torch

from madlens.circuits.ioi import make_ioi
from madlens.circuits.patching import PatchingSession, attention_between, path_patch


@pytest.mark.integration
def test_smollm2_does_ioi_with_name_movers_and_s_inhibition_heads(smol):
    """The heads the full discovery found on SmolLM2 (docs/circuits.md), re-measured on a
    small fresh sample: name movers in layer 23 and S-inhibition head 20.0."""
    data = make_ioi(smol.tokenizer, n=12, seed=1)
    s = PatchingSession(
        smol, data.tokens, data.corrupted_tokens, data.answers, data.end, progress=False
    )
    clean, corrupted = s.logit_diffs["clean"], s.logit_diffs["corrupted"]
    assert clean.mean() > 2 and (clean > 0).float().mean() >= 0.9
    assert clean.mean() - corrupted.mean() > 2
    direct = path_patch(s, "logits", "logits")
    to_io = attention_between(s, data.end, data.positions["IO"])
    to_s = sum(attention_between(s, data.end, data.positions[p]) for p in ("S1", "S2"))
    movers = (direct < 0.95) & (to_io > to_s)
    assert movers[23, 0] and movers.sum() <= 6
    senders = [(layer, head) for layer in (19, 20) for head in range(9)]
    to_queries = path_patch(s, [(23, 0), (23, 1), (23, 2)], "q", senders=senders)
    strongest = divmod(int(torch.nan_to_num(to_queries, nan=9).argmin()), 9)
    assert strongest == (20, 0) and to_queries[20, 0] < 0.95
    assert float(attention_between(s, data.end, data.positions["S2"])[20, 0]) > 0.5
