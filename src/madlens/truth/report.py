"""truth.html: one self-contained page with accuracy-by-layer curves per dataset, the CCS vs
zero-shot summary and the transfer matrices (drawn with `madlens.report`)."""

import json
from pathlib import Path
from typing import Any

from madlens.report import DARK_GREY, GREY, PALETTE, esc, line_chart, page, plot, verdict

METHOD_COLOURS = {"ccs": PALETTE[1], "crc-tpc": PALETTE[0], "random": GREY,
                  "logistic": PALETTE[2], "zero-shot": PALETTE[3]}  # fmt: skip


def accuracy_chart(series: dict[str, list[float]], layers: list[int], title: str,
                   dashed: set[str] = frozenset()) -> str:  # fmt: skip
    """Accuracy (0.4..1, lower values drawn at 0.4) against layer, one curve per method."""
    points = {name: list(zip(layers, values)) for name, values in series.items()}
    colours = {name: METHOD_COLOURS.get(name.split(" ")[0], DARK_GREY) for name in series}
    chart = line_chart(points, xlabel="layer", ylabel="accuracy", ylim=(0.4, 1.0),
                       colours=colours, dashed=dashed, gridlines=(0.5, 0.75, 1.0),
                       css_class="curve")  # fmt: skip
    return plot(title, chart)


def render_truth_report(doc: dict[str, Any]) -> str:
    """The whole truth.html as one string."""
    hooks = doc["hooks"]
    layers = [int(h.split(".")[1]) if h.startswith("blocks.") else i for i, h in enumerate(hooks)]
    out = ["<h1>Truth probes</h1>",
           f"<p class='muted'>model {esc(doc['model'])} · madlens {esc(doc['madlens_version'])}"
           f" · {esc(doc['created'])} · activations: mean over the answer token(s) · each "
           "method fits on half of each dataset and is scored on the other half</p>",
           "<p>Solid lines: accuracy with the probe's sign as the method chose it (unsupervised)."
           " Dashed: after fixing the sign with labels, <code>max(acc, 1 - acc)</code>, the "
           "convention of CCS papers; it is not an unsupervised figure. The logistic probe "
           "(ceiling) and the zero-shot answer are supervised / sign-free.</p>"]  # fmt: skip
    s = doc["summary"]
    out.append("<h2>CCS against zero-shot</h2><table id='summary'><tr><th class='l'>dataset</th>"
               "<th>CCS best layer (sign-fixed)</th><th>same, unfixed</th><th>layer</th>"
               "<th>CCS mean over layers</th><th>logistic ceiling</th><th>zero-shot</th>"
               "<th>zero-shot calibrated</th><th>gain (points)</th></tr>")  # fmt: skip
    for name, r in s["per_dataset"].items():
        out.append(f"<tr><td class='l'>{esc(name)}</td><td>{r['ccs_best_sign_fixed']:.3f}</td>"
                   f"<td>{r['ccs_best_unfixed']:.3f}</td><td>{esc(r['ccs_best_hook'])}</td>"
                   f"<td>{r['ccs_mean_sign_fixed']:.3f}</td><td>{r['logistic_best']:.3f}</td>"
                   f"<td>{r['zero_shot']:.3f}</td><td>{r['zero_shot_calibrated']:.3f}</td>"
                   f"<td>{r['gain_points']:+.1f}</td></tr>")  # fmt: skip
    out.append(
        f"</table><p>Mean gain {s['mean_gain_points']:+.1f} points against the published "
        f"target of +{s['target_points']:.0f}: {verdict(s['target_met'])}.</p>"
    )
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
        out.append(accuracy_chart(series, layers, f"{name} ({d['n']} statements)", dashed))
    out.append("</div>")
    names = list(doc["datasets"])
    for method, matrix in doc["transfer"].items():
        out.append(f"<h2>Transfer: {esc(method)}</h2><p class='muted'>fit on the row's dataset,"
                   f" scored on the column's held-out half, at {esc(doc['transfer_hook'])}; "
                   "sign-fixed (unfixed)</p><table class='transfer'><tr><th class='l'>fit on"
                   "</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")  # fmt: skip
        for train in names:
            row = matrix[train]
            cells = "".join(f"<td>{row[t]['accuracy_sign_fixed']:.3f} "
                            f"({row[t]['accuracy']:.2f})</td>" for t in names)  # fmt: skip
            out.append(f"<tr><td class='l'>{esc(train)}</td>{cells}</tr>")
        out.append("</table>")
    out.append("<h2>Datasets</h2><table><tr><th class='l'>dataset</th><th>statements</th>"
               "<th class='l'>examples</th></tr>")  # fmt: skip
    for name, d in doc["datasets"].items():
        out.append(f"<tr><td class='l'>{esc(name)}</td><td>{d['n']}</td><td class='l'>"
                   f"{'<br>'.join(esc(e) for e in d['examples'])}</td></tr>")  # fmt: skip
    out.append("</table>")
    return page("madlens truth sweep", "\n".join(out))


def write_truth_outputs(doc: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write `out/truth.json` and `out/truth.html`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "truth.json", "html": folder / "truth.html"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["html"].write_text(render_truth_report(doc), encoding="utf-8")
    return paths
