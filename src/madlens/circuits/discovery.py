"""Automatic IOI circuit discovery: name movers, S-inhibition, induction, duplicate- and
previous-token heads found by path patching, then the circuit's faithfulness and completeness."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from madlens.cache import folder as cache_folder
from madlens.cache import key as cache_key
from madlens.cache import load_or_compute
from madlens.circuits import patching
from madlens.circuits.ioi import POSITION_NAMES, IOIDataset, make_ioi
from madlens.circuits.patching import Head, PatchingSession
from madlens.circuits.probes import attention_probes
from madlens.models.devices import device_key

FORMAT_VERSION = 1
CLASSES = (
    "name_mover",
    "negative_name_mover",
    "s_suppression",
    "s_inhibition",
    "induction",
    "duplicate_token",
    "previous_token",
)
# (sender class, receiver class, what the sender writes into): the IOI paper's figure 2.
EDGES = (
    ("previous_token", "induction", "k"),
    ("induction", "s_inhibition", "v"),
    ("duplicate_token", "s_inhibition", "v"),
    ("s_inhibition", "name_mover", "q"),
    ("s_inhibition", "negative_name_mover", "q"),
    ("name_mover", "logits", "out"),
    ("negative_name_mover", "logits", "out"),
    ("s_suppression", "logits", "out"),
)
# What Wang et al. (2022) found in GPT-2 small (12 layers x 12 heads) for each class.
PAPER = {
    "name_mover": {
        "role": "attend from END to the indirect object and copy its name to the logits",
        "gpt2": [[9, 9], [9, 6], [10, 0]],
    },
    "negative_name_mover": {
        "role": "attend to the indirect object but write against it (hedging)",
        "gpt2": [[10, 7], [11, 10]],
    },
    "s_suppression": {
        "role": "not in the paper's circuit: attend from END to S2 and write against S "
        "(copy suppression of the subject), a direct effect on the logits",
        "gpt2": [],
    },
    "s_inhibition": {
        "role": "attend from END to S2 and steer the name movers' queries away from S",
        "gpt2": [[7, 3], [7, 9], [8, 6], [8, 10]],
    },
    "induction": {
        "role": "attend from S2 to the token after S1 (S1+1): detect the repeated name",
        "gpt2": [[5, 5], [6, 9]],
    },
    "duplicate_token": {
        "role": "attend from S2 to S1, its earlier copy: detect the repeated name",
        "gpt2": [[0, 1], [3, 0]],
    },
    "previous_token": {
        "role": "attend from S1+1 to S1 and feed the induction heads' keys",
        "gpt2": [[2, 2], [4, 11]],
    },
}
# The attention each class is expected to show, as (query position, key position).
SIGNATURES = {
    "name_mover": ("END", "IO"),
    "negative_name_mover": ("END", "IO"),
    "s_suppression": ("END", "S2"),
    "s_inhibition": ("END", "S2"),
    "induction": ("S2", "S1+1"),
    "duplicate_token": ("S2", "S1"),
    "previous_token": ("S1+1", "S1"),
}
ATTENTION_PAIRS = (
    ("END", "IO"),
    ("END", "S1"),
    ("END", "S2"),
    ("S2", "S1"),
    ("S2", "S1+1"),
    ("S1+1", "S1"),
)


@dataclass
class IOICircuit:
    """What `discover_ioi` found: heads by class, the patching maps behind them, and how well
    the circuit alone reproduces the model's logit difference (means over prompts).

    `faithfulness` = LD(circuit only, every other head mean-ablated over ABC) / LD(model);
    `completeness` = 1 - LD(circuit knocked out) / LD(model): 1 when knocking the circuit out
    destroys the behaviour. `incompleteness[c]` = |LD(circuit minus class c) - LD(model minus
    class c)| / LD(model), the paper's check that no class has uncaptured helpers.
    """

    model: str
    dtype: str
    n_prompts: int
    seed: int
    n_layers: int
    n_heads: int
    heads: dict[str, list[Head]]
    clean_logit_diff: float
    corrupted_logit_diff: float
    circuit_logit_diff: float
    knockout_logit_diff: float
    faithfulness: float
    completeness: float
    incompleteness: dict[str, float]
    threshold: float
    max_heads: int
    min_attention: float = 0.1
    maps: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    position_labels: list[str] = field(default_factory=lambda: list(POSITION_NAMES))
    example: dict = field(repr=False, default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=lambda: list(EDGES))

    @property
    def circuit(self) -> list[Head]:
        """Every head of the circuit, in (layer, head) order."""
        return sorted({head for heads in self.heads.values() for head in heads})

    @property
    def solves_task(self) -> bool:
        """Whether the model prefers the indirect object by a clear margin (mean LD > 1)."""
        return self.clean_logit_diff > 1.0

    def meets_target(self, max_fraction: float = 0.1, min_faithfulness: float = 0.8) -> bool:
        """The issue's target: at most 10% of the heads keep at least 80% of the LD."""
        size = len(self.circuit) / (self.n_layers * self.n_heads)
        found = bool(self.circuit) and self.solves_task
        return found and size <= max_fraction and self.faithfulness >= min_faithfulness

    def paper_comparison(self) -> list[dict]:
        """Per class: the paper's role, how strongly the found heads show the expected
        attention, their relative depth against the paper's heads in GPT-2 small, and (on a
        12 x 12 model, e.g. gpt2) which published heads were found again."""
        rows = []
        for name in CLASSES:
            found = self.heads.get(name, [])
            query, key = SIGNATURES[name]
            attention = self.maps.get(f"attention {query}->{key}")
            paper_heads = PAPER[name]["gpt2"]
            row = {
                "class": name,
                "role": PAPER[name]["role"],
                "found": [list(h) for h in found],
                "expected_attention": f"{query} -> {key}",
                "mean_attention": None
                if attention is None or not found
                else round(float(sum(attention[h] for h in found) / len(found)), 3),
                "relative_depth": None
                if not found
                else round(
                    sum((layer + 0.5) / self.n_layers for layer, _ in found) / len(found), 2
                ),
                "paper_relative_depth": None
                if not paper_heads
                else round(
                    sum((layer + 0.5) / 12 for layer, _ in paper_heads) / len(paper_heads), 2
                ),
                "paper_gpt2_heads": paper_heads,
            }
            if (self.n_layers, self.n_heads) == (12, 12):
                row["published_heads_found"] = [h for h in paper_heads if tuple(h) in set(found)]
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        """The `circuit.json` document."""
        total = self.n_layers * self.n_heads
        return {
            "madlens_format": FORMAT_VERSION,
            "model": self.model,
            "dtype": self.dtype,
            "n_prompts": self.n_prompts,
            "seed": self.seed,
            "n_layers": self.n_layers,
            "n_heads_per_layer": self.n_heads,
            "heads": {name: [list(h) for h in self.heads.get(name, [])] for name in CLASSES},
            "edges": [list(edge) for edge in self.edges],
            "n_heads": len(self.circuit),
            "fraction_of_heads": round(len(self.circuit) / total, 4),
            "clean_logit_diff": round(self.clean_logit_diff, 4),
            "corrupted_logit_diff": round(self.corrupted_logit_diff, 4),
            "circuit_logit_diff": round(self.circuit_logit_diff, 4),
            "knockout_logit_diff": round(self.knockout_logit_diff, 4),
            "faithfulness": round(self.faithfulness, 4),
            "completeness": round(self.completeness, 4),
            "incompleteness": {k: round(v, 4) for k, v in self.incompleteness.items()},
            "solves_task": self.solves_task,
            "target": {"max_fraction_of_heads": 0.1, "min_faithfulness": 0.8},
            "meets_target": self.meets_target(),
            "threshold": self.threshold,
            "min_attention": self.min_attention,
            "max_heads": self.max_heads,
            "paper_comparison": self.paper_comparison(),
        }


class ResultCache:
    """Experiment results on disk as safetensors, keyed by a hash of everything they depend on
    (model weights, dtype, prompts, experiment and its arguments), so a rerun reads them."""

    def __init__(self, root: Path | None, base: list) -> None:
        self.root = root
        self.base = base

    def key(self, name: str, params: Any) -> str:
        """The cache key of experiment `name` run with `params`."""
        return cache_key(format=FORMAT_VERSION, base=self.base, experiment=name, params=params)

    def get(
        self, name: str, params: Any, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The cached tensors of experiment `name`, computing and storing them if missing."""
        if self.root is None:
            return compute()
        path = self.root / f"{name.replace(' ', '_')}-{self.key(name, params)}.safetensors"
        return load_or_compute(path, compute, as_torch=True)


def data_hash(data: IOIDataset) -> str:
    """A hash of the prompt pairs as the model sees them (tokens, answers, positions)."""
    return cache_key(tokens=data.tokens, corrupted=data.corrupted_tokens, answers=data.answers,
                     end=data.end, templates=data.template_ids)  # fmt: skip


def _select(
    effect: torch.Tensor,
    allowed: torch.Tensor,
    threshold: float,
    taken: set[Head],
    negative: bool = True,
) -> list[tuple[Head, float]]:
    """Heads whose effect (normalised metric - 1) is at most `-threshold` (or at least
    `+threshold` when not `negative`) where `allowed`, strongest first."""
    signed = -effect if negative else effect
    picked = []
    for layer, head in torch.nonzero(torch.nan_to_num(signed, nan=0.0) >= threshold).tolist():
        if allowed[layer, head] and (layer, head) not in taken:
            picked.append(((layer, head), float(effect[layer, head])))
    return sorted(picked, key=lambda item: -abs(item[1]))


def _heads_key(heads: list[Head]) -> list[list[int]]:
    return [list(h) for h in sorted(heads)]


def discover_ioi(
    model: Any,
    *,
    data: IOIDataset | None = None,
    n_prompts: int = 50,
    seed: int = 0,
    threshold: float = 0.03,
    min_attention: float = 0.1,
    max_heads: int | None = None,
    batch_size: int = 512,
    cache: bool = True,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> IOICircuit:
    """Find the IOI circuit of `model` (a `madlens.models.Model`) automatically.

    Every class is defined by an effect (normalised metric - 1, at least `threshold` in
    size) and by the attention the IOI paper describes for it (at least `min_attention` on
    the expected key, more than on the alternatives):

    1. Name movers: heads whose direct effect (path patching head -> logits, ABC into clean)
       lowers the metric and that attend from END more to IO than to S1 and S2 together;
       negative name movers raise it with the same attention. Heads with such a direct
       effect that attend from END more to S2 than to IO suppress the subject instead
       (`s_suppression`, a class GPT-2 small's circuit does not have).
    2. S-inhibition heads: path patching every earlier head -> the name movers' queries;
       heads that lower the metric and attend from END more to S2 than to IO.
    3. Induction and duplicate-token heads: path patching -> the S-inhibition heads' values;
       induction if it attends from S2 more to S1+1 than to S1, duplicate-token if the
       other way round.
    4. Previous-token heads: path patching -> the induction heads' keys; heads that attend
       from S1+1 to S1.
    Classes keep their strongest heads until the circuit holds `max_heads` (default 10% of
    all heads). Then every head outside the circuit is mean-ablated over the ABC prompts of
    its template to measure faithfulness, and the circuit is knocked out for completeness.
    Each experiment is cached on disk (MADLENS_HOME/circuits, or `cache_dir`).
    """
    data = data if data is not None else make_ioi(model.tokenizer, n_prompts, seed)
    n_layers, n_heads = model.n_layers, int(model.bridge.cfg.n_heads)
    max_heads = max_heads if max_heads is not None else max(1, (n_layers * n_heads) // 10)
    dtype = str(model.dtype).removeprefix("torch.")
    root = None if not cache else Path(cache_dir or cache_folder("circuits"))
    # off the CPU, the device type joins the key (CPU entries keep the keys they had)
    where = list(device_key(model.device).values())
    store = ResultCache(root, [model.fingerprint, dtype, data_hash(data), *where])
    state: dict[str, PatchingSession] = {}

    def session() -> PatchingSession:
        if "session" not in state:
            state["session"] = PatchingSession(
                model, data.tokens, data.corrupted_tokens, data.answers, data.end,
                batch_size=batch_size, progress=progress,
            )  # fmt: skip
        return state["session"]

    positions = {name: data.positions[name] for name in POSITION_NAMES}

    def baseline() -> dict[str, torch.Tensor]:
        s = session()
        maps = {
            "clean": s.logit_diffs["clean"].cpu(),
            "corrupted": s.logit_diffs["corrupted"].cpu(),
        }
        for query, key in ATTENTION_PAIRS:
            maps[f"attention {query}->{key}"] = patching.attention_between(
                s, positions[query], positions[key]
            )
        maps["direct effect"] = patching.path_patch(s, "logits", "logits")
        return maps

    maps = dict(store.get("baseline", [], baseline))
    maps |= {
        f"probe {k}": v for k, v in store.get("probes", [20, 20], lambda: _probes(model)).items()
    }

    clean_ld = float(maps["clean"].mean())
    corrupted_ld = float(maps["corrupted"].mean())
    taken: set[Head] = set()
    heads: dict[str, list[tuple[Head, float]]] = {name: [] for name in CLASSES}

    def att(query: str, key: str) -> torch.Tensor:
        return maps[f"attention {query}->{key}"]

    direct = maps["direct effect"] - 1

    def attends(query: str, key: str, *others: str) -> torch.Tensor:
        """At least `min_attention` from query to key, and more than to the `others`."""
        ok = att(query, key) >= min_attention
        for other in others:
            ok &= att(query, key) > att(query, other)
        return ok

    to_io = attends("END", "IO") & (att("END", "IO") > att("END", "S1") + att("END", "S2"))
    heads["name_mover"] = _select(direct, to_io, threshold, taken)
    taken |= {h for h, _ in heads["name_mover"]}
    heads["negative_name_mover"] = _select(direct, to_io, threshold, taken, negative=False)
    taken |= {h for h, _ in heads["negative_name_mover"]}
    to_s2 = attends("END", "S2", "IO")
    heads["s_suppression"] = _select(direct, to_s2, threshold, taken)
    taken |= {h for h, _ in heads["s_suppression"]}

    def scan(name: str, receivers: list[Head], receiver_input: str) -> torch.Tensor:
        if not receivers:
            return torch.full((n_layers, n_heads), float("nan"))
        params = [_heads_key(receivers), receiver_input]
        return store.get(
            name,
            params,
            lambda: {"map": patching.path_patch(session(), receivers, receiver_input)},
        )["map"]

    movers = [h for h, _ in heads["name_mover"]]
    maps["path -> name mover q"] = scan("path to name mover queries", movers, "q")
    heads["s_inhibition"] = _select(maps["path -> name mover q"] - 1, to_s2, threshold, taken)
    taken |= {h for h, _ in heads["s_inhibition"]}

    inhibitors = [h for h, _ in heads["s_inhibition"]]
    maps["path -> s-inhibition v"] = scan("path to s-inhibition values", inhibitors, "v")
    induction_like = attends("S2", "S1+1", "S1")
    duplicate_like = attends("S2", "S1") & ~induction_like
    both = _select(
        maps["path -> s-inhibition v"] - 1, induction_like | duplicate_like, threshold, taken
    )
    heads["induction"] = [(h, e) for h, e in both if induction_like[h]]
    heads["duplicate_token"] = [(h, e) for h, e in both if duplicate_like[h]]
    taken |= {h for h, _ in both}

    inductors = [h for h, _ in heads["induction"]]
    maps["path -> induction k"] = scan("path to induction keys", inductors, "k")
    previous_like = attends("S1+1", "S1")
    heads["previous_token"] = _select(
        maps["path -> induction k"] - 1, previous_like, threshold, taken
    )
    chosen = _trim(heads, max_heads)

    def activation_maps() -> dict[str, torch.Tensor]:
        s = session()
        out = {"head out": patching.patch_head_out(s)}
        for hook in ("resid_pre", "mlp_out"):
            out[hook], _ = patching.patch_layer_pos(s, hook, positions)
        return out

    maps |= store.get("activation patching", list(positions), activation_maps)

    masks = _ablation_masks(chosen, n_layers, n_heads)

    def ablations() -> dict[str, torch.Tensor]:
        s = session()
        means = patching.head_means(s, data.groups())
        return {"ld": patching.ablate_heads(s, masks, means, normalise=False)}

    params = [[_heads_key(chosen[name]) for name in CLASSES]]
    lds = store.get("ablation", params, ablations)["ld"]
    model_ld = clean_ld if abs(clean_ld) > 1e-9 else 1e-9
    incompleteness = {
        name: abs(float(lds[2 + 2 * i] - lds[3 + 2 * i])) / abs(model_ld)
        for i, name in enumerate(CLASSES)
        if chosen[name]
    }
    example = store.get(
        "example", [_heads_key(_key_heads(chosen))], lambda: _example(session(), chosen)
    )
    return IOICircuit(
        model=model.name,
        dtype=dtype,
        n_prompts=len(data),
        seed=seed,
        n_layers=n_layers,
        n_heads=n_heads,
        heads=chosen,
        clean_logit_diff=clean_ld,
        corrupted_logit_diff=corrupted_ld,
        circuit_logit_diff=float(lds[0]),
        knockout_logit_diff=float(lds[1]),
        faithfulness=float(lds[0]) / model_ld,
        completeness=1 - float(lds[1]) / model_ld,
        incompleteness=incompleteness,
        threshold=threshold,
        max_heads=max_heads,
        min_attention=min_attention,
        maps=maps,
        example=_example_dict(example, data, model.tokenizer, chosen),
    )


def _probes(model: Any) -> dict[str, torch.Tensor]:
    return attention_probes(model, n_sequences=20, length=20)


def _trim(heads: dict[str, list[tuple[Head, float]]], max_heads: int) -> dict[str, list[Head]]:
    """Keep the strongest candidates across classes until `max_heads` are kept."""
    ranked = sorted(
        ((abs(effect), name, head) for name, found in heads.items() for head, effect in found),
        reverse=True,
    )
    kept = {(name, head) for _, name, head in ranked[:max_heads]}
    return {name: [h for h, _ in heads[name] if (name, h) in kept] for name in CLASSES}


def _ablation_masks(chosen: dict[str, list[Head]], n_layers: int, n_heads: int) -> torch.Tensor:
    """Configs: [circuit only, circuit knocked out] then, per class K, [circuit minus K,
    model minus K] (True = mean-ablated)."""
    circuit = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for found in chosen.values():
        for layer, head in found:
            circuit[layer, head] = True
    configs = [~circuit, circuit]
    for name in CLASSES:
        klass = torch.zeros_like(circuit)
        for layer, head in chosen[name]:
            klass[layer, head] = True
        configs += [~circuit | klass, klass]
    return torch.stack(configs)


def _key_heads(chosen: dict[str, list[Head]]) -> list[Head]:
    """The strongest head of each class: the ones whose attention the report shows."""
    return [found[0] for found in chosen.values() if found]


def _example(session: PatchingSession, chosen: dict[str, list[Head]]) -> dict:
    """Attention patterns of the key heads on the first clean prompt."""
    width = int(session.end[0]) + 1
    out = {}
    for layer, head in _key_heads(chosen):
        pattern = session.caches["clean"][patching.attn_hook(layer, "hook_pattern")]
        out[f"{layer}.{head}"] = pattern[0, head, :width, :width].float().cpu().clone()
    return out


def _example_dict(
    patterns: dict[str, torch.Tensor], data: IOIDataset, tokenizer: Any, chosen: dict
) -> dict:
    width = int(data.end[0]) + 1
    tokens = [tokenizer.decode([t]) for t in data.tokens[0, :width].tolist()]
    classes = {f"{layer}.{h}": name for name, found in chosen.items() for layer, h in found}
    return {
        "prompt": data.prompts[0],
        "tokens": tokens,
        "positions": {name: int(data.positions[name][0]) for name in POSITION_NAMES},
        "patterns": {
            key: {"class": classes.get(key, ""), "pattern": value.tolist()}
            for key, value in patterns.items()
        },
    }
