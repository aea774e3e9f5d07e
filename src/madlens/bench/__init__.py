"""The bench: build tasks, run every detector on every hook, write `results.json` and
`report.html`, and print a table. `run_bench` is what `madlens bench` calls."""

import json
import math
import warnings
from pathlib import Path
from typing import Any

from madlens.activations.positions import hook_shapes
from madlens.bench.report import render_report
from madlens.bench.runner import (
    TaskResult,
    default_detectors,
    default_hooks,
    headline_hook,
    results_json,
    run_task,
)
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
from madlens.errors import MadlensError
from madlens.models import load_model, parse_hooks, resolve_device, resolve_dtype
from madlens.models.registry import DEFAULT_MODEL
from madlens.tasks import TASKS, Task, TaskCheckError, build_task, load_task_file


def run_bench(
    tasks: list[str] | None = None,
    detectors: list[str] | None = None,
    hooks: list[str] | None = None,
    model: str = DEFAULT_MODEL,
    task_file: str | Path | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    engine: str = "local",
    ray_address: str | None = None,
) -> tuple[dict[str, Any], list[TaskResult]]:
    """Run tasks x detectors x hooks; write `out/results.json` and `out/report.html`.
    Fine-tunes, generations and activations run on `device` (`auto`: CUDA, else MPS, else
    the CPU); with `engine="ray"` each task's activations are extracted by Ray workers
    (`madlens.scale`; inside a `madlens.scale.session`, one cluster serves every task).

    Detector names, hooks, dtype and device are checked before any task is built (a bad
    one costs no fine-tune). A task whose planted behaviour did not take is left out (with a
    warning) and listed under `failed_tasks`; a detector that raised is an `error` row;
    `problems` lists both, and the caller decides whether they are an error."""
    detectors = detectors or default_detectors()
    check_bench_args(detectors, hooks, model, dtype, device)
    if task_file is not None:
        chosen: list[Task | str] = [load_task_file(task_file, model)]
        chosen += list(tasks or [])
    else:
        # Without named tasks, --quick runs the tasks cheap enough for the quick demo.
        chosen = list(tasks or [t for t, spec in TASKS.items() if spec.quick or not quick])
    for name in chosen:
        if isinstance(name, str) and name not in TASKS:
            raise MadlensError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    n_resamples = 200 if quick else 1000
    results, failed = [], {}
    for item in chosen:
        try:
            task = (
                item
                if isinstance(item, Task)
                else build_task(item, model, quick, seed, progress, device=device)
            )
        except TaskCheckError as exc:
            # The planted behaviour did not take: no AUROC for this task, but the others run.
            failed[str(item)] = str(exc)
            warnings.warn(str(exc), stacklevel=2)
            continue
        results.append(run_task(task, detectors, hooks, seed, n_resamples, progress, dtype,
                                device=device, engine=engine,
                                ray_address=ray_address))  # fmt: skip
    doc = results_json(model, results)
    doc["failed_tasks"] = failed
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default))
        (out / "report.html").write_text(render_report(doc, results), encoding="utf-8")
    return doc, results


def check_bench_args(
    detectors: list[str], hooks: list[str] | None, model: str, dtype: str, device: str = "auto"
) -> None:
    """Fail with one line on an unknown detector, dtype, device or hook (one the base model
    lacks, or one no position can read), before any task is built: a LoRA fine-tune keeps
    the base model's hooks."""
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise MadlensError(f"unknown detector '{unknown[0]}'; known: {', '.join(DETECTORS)}")
    resolve_dtype(dtype)
    resolve_device(device)
    if hooks:
        lm = load_model(model, dtype=dtype, device=device)
        hook_shapes(lm, lm.check_hooks(parse_hooks(",".join(hooks), lm.n_layers)))


def problems(doc: dict[str, Any]) -> list[str]:
    """What went wrong in a bench run: tasks left out, and detectors that raised."""
    found = list(doc.get("failed_tasks", {}).values())
    found += [f"{r['task']}: {r['detector']} at {r['hook']} failed: {r['reason']}"
              for r in doc["rows"] if r.get("status") == "error"]  # fmt: skip
    return found


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def format_table(doc: dict[str, Any], results: list[TaskResult], verbose: bool = False) -> str:
    """The terminal summary: a detectors x tasks matrix of the headline AUROC and recall at
    1% FPR, label-free detectors first and supervised ones apart; `verbose` gives the full
    table of headline rows (with each anomaly kind's rows and bootstrap CIs)."""
    if not verbose:
        return format_matrix(doc, results)
    multi = {res.task.name: headline_hook(res) for res in results}
    lines = [f"{'task':<28}{'detector':<26}{'hook':<28}{'AUROC':>7}  {'95% CI':<13}{'AP':>6}"
             f"{'FPR@95':>8}{'R@1%':>7}  {'95% CI':<13}"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for row in doc["rows"]:
        base = row["task"].split("/")[0]
        if row.get("status", "ok") != "ok":
            lines.append(f"{row['task']:<28}{row['detector']:<26}{row['hook'][:27]:<28}"
                         f"{row['status']:>7}  {row['reason']}")  # fmt: skip
            continue
        hook = "multi" if row["hook"] == multi.get(base) and "+" in row["hook"] else row["hook"]
        ci, recall_ci = _ci(row.get("auroc_ci")), _ci(row.get("tpr_at_1fpr_ci"))
        lines.append(f"{row['task']:<28}{row['detector']:<26}{hook[:27]:<28}{_f(row['auroc']):>7}"
                     f"  {ci:<13}{_f(row['ap'], 2):>6}{_f(row['fpr_at_95tpr'], 2):>8}"
                     f"{_f(row['tpr_at_1fpr'], 2):>7}  {recall_ci:<13}")  # fmt: skip
    return "\n".join(lines)


def format_matrix(doc: dict[str, Any], results: list[TaskResult]) -> str:
    """Detectors (rows) x tasks (columns): `AUROC/recall@1%FPR` of each headline row; then
    each split's shortcut baselines with its verdict, and the goal per task (the best
    label-free detector, with bootstrap CIs)."""
    multi = {res.task.name: headline_hook(res) for res in results}
    tasks = [res.task.name for res in results]
    cells: dict[tuple[str, str], str] = {}
    for row in doc["rows"]:
        task, status = row["task"], row.get("status", "ok")
        if task not in multi or is_shortcut(row):  # per-kind rows (`ood/base64`): verbose only
            continue
        if status == "ok" and row["hook"] not in ("output", "black-box", multi[task]):
            continue
        cell = status if status != "ok" else f"{_f(row['auroc'], 2)}/{_f(row['tpr_at_1fpr'], 2)}"
        cells.setdefault((row["detector"], task), cell)
    names = list(dict.fromkeys(det for det, _ in cells))
    free = [n for n in names if not DETECTORS[n].supervised]
    supervised = [n for n in names if DETECTORS[n].supervised]
    first = max([len(n) for n in names] + [24]) + 1
    widths = [max(len(t), 9) + 1 for t in tasks]
    header = "AUROC/recall@1%FPR".ljust(first) + "".join(
        t.rjust(w) for t, w in zip(tasks, widths)
    )  # fmt: skip
    lines = [header, "-" * len(header)]
    for group, title in ((free, "label-free"), (supervised, "supervised (cross-fitted)")):
        if not group:
            continue
        lines.append(f"{title}:")
        for det in group:
            lines.append(det.ljust(first) + "".join(
                cells.get((det, t), "").rjust(w) for t, w in zip(tasks, widths)))  # fmt: skip
    lines.append("headline rows: multi-hook aggregate, logits or follow-up answers; "
                 "--verbose: every row")  # fmt: skip
    return "\n".join(lines + shortcut_lines(doc) + goal_lines(doc))


def shortcut_lines(doc: dict[str, Any]) -> list[str]:
    """Per split, the AUROC of each shortcut baseline and whether the split is controlled."""
    rows = [r for r in doc["rows"] if is_shortcut(r)]
    if not rows:
        return []
    lines = [f"shortcut baselines (one cue alone, classifier cross-fitted on the labels; "
             f"controlled: all <= {CONTROLLED_MAX}):"]  # fmt: skip
    width = max(len(r["task"]) for r in rows) + 2
    for split, ok in split_verdicts(rows).items():
        cells = []
        for r in rows:
            if r["task"] == split:
                value = "const" if r.get("constant") else r["status"] if r["status"] != "ok" \
                    else _f(r["auroc"], 2)  # fmt: skip
                cells.append(f"{cue(r)}={value}" + ("!" if controlled(r) is False else ""))
        mark = {True: "controlled", False: "shortcut NOT controlled", None: "not measured"}[ok]
        lines.append(f"  {split:<{width}}{' '.join(cells)}  {mark}")
    return lines


def goal_lines(doc: dict[str, Any]) -> list[str]:
    """Per task, the issue's goal on its controlled splits, stated whether met or not."""
    tasks = {name: t["goal"] for name, t in doc.get("tasks", {}).items() if t.get("goal")}
    if not tasks:
        return []
    lines = [f"goal: label-free AUROC >= {GOAL_AUROC} and recall@1%FPR >= {GOAL_RECALL} on a "
             "controlled split", "  (AUROC [CI] / recall [CI] of the best label-free of N, "
             "chosen on test labels: optimistic):"]  # fmt: skip
    for name, summary in tasks.items():
        for g in summary["goals"]:
            lines.append(f"  {g['split']}: goal {'met' if g['met'] else 'NOT met'}")
            lines.append(f"    {_goal_figure(g)}")
        if not summary["controlled_splits"]:
            lines.append(f"  {name}: no split controlled for its shortcuts: goal not assessable")
            if summary.get("uncontrolled"):
                lines.append(f"    whole task: {_goal_figure(summary['uncontrolled'])}")
    return lines


def _goal_figure(g: dict[str, Any]) -> str:
    return (
        f"{g['detector']} {_f(g['auroc'], 2)} {_ci(g['auroc_ci'])} / "
        f"{_f(g['tpr_at_1fpr'], 2)} {_ci(g.get('tpr_at_1fpr_ci'))} (best of {g['of']})"
    )


def _ci(pair: list | None) -> str:
    lo, hi = pair or (None, None)
    return f"[{_f(lo, 2)}, {_f(hi, 2)}]"


def _f(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


__all__ = [
    "TaskResult",
    "check_bench_args",
    "default_hooks",
    "format_matrix",
    "format_table",
    "problems",
    "render_report",
    "run_bench",
]
