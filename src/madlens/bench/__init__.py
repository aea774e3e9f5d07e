"""The bench: build tasks, run every detector on every hook, write `results.json` and
`report.html`, and print a table. `run_bench` is what `madlens bench` calls."""

import json
import math
import warnings
from pathlib import Path
from typing import Any

from madlens.bench.report import render_report
from madlens.bench.runner import (
    TaskResult,
    default_detectors,
    default_hooks,
    headline_hook,
    results_json,
    run_task,
)
from madlens.errors import MadlensError
from madlens.tasks import TASKS, Task, TaskCheckError, build_task, load_task_file


def run_bench(
    tasks: list[str] | None = None,
    detectors: list[str] | None = None,
    hooks: list[str] | None = None,
    model: str = "smollm2-135m-instruct",
    task_file: str | Path | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    dtype: str = "bfloat16",
) -> tuple[dict[str, Any], list[TaskResult]]:
    """Run tasks x detectors x hooks; write `out/results.json` and `out/report.html`.

    A task whose planted behaviour did not take is left out (with a warning) and listed
    under `failed_tasks`; the caller decides whether that is an error."""
    detectors = detectors or default_detectors()
    if task_file is not None:
        chosen: list[Task | str] = [load_task_file(task_file, model)]
        chosen += list(tasks or [])
    else:
        chosen = list(tasks or TASKS)
    for name in chosen:
        if isinstance(name, str) and name not in TASKS:
            raise MadlensError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    n_resamples = 200 if quick else 1000
    results, failed = [], {}
    for item in chosen:
        try:
            task = (
                item if isinstance(item, Task) else build_task(item, model, quick, seed, progress)
            )
        except TaskCheckError as exc:
            # The planted behaviour did not take: no AUROC for this task, but the others run.
            failed[str(item)] = str(exc)
            warnings.warn(str(exc), stacklevel=2)
            continue
        results.append(run_task(task, detectors, hooks, seed, n_resamples, progress, dtype))
    doc = results_json(model, results)
    doc["failed_tasks"] = failed
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default))
        (out / "report.html").write_text(render_report(doc, results), encoding="utf-8")
    return doc, results


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def format_table(doc: dict[str, Any], results: list[TaskResult]) -> str:
    """The terminal table: headline rows (multi-hook aggregate and output detectors)."""
    multi = {res.task.name: headline_hook(res) for res in results}
    lines = [f"{'task':<28}{'detector':<26}{'hook':<14}{'AUROC':>7}  {'95% CI':<13}{'AP':>6}"
             f"{'FPR@95':>8}"]  # fmt: skip
    lines.append("-" * len(lines[0]))
    for row in doc["rows"]:
        base = row["task"].split("/")[0]
        if row.get("status") == "n/a":
            lines.append(f"{row['task']:<28}{row['detector']:<26}{'n/a':<14}{'n/a':>7}  "
                         f"{row['reason']}")  # fmt: skip
            continue
        if row["hook"] not in ("output", "black-box", multi.get(base)):
            continue
        hook = "multi" if row["hook"] == multi.get(base) and "+" in row["hook"] else row["hook"]
        lo, hi = row["auroc_ci"]
        ci = f"[{_f(lo, 2)}, {_f(hi, 2)}]"
        lines.append(f"{row['task']:<28}{row['detector']:<26}{hook[:13]:<14}{_f(row['auroc']):>7}"
                     f"  {ci:<13}{_f(row['ap'], 2):>6}{_f(row['fpr_at_95tpr'], 2):>8}")  # fmt: skip
    return "\n".join(lines)


def _f(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


__all__ = ["TaskResult", "default_hooks", "format_table", "render_report", "run_bench"]
