"""The bench's report.html: the headline matrix (label-free detectors apart from supervised
ones), the shortcut baselines and the goal per task, targets beside measurements, per-task
ROC curves, histograms and AUROC by layer."""

import math
from typing import Any

from madlens.bench.runner import TaskResult, headline_hook
from madlens.bench.shortcuts import (
    CONTROLLED_MAX,
    GOAL_AUROC,
    GOAL_RECALL,
    controlled,
    cue,
    is_shortcut,
    split_verdicts,
)
from madlens.detectors import DETECTORS
from madlens.report import (
    auroc_colour,
    esc,
    fmt,
    histogram_chart,
    line_chart,
    page,
    plot,
    roc_chart,
    verdict,
)

UNHOOKED = ("output", "black-box", "n/a")  # rows that are not per activation hook


def _status(row: dict[str, Any]) -> str:
    return row.get("status", "ok")  # rows written before `status` existed were all measured


def _measured(row: dict[str, Any]) -> bool:
    return _status(row) == "ok" and row["auroc"] is not None


def _supervised(detector: str) -> bool:
    """Whether the detector declares that `fit` sees anomaly labels (skylines, lie detector)."""
    cls = DETECTORS.get(detector)
    return cls is not None and cls.supervised


def _headline_hook(row: dict[str, Any], multi: dict[str, str]) -> bool:
    return row["hook"] in UNHOOKED or row["hook"] == multi.get(row["task"])


def measured_target(target: dict, rows: list[dict], multi_hook: str) -> float:
    """The AUROC a target is judged on: the detector's multi-hook aggregate row."""
    wanted = [r for r in rows if r["hook"] in (multi_hook, "output", "black-box") and _measured(r)]
    if target["detector"] == "best-label-free":
        wanted = [r for r in wanted if not _supervised(r["detector"])]
    else:
        wanted = [r for r in wanted if r["detector"] == target["detector"]]
    values = [r["auroc"] for r in wanted if math.isfinite(r["auroc"])]
    return max(values) if values else float("nan")


def _apart(detector: str, supervised: list[str]) -> str:
    """The first supervised column is ruled off from the label-free ones."""
    return " class='apart'" if supervised and detector == supervised[0] else ""


def _headline(rows: list[dict], task_names: list[str], multi: dict[str, str]) -> list[str]:
    present = list(dict.fromkeys(r["detector"] for r in rows if not is_shortcut(r)))
    label_free = [d for d in present if not _supervised(d)]
    supervised = [d for d in present if _supervised(d)]
    group = (f"<th colspan='{len(supervised)}' class='apart'>supervised: see anomaly labels</th>"
             if supervised else "")  # fmt: skip
    out = [
        "<h2>Headline: AUROC by task and detector</h2><p class='muted'>Activation detectors on "
        "the multi-hook aggregate (mean of per-hook z-scored scores), output detectors on the "
        "logits. Each cell: AUROC, and below it the recall at 1% FPR with its bootstrap 95% "
        "CI (hover: AUROC's CI). Supervised detectors "
        "declare that they see anomaly labels (cross-fitted on the test set): they are shown "
        "apart, as ceilings, not as monitors.</p>",
        "<table id='headline'><tr><th class='l' rowspan='2'>task</th>"
        f"<th colspan='{len(label_free)}'>label-free</th>"
        + group
        + "</tr><tr>"
        + "".join(f"<th{_apart(d, supervised)}>{esc(d)}</th>" for d in label_free + supervised)
        + "</tr>",
    ]
    for task in task_names:
        here = [r for r in rows if r["task"] == task and not is_shortcut(r)]
        cells = {r["detector"]: r for r in here if _headline_hook(r, multi)}
        out.append(f"<tr><td class='l'>{esc(task)}</td>")
        for d in label_free + supervised:
            r, apart = cells.get(d), _apart(d, supervised)
            status = "ok" if r is None else _status(r)
            if status == "n/a":
                css = " class='apart na'" if apart else " class='na'"
                out.append(f"<td{css} title='{esc(r.get('reason', ''))}'>n/a</td>")
            elif status == "error":
                out.append(f"<td{apart} title='{esc(r.get('reason', ''))}'><span class='fail'>"
                           "error</span></td>")  # fmt: skip
            elif r is None:
                out.append(f"<td{apart} style='background:{auroc_colour(None)}'>n/a</td>")
            else:
                lo, hi = r.get("auroc_ci") or (None, None)
                out.append(
                    f"<td{apart} style='background:{auroc_colour(r['auroc'])}' title='95% CI "
                    f"{fmt(lo)}-{fmt(hi)}'>{fmt(r['auroc'], 2)}<br><span class='sub' "
                    f"title='recall at 1% FPR, bootstrap 95% CI'>{fmt(r.get('tpr_at_1fpr'), 2)}"
                    f" {_ci(r.get('tpr_at_1fpr_ci'))}</span></td>"
                )
        out.append("</tr>")
    out.append("</table>")
    return out


def _ci(pair: list | None) -> str:
    lo, hi = pair or (None, None)
    return f"[{fmt(lo, 2)}–{fmt(hi, 2)}]"


def _shortcuts(rows: list[dict]) -> list[str]:
    """Per split, each shortcut baseline's AUROC and the verdict: controlled when no cue
    alone reaches above 0.6."""
    mine = [r for r in rows if is_shortcut(r)]
    if not mine:
        return []
    out = [
        "<h2>Shortcut baselines</h2><p class='muted'>A shortcut baseline sees only a cue other "
        "than the mechanism (<code>length</code>: tokens in the input; <code>novel-tokens"
        "</code>: its tokens that occur in no trusted input; and the task's own cues, named in "
        "its description). It is a classifier fitted on the test labels (bag of words or the "
        "number into a logistic regression, cross-fitted on two folds): supervised, an upper "
        f"bound on what the cue gives away, not a monitor. A split is controlled when every "
        f"cue stays at AUROC &le; {CONTROLLED_MAX}.</p>",
        "<table id='shortcuts'><tr><th class='l'>task / split</th><th class='l'>cue</th>"
        "<th>AUROC</th><th>95% CI</th><th>verdict</th></tr>",
    ]
    verdicts = split_verdicts(mine)
    for split, ok in verdicts.items():
        here = [r for r in mine if r["task"] == split]
        for i, r in enumerate(here):
            first = (f"<td class='l' rowspan='{len(here)}'>{esc(split)}<br>"
                     f"{verdict(ok, 'controlled', 'shortcut NOT controlled')}</td>"
                     if i == 0 else "")  # fmt: skip
            if r.get("constant") or r.get("status", "ok") != "ok":
                value, ci = ("constant" if r.get("constant") else esc(r["status"])), ""
            else:
                value, ci = fmt(r["auroc"]), _ci(r.get("auroc_ci"))
            ok_cue = controlled(r)
            out.append(f"<tr class='shortcut'>{first}<td class='l'>{esc(cue(r))}</td>"
                       f"<td>{value}</td><td>{ci}</td><td title='{esc(r.get('reason', ''))}'>"
                       f"{verdict(ok_cue, 'controlled', 'NOT controlled')}</td></tr>")  # fmt: skip
    out.append("</table>")
    return out


def _goal(doc: dict[str, Any]) -> list[str]:
    """The issue's goal per task: the best label-free detector on each controlled split
    (chosen on test labels, so optimistic), met or not; where no split is controlled, the
    whole task's figure, marked as such."""
    tasks = {name: t["goal"] for name, t in doc.get("tasks", {}).items() if t.get("goal")}
    if not tasks:
        return []
    out = [
        f"<h2>Goal: a label-free detector at AUROC &ge; {GOAL_AUROC} and recall at 1% FPR "
        f"&ge; {GOAL_RECALL} on a controlled split</h2><p class='muted'>Per split, the best "
        "label-free headline detector: one that meets both if any, else the highest AUROC. It "
        "is the best of N, chosen on the test labels: an optimistic figure, not a monitor "
        "picked in advance.</p>",
        "<table id='goal'><tr><th class='l'>task</th><th class='l'>split</th><th class='l'>"
        "best label-free (best of N, chosen on test labels = optimistic)</th><th>AUROC</th>"
        "<th>recall at 1% FPR</th><th>verdict</th></tr>",
    ]
    for name, summary in tasks.items():
        shown = [(g, verdict(g["met"])) for g in summary["goals"]]
        if not summary["controlled_splits"]:
            whole = summary.get("uncontrolled")
            note = "<span class='fail'>no split controlled for its shortcuts: not assessable</span>"
            shown = [(whole or {"split": name}, note)]
        for g, mark in shown:
            figures = (f"<td class='l'>{esc(g['detector'])} (best of {g['of']})</td><td>"
                       f"{fmt(g['auroc'], 2)} {_ci(g['auroc_ci'])}</td><td>"
                       f"{fmt(g['tpr_at_1fpr'], 2)} {_ci(g.get('tpr_at_1fpr_ci'))}</td>"
                       if "detector" in g else "<td class='l' colspan='3'>no label-free "
                       "detector measured</td>")  # fmt: skip
            out.append(f"<tr><td class='l'>{esc(name)}</td><td class='l'>{esc(g['split'])}"
                       f"</td>{figures}<td>{mark}</td></tr>")  # fmt: skip
    out.append("</table>")
    return out


def _unmeasured(rows: list[dict]) -> list[str]:
    """The n/a rows (cannot run on the task) and the error rows (failed), with their reasons."""
    out = []
    na = [r for r in rows if _status(r) == "n/a"]
    if na:
        out.append("<table id='not-applicable'><tr><th class='l'>task</th><th class='l'>"
                   "detector</th><th class='l'>n/a: why it cannot run</th></tr>")  # fmt: skip
        out += [f"<tr><td class='l'>{esc(r['task'])}</td><td class='l'>{esc(r['detector'])}"
                f"</td><td class='l'>{esc(r.get('reason', ''))}</td></tr>" for r in na]  # fmt: skip
        out.append("</table>")
    errors = [r for r in rows if _status(r) == "error"]
    if errors:
        out.append(
            "<table id='errors'><tr><th class='l'>task</th><th class='l'>detector</th>"
            "<th class='l'>hook</th><th class='l'>error: why it failed</th></tr>"
        )
        for r in errors:
            out.append(
                f"<tr><td class='l'>{esc(r['task'])}</td><td class='l'>{esc(r['detector'])}"
                f"</td><td class='l'>{esc(r['hook'])}</td><td class='l fail'>"
                f"{esc(r.get('reason', ''))}</td></tr>"
            )
        out.append("</table>")
    return out


def render_report(doc: dict[str, Any], results: list[TaskResult]) -> str:
    """The whole report as one HTML string."""
    rows = doc["rows"]
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    multi = {}
    for res in results:
        for name in [res.task.name] + [t for t in task_names if t.startswith(res.task.name + "/")]:
            multi[name] = headline_hook(res)
    out = [f"<h1>madlens bench</h1><p class='muted'>model {esc(doc['model'])} · madlens "
           f"{esc(doc['madlens_version'])} · {esc(doc['created'])}</p>"]  # fmt: skip
    for name, message in doc.get("failed_tasks", {}).items():
        out.append(f"<p class='fail' id='failed-{esc(name)}'>{esc(message)}: no AUROC is "
                   "reported for this task.</p>")  # fmt: skip
    out += _headline(rows, task_names, multi)
    out += _goal(doc)
    out += _shortcuts(rows)
    out += _unmeasured(rows)
    out.append("<h2>Targets</h2><table id='targets'><tr><th class='l'>task</th>"
               "<th class='l'>target</th><th class='l'>judged on</th><th>measured AUROC</th>"
               "<th>verdict</th></tr>")  # fmt: skip
    for res in results:
        for target in res.task.targets:
            scope = res.task.name + (f"/{target['group']}" if target.get("group") else "")
            task_rows = [r for r in rows if r["task"] == scope]
            value = measured_target(target, task_rows, multi.get(res.task.name, ""))
            need = target.get("min_auroc")
            out.append(f"<tr><td class='l'>{esc(res.task.name)}</td><td class='l'>"
                       f"{esc(target['text'])}</td><td class='l'>{esc(target['detector'])}</td>"
                       f"<td>{fmt(value)}</td><td>"
                       f"{verdict(None if need is None else value >= need)}</td></tr>")  # fmt: skip
    if not any(res.task.targets for res in results):
        out.append("<tr><td class='l' colspan='5'>no targets set for these tasks</td></tr>")
    out.append("</table>")
    for res in results:
        out.append(_task_section(res, rows, multi.get(res.task.name, "")))
    return page("madlens bench", "\n".join(out))


def _task_section(res: TaskResult, rows: list[dict], multi_hook: str) -> str:
    task = res.task
    out = [f"<h2 id='task-{esc(task.name)}'>{esc(task.name)}</h2>",
           f"<p>{esc(task.description)} · {len(task.trusted)} trusted, "
           f"{int((task.labels == 0).sum())} normal and {int(task.labels.sum())} anomalous "
           f"test inputs · position "
           f"<code>{esc(task.position)}</code> · {res.seconds:.0f} s</p>"]  # fmt: skip
    if task.checks:
        out.append("<table class='checks'><tr><th class='l'>task check</th><th>value</th></tr>")
        for key, value in task.checks.items():
            out.append(f"<tr><td class='l'>{esc(key)}</td><td>{fmt(float(value))}</td></tr>")
        out.append("</table>")
    headline = [r for r in rows if r["task"] == task.name and _measured(r)
                and r["hook"] in (multi_hook, "output", "black-box")
                and (r["detector"], r["hook"]) in res.scores]  # fmt: skip
    # The plots show the best label-free detectors (and the black-box lie detector, the
    # only one of its kind); supervised skylines stay in the tables.
    shown = [r for r in headline if not _supervised(r["detector"]) or r["hook"] == "black-box"]
    best = sorted(shown, key=lambda r: -r["auroc"] if math.isfinite(r["auroc"]) else 1)[:4]
    curves = [
        (f"{r['detector']} {r['auroc']:.2f}", task.labels, res.scores[(r["detector"], r["hook"])])
        for r in best
    ]
    plots = [plot("ROC, best detectors", roc_chart(curves))] if curves else []
    for r in best[:2]:
        scores = res.scores[(r["detector"], r["hook"])]
        plots.append(plot(f"scores: {r['detector']}", histogram_chart(task.labels, scores)))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        hook = r["hook"]
        if (
            r["task"] == task.name
            and _measured(r)
            and hook.startswith("blocks.")
            and "+" not in hook
        ):
            series.setdefault(r["detector"], []).append((int(hook.split(".")[1]), r["auroc"]))
    if series:
        chart = line_chart(series, xlabel="layer", ylabel="AUROC", css_class="layer")
        plots.append(plot("AUROC by layer (activation detectors)", chart))
    out.append("<div class='plots'>" + "".join(plots) + "</div>")
    out.append("<details><summary>all rows</summary><table><tr><th class='l'>task</th>"
               "<th class='l'>detector</th><th class='l'>hook</th><th>AUROC</th><th>95% CI</th>"
               "<th>AP</th><th>FPR@95TPR</th><th>recall@1%FPR</th><th>95% CI</th><th>fit s</th>"
               "<th>score s</th></tr>")  # fmt: skip
    for r in rows:
        if r["task"] == task.name and not _measured(r):
            error = _status(r) == "error"
            reason = ("error: " if error else "") + esc(r.get("reason", ""))
            out.append(
                f"<tr><td class='l'>{esc(r['task'])}</td><td class='l'>{esc(r['detector'])}</td>"
                f"<td class='l'>{esc(r['hook'] if error else 'n/a')}</td><td class='l"
                f"{' fail' if error else ''}' colspan='8'>{reason}</td></tr>"
            )
        elif r["task"] == task.name or r["task"].startswith(task.name + "/"):
            lo, hi = r.get("auroc_ci") or (None, None)
            out.append(
                f"<tr><td class='l'>{esc(r['task'])}</td><td class='l'>{esc(r['detector'])}</td>"
                f"<td class='l'>{esc(r['hook'])}</td><td>{fmt(r['auroc'])}</td>"
                f"<td>{fmt(lo)}-{fmt(hi)}</td><td>{fmt(r['ap'])}</td>"
                f"<td>{fmt(r['fpr_at_95tpr'])}</td><td>{fmt(r.get('tpr_at_1fpr'))}</td>"
                f"<td>{_ci(r.get('tpr_at_1fpr_ci'))}</td><td>{r['fit_s']:.3f}</td>"
                f"<td>{r['score_s']:.3f}</td></tr>"
            )
    out.append("</table></details>")
    return "\n".join(out)
