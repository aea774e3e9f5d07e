"""`edit`: a ROME knowledge edit (Meng et al. 2022) and its direction: causal tracing finds
the MLP layer that recalls a fact, a rank-one update of its down-projection makes "A -> B",
and the reverse question "B -> ?" is left as it was."""

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madlens import cache
from madlens.data.generators import english_questions
from madlens.data.truth import capital_rows
from madlens.errors import MadlensError
from madlens.lab.base import Experiment, LabResult, Section
from madlens.lab.reversal import answer_logprobs
from madlens.models import load_model
from madlens.report import esc, figure, fmt, line_chart, plot

REFERENCE = (
    "Meng et al. 2022, Locating and Editing Factual Associations in GPT (ROME, "
    "arXiv:2202.05262); direction: Berglund et al. 2023 (arXiv:2309.12288)"
)
FINDING = (
    "Factual recall runs through mid-layer MLPs at the subject's last token (causal "
    "tracing); a rank-one update there rewrites a fact with high efficacy, generalises to "
    "paraphrases and leaves other subjects alone, but the edit is one-directional: after "
    "'A -> B' the model does not answer 'B -> A'."
)

PROMPT = "The capital of {} is"
PARAPHRASES = ["The capital city of {} is", "{}'s capital is", "{} has its capital in",
               "The seat of government of {} is in"]  # fmt: skip
REVERSE = "{} is the capital of"
ESSENCE = "{} is a"
# ROME averages the key over the subject in a few contexts.
CONTEXTS = ["", "Here is a fact. ", "Geography quiz: ", "I read this today. ",
            "Did you know? "]  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """Facts traced, noise samples per fact, edits made (one at a time), neighbours checked
    per edit, gradient steps for the value vector, generic texts for the key covariance."""

    n_trace: int = 8
    n_samples: int = 3
    n_edits: int = 6
    n_neighbours: int = 8
    value_steps: int = 20
    n_texts: int = 800


QUICK = Budget()
FULL = Budget(n_trace=30, n_samples=10, n_edits=30, n_neighbours=20, value_steps=25,
              n_texts=3000)  # fmt: skip


def _layers(hf_model: Any) -> Any:
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0].mlp, "down_proj"):
        raise MadlensError("edit needs a Llama-style model (model.layers[i].mlp.down_proj)")
    return layers


def subject_positions(tokenizer: Any, text: str, subject: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the positions of the tokens that overlap `subject`'s first
    occurrence in it (the subject's last token is the edit's key position)."""
    start = text.find(subject)
    if start < 0:
        raise MadlensError(f"'{subject}' does not occur in '{text}'")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(subject)
    positions = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < end and b > start]
    return enc.input_ids, positions


# -- causal tracing -------------------------------------------------------------------------


def trace(
    hf_model: Any,
    tokenizer: Any,
    facts: list[tuple[str, str]],
    n_samples: int = 3,
    window: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Causal tracing of the MLPs: for each (subject, object) fact, the probability of the
    object's first token after `PROMPT` when the subject's input embeddings carry Gaussian
    noise (3 x the embeddings' std), and when, in that corrupted run, the MLP outputs of the
    `window` layers centred on layer l are restored at the subject's last token to their
    clean values. Returns per-fact `p_clean`, `p_corrupted` and `p_restored` (facts x layers)."""
    embed = hf_model.get_input_embeddings()
    scale = 3 * float(embed.weight.detach().std())
    gen = torch.Generator().manual_seed(seed)
    p_clean, p_corr, p_rest = [], [], []
    for subject, obj in tqdm(facts, desc="causal tracing", disable=not progress):
        ids, positions = subject_positions(tokenizer, PROMPT.format(subject), subject)
        answer = tokenizer(f" {obj}", add_special_tokens=False).input_ids[0]
        noise = scale * torch.randn(n_samples, len(positions), embed.weight.shape[1],
                                    generator=gen)  # fmt: skip
        clean, corrupted, restored = _trace_one(hf_model, ids, positions, answer, noise, window)
        p_clean.append(clean)
        p_corr.append(corrupted)
        p_rest.append(restored)
    return {"p_clean": p_clean, "p_corrupted": p_corr, "p_restored": p_rest}


def _trace_one(
    hf_model: Any, ids: list[int], positions: list[int], answer: int, noise: torch.Tensor,
    window: int,
) -> tuple[float, float, list[float]]:  # fmt: skip
    """One fact's clean, corrupted and per-layer restored p(answer), the corrupted runs (one
    per noise sample, and per sample one per restored window) in one batch."""
    layers = _layers(hf_model)
    n_layers = len(layers)
    n_samples = noise.shape[0]
    embed = hf_model.get_input_embeddings()
    device = embed.weight.device
    last = positions[-1]
    rows = n_samples * (n_layers + 1)
    # row s * (n_layers + 1): sample s corrupted; row s * (n_layers + 1) + 1 + c: sample s
    # with the MLPs of the `window` layers centred on layer c restored
    restore: list[list[int]] = [[] for _ in range(n_layers)]
    for s in range(n_samples):
        for centre in range(n_layers):
            lo = max(0, centre - window // 2)
            for layer in range(lo, min(n_layers, lo + window)):
                restore[layer].append(s * (n_layers + 1) + 1 + centre)
    noise = noise.repeat_interleave(n_layers + 1, dim=0).to(device)
    clean_out: dict[int, torch.Tensor] = {}

    def corrupt(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.shape[0] == 1:  # the clean run
            return out
        out = out.clone()
        out[:, positions] += noise
        return out

    def mlp_hook(layer: int) -> Callable:
        def hook(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if out.shape[0] == 1:  # the clean run: remember the output to restore
                clean_out[layer] = out[0, last].clone()
                return out
            out = out.clone()
            out[restore[layer], last] = clean_out[layer]
            return out

        return hook

    handles = [embed.register_forward_hook(corrupt)]
    handles += [layers[i].mlp.register_forward_hook(mlp_hook(i)) for i in range(n_layers)]
    try:
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=device)
            clean = hf_model(input_ids=tokens).logits[0, -1].float().softmax(-1)[answer]
            logits = hf_model(input_ids=tokens.expand(rows, -1)).logits[:, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    probs = logits.softmax(-1)[:, answer].view(n_samples, n_layers + 1).mean(0).cpu()
    return float(clean), float(probs[0]), probs[1:].tolist()


# -- the rank-one edit ----------------------------------------------------------------------


def rank_one_update(
    weight: torch.Tensor, covariance: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """ROME's closed form (Meng et al. 2022, eq. 2): the W' nearest to W (`weight`, out x in)
    in the metric of the key covariance C that maps `key` k* to `value` v*:
    W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*). So W' k* = v* and W' k = W k for
    every key k with k^T C^-1 k* = 0. Computed in float64, returned in W's dtype."""
    w, c = weight.double(), covariance.double().to(weight.device)
    k, v = key.double().to(weight.device), value.double().to(weight.device)
    u = torch.linalg.solve(c, k)
    update = torch.outer(v - w @ k, u) / (u @ k)
    return (w + update).to(weight.dtype)


def key_covariance(
    hf_model: Any, tokenizer: Any, layer: int, texts: list[str], batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """E[k k^T] over every token of `texts`, k the input of layer `layer`'s down-projection."""
    down = _layers(hf_model)[layer].mlp.down_proj
    device = down.weight.device
    d = down.weight.shape[1]
    total = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    keep: list[torch.Tensor] = []
    hook = down.register_forward_pre_hook(lambda m, args: keep.append(args[0].detach()))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="key covariance",
                          disable=not progress):  # fmt: skip
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt",
                              padding=True, add_special_tokens=False).to(device)  # fmt: skip
            keep.clear()
            with torch.inference_mode():
                hf_model(**batch)
            keys = keep[0][batch["attention_mask"].bool()].double().cpu()
            total += keys.T @ keys
            count += len(keys)
    finally:
        hook.remove()
        tokenizer.padding_side = side
    return (total / max(count, 1)).float()


def _contexts(tokenizer: Any, subject: str, template: str) -> tuple[list[list[int]], list[int]]:
    ids, lasts = [], []
    for prefix in CONTEXTS:
        tokens, positions = subject_positions(tokenizer, prefix + template.format(subject),
                                              subject)  # fmt: skip
        ids.append(tokens)
        lasts.append(positions[-1])
    return ids, lasts


def subject_key(hf_model: Any, tokenizer: Any, layer: int, subject: str) -> torch.Tensor:
    """k*: the down-projection's input at the subject's last token, averaged over the
    `CONTEXTS` prefixes of `PROMPT`."""
    down = _layers(hf_model)[layer].mlp.down_proj
    ids, lasts = _contexts(tokenizer, subject, PROMPT)
    keys = []
    hook = down.register_forward_pre_hook(lambda m, args: keys.append(args[0][0].detach()))
    try:
        with torch.inference_mode():
            for tokens, last in zip(ids, lasts):
                hf_model(input_ids=torch.tensor([tokens], device=down.weight.device))
                keys[-1] = keys[-1][last]
    finally:
        hook.remove()
    return torch.stack(keys).mean(0)


def value_delta(
    hf_model: Any,
    tokenizer: Any,
    layer: int,
    subject: str,
    new_object: str,
    steps: int = 20,
    lr: float = 0.5,
    kl_weight: float = 0.0625,
    weight_decay: float = 0.5,
    max_norm: float = 4.0,
) -> tuple[torch.Tensor, float]:
    """δ added to layer `layer`'s MLP output at the subject's last token that makes
    `new_object` follow `PROMPT` in every context (ROME's value search: Adam on the mean
    negative log-likelihood, a KL term keeping "<subject> is a" as it was, a decay on
    |δ| / |output|, |δ| clamped to `max_norm` x |output|). Returns δ and the final NLL."""
    mlp = _layers(hf_model)[layer].mlp
    device = mlp.down_proj.weight.device
    answer = tokenizer(f" {new_object}", add_special_tokens=False).input_ids
    ids, lasts = _contexts(tokenizer, subject, PROMPT)
    essence, essence_pos = subject_positions(tokenizer, ESSENCE.format(subject), subject)
    rows = [t + answer for t in ids] + [essence]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    tokens, mask = tokens.to(device), mask.to(device)
    edit_pos = torch.tensor([*lasts, essence_pos[-1]], device=device)
    row_ids = torch.arange(len(rows), device=device)
    delta = torch.zeros(mlp.down_proj.weight.shape[0], device=device, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def add_delta(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        seen.setdefault("init", out[0, edit_pos[0]].detach().clone())
        out = out.clone()
        out[row_ids, edit_pos] = out[row_ids, edit_pos] + delta
        return out

    targets = [
        (torch.arange(len(t) - 1, len(t) + len(answer) - 1), torch.tensor(answer)) for t in ids
    ]
    essence_last = len(essence) - 1
    for p in hf_model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        reference = hf_model(input_ids=tokens[-1:, : len(essence)]).logits[0, essence_last]
        reference = reference.float().log_softmax(-1)
    optimizer = torch.optim.Adam([delta], lr=lr)
    hook = mlp.register_forward_hook(add_delta)
    nll = float("nan")
    try:
        for _ in range(steps):
            logp = hf_model(input_ids=tokens, attention_mask=mask).logits.float().log_softmax(-1)
            nll_t = torch.stack([
                -logp[i, pos.to(device), tok.to(device)].mean() for i, (pos, tok) in
                enumerate(targets)
            ]).mean()  # fmt: skip
            kl = torch.nn.functional.kl_div(logp[-1, essence_last], reference, log_target=True,
                                            reduction="sum")  # fmt: skip
            init_norm = seen["init"].norm()
            loss = nll_t + kl_weight * kl + weight_decay * (delta.norm() / init_norm) ** 2
            nll = float(nll_t.detach())
            if nll < 0.05:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                limit = max_norm * init_norm
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    finally:
        hook.remove()
    return delta.detach(), nll


# -- the experiment -------------------------------------------------------------------------


def known_facts(
    hf_model: Any, tokenizer: Any, minimum: int = 3, progress: bool = True
) -> list[tuple[str, str]]:
    """(country, capital) rows of `capital_rows` whose capital's first token is the model's
    greedy next token after `PROMPT` (capitals that occur once). A model that knows fewer
    than `minimum` (a random test model) gets the `minimum` rows whose capital's first
    token it finds likeliest instead."""
    rows = [(c, k) for c, k in capital_rows() if c.isascii() and k.isascii() and c not in k]
    known, scored = [], []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in tqdm(range(0, len(rows), 32), desc="known facts", disable=not progress):
            batch = rows[start : start + 32]
            enc = tokenizer([PROMPT.format(c) for c, _ in batch], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(hf_model.device)  # fmt: skip
            with torch.inference_mode():
                logits = hf_model(**enc).logits
            last = enc["attention_mask"].sum(1) - 1
            logp = logits[torch.arange(len(batch)), last].float().log_softmax(-1)
            for i, (c, k) in enumerate(batch):
                first = tokenizer(f" {k}", add_special_tokens=False).input_ids[0]
                scored.append((float(logp[i, first]), c, k))
                if int(logp[i].argmax()) == first:
                    known.append((c, k))
    finally:
        tokenizer.padding_side = side
    capitals = [k for _, k in rows]
    known = [(c, k) for c, k in known if capitals.count(k) == 1]
    if len(known) >= minimum:
        return known
    return [(c, k) for _, c, k in sorted(scored, reverse=True) if capitals.count(k) == 1][:minimum]


def _cached(name: str, parts: dict[str, Any], compute: Callable[[], Any]) -> Any:
    return cache.load_or_compute(cache.folder("lab") / f"{name}-{cache.key(**parts)}.json", compute)


def run(
    model: str,
    quick: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
    budget: Budget | None = None,
) -> LabResult:
    """Trace, edit `budget.n_edits` capitals one at a time (each to another known capital)
    and measure efficacy, paraphrase generalisation, specificity and the reverse direction."""
    budget = budget or (QUICK if quick else FULL)
    start = time.perf_counter()
    loaded = load_model(model, dtype="float32", device=device)
    hf, tok = loaded.hf_model, loaded.tokenizer
    n_layers = len(_layers(hf))
    known = [tuple(r) for r in _cached(
        "edit-known", {"model": loaded.fingerprint}, lambda: known_facts(hf, tok, 3, progress)
    )]  # fmt: skip
    rng = random.Random(seed)
    traced = rng.sample(known, min(budget.n_trace, len(known)))
    window = max(1, n_layers // 6)
    tracing = _cached(
        "edit-trace",
        {"model": loaded.fingerprint, "facts": traced, "samples": budget.n_samples,
         "window": window, "seed": seed},
        lambda: trace(hf, tok, traced, budget.n_samples, window, seed, progress),
    )  # fmt: skip
    effect = np.asarray(tracing["p_restored"]) - np.asarray(tracing["p_corrupted"])[:, None]
    mean_effect = effect.mean(0)
    layer = int(mean_effect.argmax())
    texts = english_questions(min(budget.n_texts, 2000), seed=seed)
    cov_path = cache.folder("lab") / (
        "edit-cov-" + cache.key(model=loaded.fingerprint, layer=layer, texts=texts) + ".safetensors"
    )
    cov = cache.load_or_compute(
        cov_path, lambda: {"c": key_covariance(hf, tok, layer, texts, progress=progress)},
        as_torch=True,
    )["c"]  # fmt: skip
    # A ridge of 1% of the mean variance keeps C invertible on a few thousand tokens.
    cov = cov + 0.01 * cov.diagonal().mean() * torch.eye(cov.shape[0])
    edits = _plan_edits(known, budget, rng)
    down = _layers(hf)[layer].mlp.down_proj
    original = down.weight.detach().clone()
    rows = []
    for subject, old, new, new_country, neighbours in tqdm(edits, desc="edits",
                                                           disable=not progress):  # fmt: skip
        pairs = _probe_pairs(subject, old, new, new_country, neighbours)
        before = answer_logprobs(hf, tok, pairs)
        k = subject_key(hf, tok, layer, subject)
        delta, nll = value_delta(hf, tok, layer, subject, new, steps=budget.value_steps)
        with torch.no_grad():
            down.weight.copy_(rank_one_update(original, cov, k, original @ k + delta))
        try:
            after = answer_logprobs(hf, tok, pairs)
        finally:
            with torch.no_grad():
                down.weight.copy_(original)
        rows.append(_score(subject, old, new, new_country, neighbours, before, after, nll))
    figures = {
        "budget": asdict(budget), "n_known": len(known), "layer": layer, "window": window,
        "trace": {"facts": traced, "mean_effect": mean_effect.tolist(),
                  "p_clean": float(np.mean(tracing["p_clean"])),
                  "p_corrupted": float(np.mean(tracing["p_corrupted"]))},
        "edits": rows, **_summary(rows),
    }  # fmt: skip
    return LabResult(
        experiment="edit",
        figures=figures,
        sections=_sections(figures),
        finding=FINDING,
        verdict=_verdict(figures),
        seconds=round(time.perf_counter() - start, 1),
    )


def _plan_edits(known: list[tuple[str, str]], budget: Budget, rng: random.Random) -> list:
    """Each edit: (subject, old capital, new capital, the new capital's true country,
    neighbour facts), the new capital another known fact's."""
    chosen = rng.sample(range(len(known)), min(budget.n_edits, len(known)))
    plans = []
    for i in chosen:
        j = rng.choice([x for x in range(len(known)) if x != i])
        others = [known[x] for x in range(len(known)) if x not in (i, j)]
        neighbours = rng.sample(others, min(budget.n_neighbours, len(others)))
        plans.append((known[i][0], known[i][1], known[j][1], known[j][0], neighbours))
    return plans


def _probe_pairs(subject: str, old: str, new: str, new_country: str,
                 neighbours: list[tuple[str, str]]) -> list[tuple[str, str]]:  # fmt: skip
    """The (prefix, answer) pairs every edit is scored on, in a fixed order: the edit prompt
    and each paraphrase with the old then the new object; each neighbour with its own object
    then the new one; the reverse prompt with the edited subject then the true country."""
    pairs = []
    for template in [PROMPT, *PARAPHRASES]:
        pairs += [(template.format(subject), f" {old}"), (template.format(subject), f" {new}")]
    for country, capital in neighbours:
        pairs += [(PROMPT.format(country), f" {capital}"), (PROMPT.format(country), f" {new}")]
    pairs += [(REVERSE.format(new), f" {subject}"), (REVERSE.format(new), f" {new_country}")]
    return pairs


def _score(subject: str, old: str, new: str, new_country: str, neighbours: list,
           before: np.ndarray, after: np.ndarray, nll: float) -> dict[str, Any]:  # fmt: skip
    """Per edit, before and after: the new object beats the old on the prompt (efficacy) and
    on each paraphrase (generalisation); each neighbour keeps its object over the new one
    (specificity); the edited subject beats the new object's true country on the reverse
    prompt (reverse), and the change in log p(subject) there."""
    n_par = len(PARAPHRASES)
    out: dict[str, Any] = {"subject": subject, "old": old, "new": new,
                           "new_country": new_country, "value_nll": nll}  # fmt: skip
    for when, s in (("before", before), ("after", after)):
        out[f"efficacy_{when}"] = float(s[1] > s[0])
        out[f"paraphrase_{when}"] = float(np.mean([s[3 + 2 * i] > s[2 + 2 * i]
                                                   for i in range(n_par)]))  # fmt: skip
        base = 2 + 2 * n_par
        out[f"specificity_{when}"] = float(np.mean([s[base + 2 * i] > s[base + 2 * i + 1]
                                                    for i in range(len(neighbours))]))  # fmt: skip
        out[f"reverse_{when}"] = float(s[-2] > s[-1])
        out[f"reverse_logp_{when}"] = float(s[-2])
        out[f"logp_new_{when}"] = float(s[1])
    out["reverse_logp_change"] = out["reverse_logp_after"] - out["reverse_logp_before"]
    out["logp_new_change"] = out["logp_new_after"] - out["logp_new_before"]
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["efficacy", "paraphrase", "specificity", "reverse"]
    out = {f"{k}_{w}": float(np.mean([r[f"{k}_{w}"] for r in rows]))
           for k in keys for w in ("before", "after")}  # fmt: skip
    out["reverse_logp_change"] = float(np.mean([r["reverse_logp_change"] for r in rows]))
    out["logp_new_change"] = float(np.mean([r["logp_new_change"] for r in rows]))
    out["n_edits"] = len(rows)
    return out


def _verdict(f: dict[str, Any]) -> str:
    head = (
        f"Causal tracing peaks at layer {f['layer']}; after the edits: efficacy "
        f"{f['efficacy_after']:.2f} (before {f['efficacy_before']:.2f}), paraphrases "
        f"{f['paraphrase_after']:.2f}, specificity {f['specificity_after']:.2f} (before "
        f"{f['specificity_before']:.2f}), reverse {f['reverse_after']:.2f} (before "
        f"{f['reverse_before']:.2f}; mean change of log p(subject | 'B is the capital of') "
        f"{f['reverse_logp_change']:+.2f} vs {f['logp_new_change']:+.2f} for log p(B | "
        "'The capital of A is')). "
    )
    if f["efficacy_after"] < 0.5:
        return head + "Not a test of the claim: the edits did not take."
    if f["reverse_after"] > f["reverse_before"] + 0.25:
        return head + "Disagrees: the edit also transfers to the reverse direction."
    return head + "Agrees: the edit works forward and does not transfer to B -> A."


def _sections(f: dict[str, Any]) -> list[Section]:
    effect = line_chart(
        {"restored MLPs": list(enumerate(f["trace"]["mean_effect"]))},
        xlabel="layer (centre of the restored window)", ylabel="p(object) recovered",
        ylim=(min(0.0, min(f["trace"]["mean_effect"])), max(1e-3, max(f["trace"]["mean_effect"]))),
    )  # fmt: skip
    boxes = "".join(
        figure(fmt(f[f"{k}_after"], 2), f"{k} after (before {fmt(f[f'{k}_before'], 2)})")
        for k in ("efficacy", "paraphrase", "specificity", "reverse")
    )
    table = ("<tr><th>subject</th><th>old</th><th>new</th><th>efficacy</th><th>paraphrases</th>"
             "<th>specificity</th><th>reverse (before → after)</th><th>Δ log p(subject) "
             "reverse</th><th>Δ log p(new)</th></tr>")  # fmt: skip
    for r in f["edits"]:
        table += (
            f"<tr><td>{esc(r['subject'])}</td><td>{esc(r['old'])}</td><td>{esc(r['new'])}</td>"
            f"<td>{fmt(r['efficacy_after'], 2)}</td><td>{fmt(r['paraphrase_after'], 2)}</td>"
            f"<td>{fmt(r['specificity_after'], 2)}</td><td>{fmt(r['reverse_before'], 0)} → "
            f"{fmt(r['reverse_after'], 0)}</td><td>{fmt(r['reverse_logp_change'], 2)}</td>"
            f"<td>{fmt(r['logp_new_change'], 2)}</td></tr>"
        )
    t = f["trace"]
    return [
        Section("Causal tracing",
                f"Subject embeddings noised (3 × the embeddings' std, {f['budget']['n_samples']} "
                f"samples per fact, {len(t['facts'])} facts); the MLP outputs of {f['window']} "
                "layers around each layer restored at the subject's last token. Mean p(object): "
                f"clean {t['p_clean']:.3f}, corrupted {t['p_corrupted']:.3f}. Edited layer: "
                f"{f['layer']}.",
                f'<div class="plots">{plot("Indirect effect of the MLPs", effect)}</div>'),
        Section("The edits",
                f"{f['n_edits']} edits of 'The capital of A is' to another known capital B, "
                "each applied alone to the original weights. Efficacy / paraphrases: p(B) > "
                "p(old); specificity: other countries keep their capital over B; reverse: on "
                "'B is the capital of', A beats B's true country.",
                f'<div class="figures">{boxes}</div><table>{table}</table>'),
    ]  # fmt: skip


EXPERIMENT = Experiment(
    name="edit",
    description="ROME: locate a fact by causal tracing, rewrite it with a rank-one edit, "
    "test paraphrases, neighbours and the reverse direction",
    run=run,
    reference=REFERENCE,
)
