"""The IOI discovery report: one self-contained HTML page (inline SVG and a few lines of inline
JavaScript, nothing fetched) and the `circuit.json` beside it."""

import html
import json
from pathlib import Path

import torch

from madlens.circuits.discovery import CLASSES, IOICircuit

CLASS_COLOURS = {
    "name_mover": "#1b9e77",
    "negative_name_mover": "#d95f02",
    "s_suppression": "#a6761d",
    "s_inhibition": "#7570b3",
    "induction": "#e7298a",
    "duplicate_token": "#66a61e",
    "previous_token": "#e6ab02",
    "logits": "#444444",
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

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.figures{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.figure{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.figure b{display:block;font-size:20px}.figure span{font-size:12px;color:#555}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.map{font-size:12px}.map .title{font-weight:600;margin-bottom:4px;max-width:260px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f5f5f5}.ok{color:#1a7f37;font-weight:600}
.bad{color:#b42318;font-weight:600}rect.cell.hl{stroke:#000;stroke-width:2}
.note{font-size:13px;color:#555;max-width:900px}
"""

SCRIPT = """
(function(){
  var cells=document.querySelectorAll('rect.cell');
  cells.forEach(function(c){
    c.addEventListener('mouseenter',function(){
      var key=c.getAttribute('data-key');
      document.querySelectorAll('rect.cell[data-key="'+key+'"]').forEach(function(o){
        o.classList.add('hl');});});
    c.addEventListener('mouseleave',function(){
      document.querySelectorAll('rect.cell.hl').forEach(function(o){o.classList.remove('hl');});
    });
  });
  document.body.setAttribute('data-cells',String(cells.length));
  document.body.setAttribute('data-maps',String(document.querySelectorAll('svg.heatmap').length));
})();
"""


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    r, g, bl = (round(x + (y - x) * t) for x, y in zip(a, b))
    return f"#{r:02x}{g:02x}{bl:02x}"


def diverging(value: float, scale: float) -> str:
    """Blue below zero, white at zero, red above, saturating at +-`scale`."""
    if value != value:  # NaN: no path from this head
        return "#eeeeee"
    t = value / scale if scale > 0 else 0.0
    return (
        _mix((255, 255, 255), (33, 102, 172), -t)
        if t < 0
        else _mix((255, 255, 255), (178, 24, 43), t)
    )


def sequential(value: float) -> str:
    """White at 0 to dark purple at 1 (attention weights)."""
    if value != value:
        return "#eeeeee"
    return _mix((255, 255, 255), (63, 0, 125), value)


def heatmap(
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
    """One titled SVG heatmap. `kind="effect"` shows `value - 1` (patching maps normalised to
    clean = 1) on a diverging scale; `"attention"` shows values in [0, 1]. Cells of
    `marked` heads get a border in their class colour; every cell has a tooltip."""
    values = values.float()
    rows, cols = values.shape
    cw = cell_w or cell
    left, top = max(34, 6 * max(len(label) for label in row_labels) + 8), 22
    width, height = left + cols * cw + 4, top + rows * cell + 4
    finite = values[~torch.isnan(values)]
    scale = float((finite - 1).abs().max()) if kind == "effect" and len(finite) else 1.0
    parts = [
        f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}">'
    ]
    step = max(1, cols // 12)
    for j in range(0, cols, step):
        x = left + j * cw + cw / 2
        parts.append(
            f'<text x="{x}" y="{top - 6}" font-size="9" text-anchor="middle">'
            f"{html.escape(col_labels[j])}</text>"
        )
    for i in range(rows):
        y = top + i * cell
        if rows <= 16 or i % 2 == 0:
            parts.append(
                f'<text x="{left - 4}" y="{y + cell * 0.75}" font-size="9" text-anchor="end">'
                f"{html.escape(row_labels[i])}</text>"
            )
        for j in range(cols):
            v = float(values[i, j])
            colour = diverging(v - 1, scale) if kind == "effect" else sequential(v)
            key = f' data-key="{i}.{j}"' if keyed else ""
            shown = "n/a" if v != v else f"{v:.3f}"
            parts.append(
                f'<rect class="cell"{key} x="{left + j * cw}" y="{y}" width="{cw}" '
                f'height="{cell}" fill="{colour}"><title>{html.escape(row_labels[i])} '
                f"{html.escape(col_labels[j])}: {shown}</title></rect>"
            )
    for (i, j), klass in (marked or {}).items():
        parts.append(
            f'<rect x="{left + j * cw + 1}" y="{top + i * cell + 1}" width="{cw - 2}" '
            f'height="{cell - 2}" fill="none" stroke="{CLASS_COLOURS.get(klass, "#000")}" '
            f'stroke-width="2"/>'
        )
    parts.append("</svg>")
    legend = (
        f"blue: lowers the metric, red: raises it (max |metric − 1| = {scale:.2f})"
        if kind == "effect"
        else "white 0 → purple 1"
    )
    return (
        f'<div class="map"><div class="title">{html.escape(title)}</div>{"".join(parts)}'
        f'<div class="note">{legend}</div></div>'
    )


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
            f'text-anchor="middle">{html.escape(label)}</text>'
            f'<text x="{x + box_w / 2}" y="{y + 44}" font-size="11" text-anchor="middle">'
            f"{html.escape(listing)}</text>"
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
            f'text-anchor="middle" fill="#333">{html.escape(what)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _names(heads: list) -> str:
    return ", ".join(f"{layer}.{head}" for layer, head in heads)


def _figure(value: str, label: str, css: str = "") -> str:
    return (
        f'<div class="figure"><b class="{css}">{html.escape(value)}</b><span>{label}</span></div>'
    )


def _pattern_map(key: str, entry: dict, tokens: list[str]) -> str:
    pattern = torch.tensor(entry["pattern"])
    labels = [f"{i}:{t.strip() or '␣'}" for i, t in enumerate(tokens)]
    title = f"Head {key} ({entry['class'].replace('_', ' ')}): attention, query rows × key columns"
    return heatmap(
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
            _figure(f"{result.clean_logit_diff:.2f}", "clean logit diff (IO − S)"),
            _figure(f"{result.corrupted_logit_diff:.2f}", "ABC-corrupted logit diff"),
            _figure(f"{size} / {total}", f"heads in circuit ({size / total:.1%})"),
            _figure(f"{result.faithfulness:.1%}", "faithfulness: LD kept by the circuit alone"),
            _figure(f"{result.completeness:.1%}", "completeness: LD destroyed by knocking it out"),
            _figure(verdict, "target: ≤10% of heads keep ≥80%", "ok" if meets else "bad"),
        ]
    )  # fmt: skip
    effects = "".join(
        heatmap(result.maps[key], title, row_labels=layers, col_labels=heads, marked=marked)
        for key, title in EFFECT_MAPS
        if key in result.maps
    )
    attention = "".join(
        heatmap(
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
        heatmap(
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
        f"<tr><td>{html.escape(name.replace('_', ' '))}</td>"
        f"<td>{html.escape(_names(result.heads.get(name, [])) or '—')}</td>"
        f"<td>{doc['incompleteness'].get(name, '—')}</td></tr>"
        for name in CLASSES
    )  # fmt: skip
    comparison = "".join(
        f"<tr><td>{html.escape(row['class'].replace('_', ' '))}</td>"
        f"<td>{html.escape(row['role'])}</td><td>{html.escape(row['expected_attention'])}</td>"
        f"<td>{'—' if row['mean_attention'] is None else row['mean_attention']}</td>"
        f"<td>{'—' if row['relative_depth'] is None else row['relative_depth']}</td>"
        f"<td>{'—' if row['paper_relative_depth'] is None else row['paper_relative_depth']}</td>"
        f"<td>{html.escape(_names(row['paper_gpt2_heads']) or '—')}</td></tr>"
        for row in doc["paper_comparison"]
    )  # fmt: skip
    prompt = html.escape(example.get("prompt", ""))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>IOI circuit — {html.escape(result.model)}</title>
<style>{STYLE}</style></head>
<body>
<h1>Indirect object identification circuit — {html.escape(result.model)}</h1>
<div class="note">{result.n_prompts} prompt pairs (clean ABBA/BABA vs ABC), seed {result.seed},
{html.escape(result.dtype)}; {result.n_layers} layers × {result.n_heads} heads. Metric: logit
difference IO − S at the last token, normalised so that clean = 1 and corrupted = 0; patching
maps show the metric after patching the ABC run into the clean one (blue = the head matters).
Selection threshold {result.threshold}, at most {result.max_heads} heads.</div>
<div class="figures">{figures}</div>
<h2>Circuit</h2>
{diagram(result)}
<table><tr><th>class</th><th>heads (layer.head)</th><th>incompleteness</th></tr>{rows}</table>
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
<table><tr><th>class</th><th>role in the paper</th><th>expected attention</th>
<th>mean attention of found heads</th><th>relative depth</th><th>paper relative depth</th>
<th>paper heads in GPT-2</th></tr>{comparison}</table>
<script>{SCRIPT}</script>
</body></html>
"""


def write_outputs(result: IOICircuit, out: Path) -> dict[str, Path]:
    """Write `circuit.json` and `report.html` into `out` (created if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "circuit.json", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=1))
    paths["html"].write_text(render_report(result), encoding="utf-8")
    return paths
