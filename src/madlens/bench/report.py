"""The bench's HTML report: one self-contained file (inline CSS and SVG, no network) with
the headline matrix, targets beside measurements, ROC curves, histograms, AUROC by layer."""

import html
import math
from typing import Any

import numpy as np

from madlens.bench.runner import TaskResult, headline_hook
from madlens.detectors import DETECTORS

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.pass{color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plot{border:1px solid #eee;padding:.4em}
.muted{color:#777;font-size:.85em}svg text{font-size:11px;font-family:sans-serif}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _color(auroc: float) -> str:
    """White at 0.5, green towards 1, red towards 0."""
    if auroc is None or not math.isfinite(auroc):
        return "#eee"
    t = max(-1.0, min(1.0, (auroc - 0.5) * 2))
    if t >= 0:
        return f"rgb({int(255 - 155 * t)},{int(255 - 55 * t)},{int(255 - 155 * t)})"
    return f"rgb(255,{int(255 + 155 * t)},{int(255 + 155 * t)})"


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR at every threshold (ties handled together)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps, fps = np.cumsum(y)[distinct], np.cumsum(~y)[distinct]
    return np.r_[0, fps / max(1, (~y).sum())], np.r_[0, tps / max(1, y.sum())]


def _axes(w: int, h: int, pad: int, xlabel: str, ylabel: str, xticks: list, yticks: list) -> str:
    parts = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="#444"/>',
             f'<text x="{(w + pad) / 2}" y="{h - 5}" text-anchor="middle">{_esc(xlabel)}</text>',
             f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" '
             f'text-anchor="middle">{_esc(ylabel)}</text>']  # fmt: skip
    for x, label in xticks:
        parts.append(f'<text x="{x}" y="{h - pad + 14}" text-anchor="middle">{_esc(label)}</text>')
    for y, label in yticks:
        parts.append(f'<text x="{pad - 4}" y="{y + 4}" text-anchor="end">{_esc(label)}</text>')
    return "".join(parts)


def roc_svg(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> str:
    """ROC curves as an inline SVG, one polyline per (label, labels, scores)."""
    w, h, pad = 360, 300, 40
    sx, sy = (w - pad - 10), (h - pad - 10)
    body = [_axes(w, h, pad, "false positive rate", "true positive rate",
                  [(pad + sx * t, t) for t in (0, 0.5, 1)],
                  [(h - pad - sy * t, t) for t in (0, 0.5, 1)])]  # fmt: skip
    body.append(f'<line x1="{pad}" y1="{h - pad}" x2="{pad + sx}" y2="{10}" stroke="#bbb" '
                'stroke-dasharray="4"/>')  # fmt: skip
    for i, (label, y, s) in enumerate(curves):
        fpr, tpr = roc_points(y, s)
        pts = " ".join(f"{pad + sx * a:.1f},{h - pad - sy * b:.1f}" for a, b in zip(fpr, tpr))
        color = PALETTE[i % len(PALETTE)]
        body.append(f'<polyline class="roc" fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{pts}"/>')  # fmt: skip
        body.append(f'<text x="{pad + sx - 4}" y="{h - pad - 12 - 14 * i}" text-anchor="end" '
                    f'fill="{color}">{_esc(label)}</text>')  # fmt: skip
    return _svg(w, h, title, body)


def histogram_svg(labels: np.ndarray, scores: np.ndarray, title: str, bins: int = 24) -> str:
    """Score histograms, normal (blue) against anomalous (red)."""
    w, h, pad = 360, 220, 40
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(scores[labels == c], edges)[0] / max(1, (labels == c).sum())
              for c in (0, 1)]  # fmt: skip
    top = max(float(max(c.max() for c in counts)), 1e-9)
    bw = (w - pad - 10) / bins
    body = [
        _axes(
            w,
            h,
            pad,
            "score",
            "fraction",
            [(pad + 12, f"{lo:.3g}"), (w - 34, f"{hi:.3g}")],
            [(h - pad, 0), (10, f"{top:.2f}")],
        )
    ]
    for c, color in zip(counts, ("#1f77b4", "#d62728")):
        for i, v in enumerate(c):
            bh = (h - pad - 10) * v / top
            body.append(
                f'<rect class="bar" x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" '
                f'width="{bw:.1f}" height="{bh:.1f}" fill="{color}" fill-opacity="0.45"/>'
            )
    body.append(f'<text x="{w - 12}" y="20" text-anchor="end" fill="#1f77b4">normal</text>')
    body.append(f'<text x="{w - 12}" y="34" text-anchor="end" fill="#d62728">anomalous</text>')
    return _svg(w, h, title, body)  # fmt: skip


def layer_svg(series: dict[str, list[tuple[int, float]]], title: str) -> str:
    """AUROC against layer, one line per detector."""
    w, h, pad = 420, 260, 40
    layers = sorted({x for pts in series.values() for x, _ in pts}) or [0]
    x0, x1 = min(layers), max(layers) if max(layers) > min(layers) else min(layers) + 1
    sx, sy = (w - pad - 130) / (x1 - x0), (h - pad - 10)

    def y_of(a: float) -> float:
        return h - pad - sy * a

    body = [_axes(w, h, pad, "layer", "AUROC", [(pad + sx * (x - x0), x) for x in layers],
                  [(y_of(t), t) for t in (0, 0.5, 1)])]  # fmt: skip
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, a) for x, a in pts if math.isfinite(a)]
        coords = " ".join(f"{pad + sx * (x - x0):.1f},{y_of(a):.1f}" for x, a in good)
        body.append(f'<polyline class="layer" fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{coords}"/>')  # fmt: skip
        body.append(f'<text x="{w - 125}" y="{16 + 13 * i}" fill="{color}">{_esc(name)}</text>')
    return _svg(w, h, title, body)


def _svg(w: int, h: int, title: str, body: list[str]) -> str:
    return (
        f'<div class="plot"><div>{_esc(title)}</div><svg xmlns="http://www.w3.org/2000/svg" '
        f'width="{w}" height="{h}" viewBox="0 0 {w} {h}">{"".join(body)}</svg></div>'
    )


def _headline_hook(row: dict[str, Any], multi: dict[str, str]) -> bool:
    return row["hook"] in ("output", "black-box", "n/a") or row["hook"] == multi.get(row["task"])


def _label_free(detector: str) -> bool:
    """Neither a skyline nor another detector trained on anomaly labels (lie-detector)."""
    cls = DETECTORS.get(detector)
    return "skyline" not in detector and not (cls is not None and cls.supervised)


def _measured(row: dict[str, Any]) -> bool:
    return row.get("status") != "n/a" and row["auroc"] is not None


def measured_target(target: dict, rows: list[dict], multi_hook: str) -> float:
    """The AUROC a target is judged on: the detector's multi-hook aggregate row."""
    wanted = [r for r in rows if r["hook"] in (multi_hook, "output", "black-box") and _measured(r)]
    if target["detector"] == "best-label-free":
        wanted = [r for r in wanted if _label_free(r["detector"])]
    else:
        wanted = [r for r in wanted if r["detector"] == target["detector"]]
    values = [r["auroc"] for r in wanted if math.isfinite(r["auroc"])]
    return max(values) if values else float("nan")


def render_report(doc: dict[str, Any], results: list[TaskResult]) -> str:
    """The whole report as one HTML string."""
    rows = doc["rows"]
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    multi = {}
    for res in results:
        for name in [res.task.name] + [t for t in task_names if t.startswith(res.task.name + "/")]:
            multi[name] = headline_hook(res)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>madlens bench</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>madlens bench</h1><p class='muted'>model {_esc(doc['model'])} · madlens "
           f"{_esc(doc['madlens_version'])} · {_esc(doc['created'])}</p>"]  # fmt: skip
    for name, message in doc.get("failed_tasks", {}).items():
        out.append(f"<p class='fail' id='failed-{_esc(name)}'>{_esc(message)}: no AUROC is "
                   "reported for this task.</p>")  # fmt: skip
    out.append(
        "<h2>Headline: AUROC by task and detector</h2><p class='muted'>Activation "
        "detectors on the multi-hook aggregate (mean of per-hook z-scored scores), output "
        "detectors on the logits. Skylines see test labels (cross-fitted).</p>"
    )
    out.append("<table id='headline'><tr><th class='l'>task</th>" +
               "".join(f"<th>{_esc(d)}</th>" for d in detectors) + "</tr>")  # fmt: skip
    for task in task_names:
        cells = {r["detector"]: r for r in rows if r["task"] == task and _headline_hook(r, multi)}
        out.append(f"<tr><td class='l'>{_esc(task)}</td>")
        for d in detectors:
            r = cells.get(d)
            if r is not None and not _measured(r):
                out.append(f"<td class='na' title='{_esc(r.get('reason', ''))}'>n/a</td>")
                continue
            a = r["auroc"] if r else float("nan")
            tip = f"95% CI {_fmt(r['auroc_ci'][0])}-{_fmt(r['auroc_ci'][1])}" if r else ""
            out.append(f"<td style='background:{_color(a)}' title='{tip}'>{_fmt(a, 2)}</td>")
        out.append("</tr>")
    out.append("</table>")
    na = [r for r in rows if r.get("status") == "n/a"]
    if na:
        out.append("<table id='not-applicable'><tr><th class='l'>task</th><th class='l'>"
                   "detector</th><th class='l'>n/a: why it cannot run</th></tr>")  # fmt: skip
        for r in na:
            out.append(
                f"<tr><td class='l'>{_esc(r['task'])}</td><td class='l'>"
                f"{_esc(r['detector'])}</td><td class='l'>{_esc(r['reason'])}</td></tr>"
            )
        out.append("</table>")
    out.append("<h2>Targets</h2><table id='targets'><tr><th class='l'>task</th>"
               "<th class='l'>target</th><th class='l'>judged on</th><th>measured AUROC</th>"
               "<th>verdict</th></tr>")  # fmt: skip
    for res in results:
        for target in res.task.targets:
            scope = res.task.name + (f"/{target['group']}" if target.get("group") else "")
            task_rows = [r for r in rows if r["task"] == scope]
            value = measured_target(target, task_rows, multi.get(res.task.name, ""))
            need = target.get("min_auroc")
            verdict = ("<span class='muted'>reported</span>" if need is None else
                       "<span class='pass'>met</span>" if value >= need else
                       "<span class='fail'>not met</span>")  # fmt: skip
            out.append(f"<tr><td class='l'>{_esc(res.task.name)}</td><td class='l'>"
                       f"{_esc(target['text'])}</td><td class='l'>{_esc(target['detector'])}</td>"
                       f"<td>{_fmt(value)}</td><td>{verdict}</td></tr>")  # fmt: skip
    if not any(res.task.targets for res in results):
        out.append("<tr><td class='l' colspan='5'>no targets set for these tasks</td></tr>")
    out.append("</table>")
    for res in results:
        out.append(_task_section(res, rows, multi.get(res.task.name, "")))
    out.append("</body></html>")
    return "\n".join(out)


def _task_section(res: TaskResult, rows: list[dict], multi_hook: str) -> str:
    task = res.task
    out = [f"<h2 id='task-{_esc(task.name)}'>{_esc(task.name)}</h2>",
           f"<p>{_esc(task.description)} · {len(task.trusted)} trusted, "
           f"{int((task.labels == 0).sum())} normal and {int(task.labels.sum())} anomalous "
           f"test inputs · position "
           f"<code>{_esc(task.position)}</code> · {res.seconds:.0f} s</p>"]  # fmt: skip
    if task.checks:
        out.append("<table class='checks'><tr><th class='l'>task check</th><th>value</th></tr>")
        for key, value in task.checks.items():
            out.append(f"<tr><td class='l'>{_esc(key)}</td><td>{_fmt(float(value))}</td></tr>")
        out.append("</table>")
    headline = [r for r in rows if r["task"] == task.name and _measured(r)
                and r["hook"] in (multi_hook, "output", "black-box")]  # fmt: skip
    # The plots show the best label-free detectors (and the black-box lie detector, the
    # only one of its kind); skylines stay in the tables.
    label_free = [r for r in headline if _label_free(r["detector"]) or r["hook"] == "black-box"]
    best = sorted(label_free, key=lambda r: -r["auroc"] if math.isfinite(r["auroc"]) else 1)[:4]
    curves = [
        (f"{r['detector']} {r['auroc']:.2f}", task.labels, res.scores[(r["detector"], r["hook"])])
        for r in best
    ]
    plots = [roc_svg(curves, "ROC, best detectors")] if curves else []
    for r in best[:2]:
        scores = res.scores[(r["detector"], r["hook"])]
        plots.append(histogram_svg(task.labels, scores, f"scores: {r['detector']}"))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["task"] == task.name and r["hook"].startswith("blocks.") and "+" not in r["hook"]:
            layer = int(r["hook"].split(".")[1])
            series.setdefault(r["detector"], []).append((layer, r["auroc"]))
    if series:
        plots.append(layer_svg(series, "AUROC by layer (activation detectors)"))
    out.append("<div class='plots'>" + "".join(plots) + "</div>")
    out.append("<details><summary>all rows</summary><table><tr><th class='l'>task</th>"
               "<th class='l'>detector</th><th class='l'>hook</th><th>AUROC</th><th>95% CI</th>"
               "<th>AP</th><th>FPR@95TPR</th><th>fit s</th><th>score s</th></tr>")  # fmt: skip
    for r in rows:
        if r["task"] == task.name and not _measured(r):
            out.append(f"<tr><td class='l'>{_esc(r['task'])}</td><td class='l'>"
                       f"{_esc(r['detector'])}</td><td class='l'>n/a</td>"
                       f"<td class='l' colspan='6'>{_esc(r['reason'])}</td></tr>")  # fmt: skip
        elif r["task"] == task.name or r["task"].startswith(task.name + "/"):
            out.append(
                f"<tr><td class='l'>{_esc(r['task'])}</td><td class='l'>{_esc(r['detector'])}</td>"
                f"<td class='l'>{_esc(r['hook'])}</td><td>{_fmt(r['auroc'])}</td>"
                f"<td>{_fmt(r['auroc_ci'][0])}-{_fmt(r['auroc_ci'][1])}</td><td>{_fmt(r['ap'])}</td>"
                f"<td>{_fmt(r['fpr_at_95tpr'])}</td><td>{r['fit_s']:.3f}</td>"
                f"<td>{r['score_s']:.3f}</td></tr>"
            )  # fmt: skip
    out.append("</table></details>")
    return "\n".join(out)
