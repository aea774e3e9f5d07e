"""The IOI discovery report: the circuit diagram, the patching and attention heatmaps and the
comparison with the IOI paper as one self-contained page (`madlens.report`), plus circuit.json."""

import json
from pathlib import Path

import torch

from madlens.circuits.discovery import CLASSES, IOICircuit
from madlens.report import (
    DARK2,
    DARK_GREY,
    HEATMAP_JS,
    diverging,
    esc,
    figure,
    heatmap,
    page,
    sequential,
)

CLASS_COLOURS = {
    "name_mover": DARK2[0],
    "negative_name_mover": DARK2[1],
    "s_suppression": DARK2[6],
    "s_inhibition": DARK2[2],
    "induction": DARK2[3],
    "duplicate_token": DARK2[4],
    "previous_token": DARK2[5],
    "logits": DARK_GREY,
}
# Where each class sits in the diagram: (column, row) in a grid read left to right.
LAYOUT = {
    "previous_token": (0, 0),
    "duplicate_token": (1, 1),
    "induction": (1, 0),
    "s_inhibition": (2, 0),
    "name_mover": (3, 0),
    "negative_name_mover": (3, 1),
    "s_suppression": (3, 2),
    "logits": (4, 0),
}
EFFECT_MAPS = [
    ("direct effect", "Direct effect: path patching head → logits"),
    ("head out", "Activation patching: each head's output"),
    ("path -> name mover q", "Path patching → name movers' queries"),
    ("path -> s-inhibition v", "Path patching → S-inhibition heads' values"),
    ("path -> induction k", "Path patching → induction heads' keys"),
]
ATTENTION_MAPS = [
    ("attention END->IO", "Attention END → IO"),
    ("attention END->S2", "Attention END → S2"),
    ("attention S2->S1", "Attention S2 → S1"),
    ("attention S2->S1+1", "Attention S2 → S1+1"),
    ("attention S1+1->S1", "Attention S1+1 → S1"),
    ("probe previous_token", "Previous-token score (repeated random tokens)"),
    ("probe duplicate_token", "Duplicate-token score (repeated random tokens)"),
    ("probe induction", "Induction score (repeated random tokens)"),
]
POSITION_MAPS = [
    ("resid_pre", "Activation patching: residual stream by layer and position"),
    ("mlp_out", "Activation patching: MLP output by layer and position"),
]


def effect_map(
    values: torch.Tensor,
    title: str,
    *,
    row_labels: list[str],
    col_labels: list[str],
    kind: str = "effect",
    marked: dict[tuple[int, int], str] | None = None,
    keyed: bool = True,
    cell: int = 14,
    cell_w: int | None = None,
) -> str:
    """One titled heatmap. `kind="effect"` shows `value - 1` (patching maps normalised to
    clean = 1) on a diverging scale; `"attention"` shows values in [0, 1]. Cells of
    `marked` heads get a border in their class colour; every cell has a tooltip."""
    values = values.float()
    finite = values[~torch.isnan(values)]
    if kind == "effect":
        scale = float((finite - 1).abs().max()) if len(finite) else 1.0
        legend = f"blue: lowers the metric, red: raises it (max |metric − 1| = {scale:.2f})"

        def colour(v: float) -> str:
            return diverging(v - 1, scale)
    else:
        colour, legend = sequential, "white 0 → purple 1"
    outlined = {at: CLASS_COLOURS.get(klass, "#000") for at, klass in (marked or {}).items()}
    return heatmap(values.numpy(), title, row_labels=row_labels, col_labels=col_labels,
                   colour=colour, legend=legend, outlined=outlined, keyed=keyed, cell=cell,
                   cell_w=cell_w)  # fmt: skip


def diagram(result: IOICircuit) -> str:
    """The circuit as boxes (head classes, listing their heads) and arrows (path-patching
    edges labelled with the receiver input)."""
    box_w, box_h, gap_x, gap_y = 170, 74, 60, 30
    width = 5 * box_w + 4 * gap_x + 20
    height = 3 * box_h + 2 * gap_y + 40
    centre = {}
    parts = [
        f'<svg class="diagram" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="circuit">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#555"/></marker></defs>',
    ]
    for name, (col, row) in LAYOUT.items():
        x, y = 10 + col * (box_w + gap_x), 20 + row * (box_h + gap_y)
        centre[name] = (x, y)
        heads = result.heads.get(name, []) if name != "logits" else []
        empty = name != "logits" and not heads
        colour = "#bbbbbb" if empty else CLASS_COLOURS[name]
        label = name.replace("_", " ")
        listing = (
            "logit(IO) − logit(S)"
            if name == "logits"
            else (", ".join(f"{layer}.{head}" for layer, head in heads[:8]) or "none found")
        )
        if len(heads) > 8:
            listing += f" +{len(heads) - 8}"
        parts.append(
            f'<g class="class-box" data-class="{name}"><rect x="{x}" y="{y}" width="{box_w}" '
            f'height="{box_h}" rx="8" fill="{colour}" fill-opacity="{0.12 if empty else 0.2}" '
            f'stroke="{colour}" stroke-width="2"/>'
            f'<text x="{x + box_w / 2}" y="{y + 22}" font-size="13" font-weight="600" '
            f'text-anchor="middle">{esc(label)}</text>'
            f'<text x="{x + box_w / 2}" y="{y + 44}" font-size="11" text-anchor="middle">'
            f"{esc(listing)}</text>"
            f'<text x="{x + box_w / 2}" y="{y + 62}" font-size="10" fill="#555" '
            f'text-anchor="middle">{"" if name == "logits" else f"{len(heads)} head(s)"}</text>'
            "</g>"
        )
    for sender, receiver, what in result.edges:
        if sender not in centre or receiver not in centre:
            continue
        (sx, sy), (rx, ry) = centre[sender], centre[receiver]
        x1, y1 = sx + box_w, sy + box_h / 2
        x2, y2 = rx, ry + box_h / 2
        if rx <= sx:  # same column: go down the side
            x1, y1, x2, y2 = sx + box_w / 2, sy + box_h, rx + box_w / 2, ry
        active = bool(result.heads.get(sender)) and (
            receiver == "logits" or bool(result.heads.get(receiver))
        )
        stroke = "#555" if active else "#ccc"
        parts.append(
            f'<line class="edge" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{stroke}" '
            f'stroke-width="1.6" marker-end="url(#arrow)"/>'
            f'<text x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 4}" font-size="10" '
            f'text-anchor="middle" fill="#333">{esc(what)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _names(heads: list) -> str:
    return ", ".join(f"{layer}.{head}" for layer, head in heads)


def _pattern_map(key: str, entry: dict, tokens: list[str]) -> str:
    pattern = torch.tensor(entry["pattern"])
    labels = [f"{i}:{t.strip() or '␣'}" for i, t in enumerate(tokens)]
    title = f"Head {key} ({entry['class'].replace('_', ' ')}): attention, query rows × key columns"
    return effect_map(
        pattern, title, row_labels=labels, col_labels=[str(i) for i in range(len(tokens))],
        kind="attention", keyed=False, cell=16,
    )  # fmt: skip


def render_report(result: IOICircuit) -> str:
    """The report page as one HTML string."""
    doc = result.to_json()
    total = result.n_layers * result.n_heads
    layers = [str(i) for i in range(result.n_layers)]
    heads = [str(i) for i in range(result.n_heads)]
    marked = {h: name for name in CLASSES for h in result.heads.get(name, [])}
    meets = result.meets_target()
    size, verdict = len(result.circuit), "met" if meets else "not met"
    figures = "".join(
        [
            figure(f"{result.clean_logit_diff:.2f}", "clean logit diff (IO − S)"),
            figure(f"{result.corrupted_logit_diff:.2f}", "ABC-corrupted logit diff"),
            figure(f"{size} / {total}", f"heads in circuit ({size / total:.1%})"),
            figure(f"{result.faithfulness:.1%}", "faithfulness: LD kept by the circuit alone"),
            figure(f"{result.completeness:.1%}", "completeness: LD destroyed by knocking it out"),
            figure(verdict, "target: ≤10% of heads keep ≥80%", meets),
        ]
    )  # fmt: skip
    effects = "".join(
        effect_map(result.maps[key], title, row_labels=layers, col_labels=heads, marked=marked)
        for key, title in EFFECT_MAPS
        if key in result.maps
    )
    attention = "".join(
        effect_map(
            result.maps[key],
            title,
            row_labels=layers,
            col_labels=heads,
            kind="attention",
            marked=marked,
        )  # fmt: skip
        for key, title in ATTENTION_MAPS
        if key in result.maps
    )
    by_position = "".join(
        effect_map(
            result.maps[key], title, row_labels=layers, col_labels=result.position_labels, cell_w=36
        )  # fmt: skip
        for key, title in POSITION_MAPS
        if key in result.maps
    )
    example = result.example or {}
    patterns = "".join(
        _pattern_map(key, entry, example["tokens"])
        for key, entry in example.get("patterns", {}).items()
    )
    rows = "".join(
        f"<tr><td>{esc(name.replace('_', ' '))}</td>"
        f"<td>{esc(_names(result.heads.get(name, [])) or '—')}</td>"
        f"<td>{doc['incompleteness'].get(name, '—')}</td></tr>"
        for name in CLASSES
    )  # fmt: skip
    comparison = "".join(
        f"<tr><td>{esc(row['class'].replace('_', ' '))}</td>"
        f"<td>{esc(row['role'])}</td><td>{esc(row['expected_attention'])}</td>"
        f"<td>{'—' if row['mean_attention'] is None else row['mean_attention']}</td>"
        f"<td>{'—' if row['relative_depth'] is None else row['relative_depth']}</td>"
        f"<td>{'—' if row['paper_relative_depth'] is None else row['paper_relative_depth']}</td>"
        f"<td>{esc(_names(row['paper_gpt2_heads']) or '—')}</td></tr>"
        for row in doc["paper_comparison"]
    )  # fmt: skip
    prompt = esc(example.get("prompt", ""))
    body = f"""<h1>Indirect object identification circuit — {esc(result.model)}</h1>
<div class="note">{result.n_prompts} prompt pairs (clean ABBA/BABA vs ABC), seed {result.seed},
{esc(result.dtype)}; {result.n_layers} layers × {result.n_heads} heads. Metric: logit
difference IO − S at the last token, normalised so that clean = 1 and corrupted = 0; patching
maps show the metric after patching the ABC run into the clean one (blue = the head matters).
Selection threshold {result.threshold}, at most {result.max_heads} heads.</div>
<div class="figures">{figures}</div>
<h2>Circuit</h2>
{diagram(result)}
<table class="text"><tr><th>class</th><th>heads (layer.head)</th><th>incompleteness</th></tr>
{rows}</table>
<div class="note">Faithfulness: every head outside the circuit mean-ablated over the ABC
prompts of its template gives LD {result.circuit_logit_diff:.3f}; knocking the circuit out
instead gives {result.knockout_logit_diff:.3f} (model: {result.clean_logit_diff:.3f}).
Incompleteness of class K: |LD(circuit − K) − LD(model − K)| / LD(model).</div>
<h2>Patching experiments (layer × head)</h2>
<div class="grid">{effects}</div>
<h2>Attention (layer × head, mean over prompts)</h2>
<div class="grid">{attention}</div>
<h2>Patching by layer and position</h2>
<div class="grid">{by_position}</div>
<h2>Attention patterns of key heads</h2>
<div class="note">Example prompt: “{prompt}”</div>
<div class="grid">{patterns}</div>
<h2>Against the IOI paper (GPT-2 small)</h2>
<table class="text"><tr><th>class</th><th>role in the paper</th><th>expected attention</th>
<th>mean attention of found heads</th><th>relative depth</th><th>paper relative depth</th>
<th>paper heads in GPT-2</th></tr>{comparison}</table>
"""
    return page(f"IOI circuit — {result.model}", body, script=HEATMAP_JS)


def write_outputs(result: IOICircuit, out: Path) -> dict[str, Path]:
    """Write `circuit.json` and `report.html` into `out` (created if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "circuit.json", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=1))
    paths["html"].write_text(render_report(result), encoding="utf-8")
    return paths
