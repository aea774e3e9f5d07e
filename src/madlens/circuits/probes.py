"""Attention-pattern probes for head types on repeated random tokens: previous-token,
duplicate-token and induction scores for every head, as mean attention on the telltale key."""

from typing import Any

import torch

PROBES = ("previous_token", "duplicate_token", "induction")


def repeated_tokens(
    tokenizer: Any, n_sequences: int = 20, length: int = 20, seed: int = 0
) -> torch.Tensor:
    """`(n_sequences, 1 + 2 * length)`: BOS, then `length` distinct random ordinary tokens,
    then the same tokens again."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    generator = torch.Generator().manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for _ in range(n_sequences):
        pick = torch.randperm(len(vocab), generator=generator)[:length]
        half = torch.tensor(vocab)[pick]
        rows.append(torch.cat([torch.tensor([bos]), half, half]))
    return torch.stack(rows)


def scores_from_patterns(patterns: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """Probe scores from attention patterns `(..., head, pos, pos)` of repeated sequences
    (BOS at 0, first copy at 1..length, second at length+1..2*length), averaged over
    everything but the head axis:

    - previous_token: attention from each position t >= 1 to t - 1;
    - duplicate_token: from t = length + 1 + i to the earlier copy of its token, 1 + i;
    - induction: from t = length + 1 + i to the token after the earlier copy, 2 + i
      (i < length - 1, so the key is never t itself).
    """
    p = patterns.float()
    pos = torch.arange(1, 2 * length + 1, device=p.device)
    second = torch.arange(length + 1, 2 * length + 1, device=p.device)
    previous = p[..., pos, pos - 1]
    duplicate = p[..., second, second - length]
    induction = p[..., second[:-1], second[:-1] - length + 1]
    axes = (*range(p.ndim - 3), -1)  # everything but the head axis
    return {
        "previous_token": previous.mean(axes),
        "duplicate_token": duplicate.mean(axes),
        "induction": induction.mean(axes),
    }


def attention_probes(
    model: Any, n_sequences: int = 20, length: int = 20, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Each probe's score for every head, `{probe: (n_layers, n_heads)}` on the host,
    measured on repeated random tokens (the standard test for induction heads) on the
    model's device."""
    tokens = repeated_tokens(model.tokenizer, n_sequences, length, seed).to(model.device)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.n_layers)]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(
            tokens, names_filter=lambda name: name in names, use_cache=False
        )
    per_layer = [scores_from_patterns(cache[name], length) for name in names]
    return {probe: torch.stack([s[probe] for s in per_layer]).cpu() for probe in PROBES}
