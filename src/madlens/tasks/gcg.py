"""Greedy coordinate gradient (GCG) adversarial suffixes, multi-prompt ("universal"): the
gradient of the target-string loss w.r.t. one-hot suffix tokens proposes top-k swaps; a
batch of candidates is evaluated and the best kept. Written here: no maintained library
offers GCG on an arbitrary HF model without a hub download."""

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from madlens.data import format_chat
from madlens.models import autocast_bfloat16


@dataclass(frozen=True)
class GCGConfig:
    """The attack's budget: suffix length, steps, top-k swaps per position, candidates."""

    n_tokens: int = 16
    steps: int = 12
    top_k: int = 64
    candidates: int = 48
    seed: int = 0


def _allowed_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Tokens a suffix may use: printable ASCII text, no specials, no newlines."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        text = tokenizer.decode([i])
        if i not in special and text.strip() and text.isascii() and text.isprintable():
            allowed[i] = True
    return allowed


def _pieces(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids before the suffix, between suffix and target, and of the target."""
    marker = "\x00SUFFIX\x00"
    text = format_chat(tokenizer, [{"role": "user", "content": f"{prompt} {marker}"}])
    before, after = text.split(marker)
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    return encode(before), encode(after), encode(target)


def _batch(pieces: list, suffixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Right-padded ids for every (suffix, prompt) pair and the target positions."""
    rows = [(before + suffix + after, target) for suffix in suffixes.tolist()
            for before, after, target in pieces]  # fmt: skip
    return _pad(rows)


def _pad(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Right-padded ids and mask of (prompt ids, target ids) rows, and each target's span."""
    spans = [(len(p), len(p) + len(t)) for p, t in rows]
    width = max(end for _, end in spans)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)], mask[i, : len(p) + len(t)] = torch.tensor(p + t), 1
    return ids, mask, spans


def _round_trips(tokenizer: Any, candidates: torch.Tensor) -> torch.Tensor:
    """Which candidates decode to a text that encodes back to the same ids (as nanogcg's
    `filter_ids`): with a BPE tokenizer many do not, and the suffix the task uses is text."""
    keep = [tokenizer(tokenizer.decode(c), add_special_tokens=False).input_ids == c
            for c in candidates.tolist()]  # fmt: skip
    return torch.tensor(keep, dtype=torch.bool)


def text_loss(model: Any, tokenizer: Any, prompts: list[str], target: str, suffix: str) -> float:
    """Mean target cross-entropy of the prompts as the task builds them (`f"{prompt}
    {suffix}"` in a user turn), each conversation tokenized whole, as the model reads it."""
    target_ids = tokenizer(target, add_special_tokens=False).input_ids
    rows = []
    for prompt in prompts:
        text = format_chat(tokenizer, [{"role": "user", "content": f"{prompt} {suffix}"}])
        rows.append((tokenizer(text, add_special_tokens=False).input_ids, target_ids))
    return float(_losses(model, *_pad(rows)).mean())


def _losses(model: Any, ids: torch.Tensor, mask: torch.Tensor, spans: list) -> torch.Tensor:
    """Each row's target cross-entropy, run on the model's device; returned on the host."""
    device = model.get_input_embeddings().weight.device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode(), autocast_bfloat16(device):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    out = []
    for i, (a, b) in enumerate(spans):
        out.append(torch.nn.functional.cross_entropy(logits[i, a - 1 : b - 1], ids[i, a:b]))
    return torch.stack(out).cpu()


def gcg_suffix(
    model: Any, tokenizer: Any, prompts: list[str], target: str, config: GCGConfig,
    progress: bool = True,
) -> tuple[str, float]:  # fmt: skip
    """Optimise one suffix over all `prompts` at once; returns (suffix text, its loss).

    The search runs on token ids; candidates whose text does not encode back to their ids
    are dropped, and the loss returned is `text_loss` of the text returned (the prompt the
    task builds), not of the ids searched."""
    generator = torch.Generator().manual_seed(config.seed)  # host-side draws: same on any device
    embed = model.get_input_embeddings().weight
    device = embed.device
    allowed = _allowed_tokens(tokenizer, embed.shape[0])
    pool = allowed.nonzero()[:, 0]
    suffix = pool[torch.randint(len(pool), (config.n_tokens,), generator=generator)]
    pieces = [_pieces(tokenizer, p, target) for p in prompts]
    best_loss = float("inf")

    def ctx(t: list[int]) -> torch.Tensor:
        return embed[torch.tensor(t, dtype=torch.long, device=device)].detach()

    for _ in tqdm(range(config.steps), desc="GCG", disable=not progress):
        one_hot = torch.zeros(config.n_tokens, embed.shape[0], dtype=embed.dtype, device=device)
        one_hot[torch.arange(config.n_tokens, device=device), suffix.to(device)] = 1.0
        one_hot.requires_grad_(True)
        total = 0.0
        for before, after, tgt in pieces:
            inputs = torch.cat([ctx(before), one_hot @ embed, ctx(after), ctx(tgt)])[None]
            with autocast_bfloat16(device):
                logits = model(inputs_embeds=inputs).logits[0].float()
            start = len(before) + config.n_tokens + len(after)
            loss = torch.nn.functional.cross_entropy(
                logits[start - 1 : start - 1 + len(tgt)], torch.tensor(tgt, device=device)
            )
            loss.backward()
            total += loss.item()
        grad = one_hot.grad.clone()
        grad[:, ~allowed.to(device)] = float("inf")
        top = (-grad).topk(config.top_k, dim=1).indices.cpu()
        positions = torch.randint(config.n_tokens, (config.candidates,), generator=generator)
        choice = torch.randint(config.top_k, (config.candidates,), generator=generator)
        candidates = suffix.repeat(config.candidates, 1)
        candidates[torch.arange(config.candidates), positions] = top[positions, choice]
        candidates = candidates[_round_trips(tokenizer, candidates)]
        if len(candidates) == 0:
            continue
        ids, mask, spans = _batch(pieces, candidates)
        losses = _losses(model, ids, mask, spans).view(len(candidates), len(pieces)).mean(1)
        best = int(losses.argmin())
        if losses[best].item() < (best_loss := min(best_loss, total / len(pieces))):
            suffix, best_loss = candidates[best], losses[best].item()
    text = tokenizer.decode(suffix.tolist())
    return text, text_loss(model, tokenizer, prompts, target, text)
