"""`madlens bench`: tasks x detectors x hooks through one Monitor path; writes results.json
and report.html and prints the terminal table."""

import time
from pathlib import Path
from typing import Annotated

import typer

from madlens.cli.options import Dtype, Hooks, Model, OutDir, Seed, names, output_dir
from madlens.errors import MadlensError
from madlens.models.registry import DEFAULT_MODEL


def bench(
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names (default all)")] = (
        None
    ),
    detectors: Annotated[str | None, typer.Option(help="comma-separated detector names")] = None,
    hooks: Hooks = None,
    model: Model = DEFAULT_MODEL,
    task_file: Annotated[Path | None, typer.Option(help="custom task JSONL")] = None,
    quick: Annotated[bool, typer.Option(help="shrink data and fine-tune budgets")] = False,
    out: OutDir = Path("runs/bench"),
    seed: Seed = 0,
    dtype: Dtype = "bfloat16",
) -> None:
    """Build the tasks, run every detector on them, write results.json and report.html.
    Without --hooks: 5 resid_post layers across depth."""
    from madlens.bench import format_table, run_bench

    output_dir(out)
    start = time.perf_counter()
    task_list = names(tasks, "tasks")
    if task_file is not None and task_list is None:
        task_list = []
    detector_list = check_detectors(names(detectors, "detectors"))
    hook_list = names(hooks, "hooks")
    if hook_list is not None:
        check_bench_hooks(model, dtype, hook_list)
    doc, results = run_bench(
        task_list, detector_list, hook_list, model, task_file, quick, out, seed, True, dtype
    )
    typer.echo(format_table(doc, results))
    for result in results:
        if result.task.checks:
            checks = ", ".join(f"{k} {v:.2f}" for k, v in result.task.checks.items())
            typer.echo(f"{result.task.name} checks: {checks}")
    typer.echo(f"\nreport: {out / 'report.html'}  results: {out / 'results.json'}  "
               f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    if doc["failed_tasks"]:
        raise MadlensError(f"{len(doc['failed_tasks'])} task(s) left out: "
                           + "; ".join(doc["failed_tasks"].values()))  # fmt: skip


def check_detectors(detectors: list[str] | None) -> list[str] | None:
    """Fail on an unknown detector name before any task is built."""
    from madlens.detectors import DETECTORS

    for name in detectors or []:
        if name not in DETECTORS:
            raise MadlensError(f"unknown detector '{name}'; known: {', '.join(DETECTORS)}")
    return detectors


def check_bench_hooks(model: str, dtype: str, hooks: list[str]) -> None:
    """Fail on a hook the base model lacks, or one no position can read, before any task
    is built (a LoRA fine-tune keeps the base model's hooks)."""
    from madlens.activations.positions import hook_shapes
    from madlens.models import load_model, parse_hooks

    lm = load_model(model, dtype)
    hook_shapes(lm, lm.check_hooks(parse_hooks(",".join(hooks), lm.n_layers)))
