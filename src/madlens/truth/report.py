"""truth.html: one self-contained page (inline CSS and SVG, no network) with accuracy-by-layer
curves per dataset, the CCS vs zero-shot summary and the transfer matrices."""

import html
import json
from pathlib import Path
from typing import Any

PALETTE = {"ccs": "#d62728", "crc-tpc": "#1f77b4", "random": "#7f7f7f", "logistic": "#2ca02c",
           "zero-shot": "#9467bd"}  # fmt: skip
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.muted{color:#777;font-size:.85em}.plots{display:flex;flex-wrap:wrap;gap:1em}
.plot{border:1px solid #eee;padding:.4em}svg text{font-size:11px;font-family:sans-serif}
.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def accuracy_svg(series: dict[str, list[float]], layers: list[int], title: str,
                 dashed: set[str] = frozenset()) -> str:  # fmt: skip
    """Accuracy (0.4..1) against layer, one polyline per method."""
    w, h, pad, legend = 440, 260, 42, 120
    x0, x1 = min(layers), max(layers) if max(layers) > min(layers) else min(layers) + 1
    sx, sy = (w - pad - legend - 10) / (x1 - x0), (h - pad - 12) / 0.6

    def xy(layer: int, acc: float) -> str:
        return f"{pad + sx * (layer - x0):.1f},{h - pad - sy * (max(0.4, acc) - 0.4):.1f}"

    body = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - legend}" y2="{h - pad}" stroke="#444"/>',
            f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="#444"/>',
            f'<text x="{(w - legend + pad) / 2}" y="{h - 6}" text-anchor="middle">layer</text>',
            f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" '
            'text-anchor="middle">accuracy</text>']  # fmt: skip
    for layer in layers:
        body.append(f'<text x="{pad + sx * (layer - x0):.1f}" y="{h - pad + 14}" '
                    f'text-anchor="middle">{layer}</text>')  # fmt: skip
    for tick in (0.5, 0.75, 1.0):
        y = h - pad - sy * (tick - 0.4)
        body.append(f'<text x="{pad - 4}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
                    f'<line x1="{pad}" y1="{y:.1f}" x2="{w - legend}" y2="{y:.1f}" '
                    'stroke="#eee"/>')  # fmt: skip
    for i, (name, values) in enumerate(series.items()):
        color = PALETTE.get(name.split(" ")[0], "#444")
        dash = ' stroke-dasharray="5 3"' if name in dashed else ""
        points = " ".join(xy(layer, a) for layer, a in zip(layers, values))
        body.append(f'<polyline class="curve" fill="none" stroke="{color}" stroke-width="2"'
                    f'{dash} points="{points}"/>')  # fmt: skip
        body.append(f'<text x="{w - legend + 6}" y="{18 + 14 * i}" fill="{color}">'
                    f"{_esc(name)}</text>")  # fmt: skip
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}">{"".join(body)}</svg>')  # fmt: skip
    return f'<div class="plot"><div>{_esc(title)}</div>{svg}</div>'


def render_truth_report(doc: dict[str, Any]) -> str:
    """The whole truth.html as one string."""
    hooks = doc["hooks"]
    layers = [int(h.split(".")[1]) if h.startswith("blocks.") else i for i, h in enumerate(hooks)]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>madlens truth sweep"
           f"</title><style>{CSS}</style></head><body><h1>Truth probes</h1>",
           f"<p class='muted'>model {_esc(doc['model'])} · madlens {_esc(doc['madlens_version'])}"
           f" · {_esc(doc['created'])} · activations: mean over the answer token(s) · each "
           "method fits on half of each dataset and is scored on the other half</p>",
           "<p>Solid lines: accuracy with the probe's sign as the method chose it (unsupervised)."
           " Dashed: after fixing the sign with labels, <code>max(acc, 1 - acc)</code>, the "
           "convention of CCS papers; it is not an unsupervised figure. The logistic probe "
           "(ceiling) and the zero-shot answer are supervised / sign-free.</p>"]  # fmt: skip
    s = doc["summary"]
    verdict = "<span class='pass'>met</span>" if s["target_met"] else (
        "<span class='fail'>not met</span>")  # fmt: skip
    out.append("<h2>CCS against zero-shot</h2><table id='summary'><tr><th class='l'>dataset</th>"
               "<th>CCS best layer (sign-fixed)</th><th>same, unfixed</th><th>layer</th>"
               "<th>CCS mean over layers</th><th>logistic ceiling</th><th>zero-shot</th>"
               "<th>zero-shot calibrated</th><th>gain (points)</th></tr>")  # fmt: skip
    for name, r in s["per_dataset"].items():
        out.append(f"<tr><td class='l'>{_esc(name)}</td><td>{r['ccs_best_sign_fixed']:.3f}</td>"
                   f"<td>{r['ccs_best_unfixed']:.3f}</td><td>{_esc(r['ccs_best_hook'])}</td>"
                   f"<td>{r['ccs_mean_sign_fixed']:.3f}</td><td>{r['logistic_best']:.3f}</td>"
                   f"<td>{r['zero_shot']:.3f}</td><td>{r['zero_shot_calibrated']:.3f}</td>"
                   f"<td>{r['gain_points']:+.1f}</td></tr>")  # fmt: skip
    out.append(f"</table><p>Mean gain {s['mean_gain_points']:+.1f} points against the "
               f"published target of +{s['target_points']:.0f}: {verdict}.</p>")  # fmt: skip
    out.append("<h2>Accuracy by layer</h2><div class='plots'>")
    for name, d in doc["datasets"].items():
        series: dict[str, list[float]] = {}
        dashed = set()
        for method, by_hook in d["methods"].items():
            series[method] = [by_hook[h]["accuracy"] for h in hooks]
            if method in ("ccs", "crc-tpc", "random"):
                series[f"{method} sign-fixed"] = [by_hook[h]["accuracy_sign_fixed"] for h in hooks]
                dashed.add(f"{method} sign-fixed")
        series["zero-shot"] = [d["zero_shot"]["accuracy_calibrated"]] * len(hooks)
        out.append(accuracy_svg(series, layers, f"{name} ({d['n']} statements)", dashed))
    out.append("</div>")
    names = list(doc["datasets"])
    for method, matrix in doc["transfer"].items():
        out.append(f"<h2>Transfer: {_esc(method)}</h2><p class='muted'>fit on the row's dataset,"
                   f" scored on the column's held-out half, at {_esc(doc['transfer_hook'])}; "
                   "sign-fixed (unfixed)</p><table class='transfer'><tr><th class='l'>fit on"
                   "</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names) + "</tr>")  # fmt: skip
        for train in names:
            row = matrix[train]
            cells = "".join(f"<td>{row[t]['accuracy_sign_fixed']:.3f} "
                            f"({row[t]['accuracy']:.2f})</td>" for t in names)  # fmt: skip
            out.append(f"<tr><td class='l'>{_esc(train)}</td>{cells}</tr>")
        out.append("</table>")
    out.append("<h2>Datasets</h2><table><tr><th class='l'>dataset</th><th>statements</th>"
               "<th class='l'>examples</th></tr>")  # fmt: skip
    for name, d in doc["datasets"].items():
        out.append(f"<tr><td class='l'>{_esc(name)}</td><td>{d['n']}</td><td class='l'>"
                   f"{'<br>'.join(_esc(e) for e in d['examples'])}</td></tr>")  # fmt: skip
    out.append("</table></body></html>")
    return "\n".join(out)


def write_truth_outputs(doc: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write `out/truth.json` and `out/truth.html`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "truth.json", "html": folder / "truth.html"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["html"].write_text(render_truth_report(doc), encoding="utf-8")
    return paths
