"""`madlens bench`: every detector on every task and hook; writes results.json
and report.html and prints the terminal table."""

import time
from pathlib import Path
from typing import Annotated

import typer

from madlens.cli.options import (
    Device,
    Dtype,
    Engine,
    Hooks,
    Model,
    OutDir,
    RayAddress,
    Seed,
    names,
    output_dir,
)
from madlens.cli.runs import record_run
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
    dtype: Dtype = "auto",
    device: Device = "auto",
    verbose: Annotated[bool, typer.Option(help="print every row, not the matrix")] = False,
    engine: Engine = "local",
    ray_address: RayAddress = None,
) -> None:
    """Build the tasks, run every detector on them, write results.json and report.html.
    Without --hooks: 5 resid_post layers across depth."""
    from contextlib import nullcontext

    from madlens.bench import format_table, problems, run_bench
    from madlens.scale.cluster import check_engine, session

    output_dir(out)
    check_engine(engine, ray_address)
    start = time.perf_counter()
    task_list = names(tasks, "tasks")
    if task_file is not None and task_list is None:
        task_list = []
    with session(ray_address) if engine == "ray" else nullcontext():  # one cluster, all tasks
        doc, results = run_bench(task_list, names(detectors, "detectors"), names(hooks, "hooks"),
                                 model, task_file, quick, out, seed, True, dtype, device=device,
                                 engine=engine, ray_address=ray_address)  # fmt: skip
    typer.echo(format_table(doc, results, verbose=verbose))
    for result in results:
        if result.task.checks:
            checks = ", ".join(f"{k} {v:.2f}" for k, v in result.task.checks.items())
            typer.echo(f"{result.task.name} checks: {checks}")
    typer.echo(f"\nreport: {out / 'report.html'}  results: {out / 'results.json'}  "
               f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    found = problems(doc)
    record_run("bench", doc["rows"], start=start, model=model, dtype=dtype,
               status="problems" if found else "ok")  # fmt: skip
    if found:
        raise MadlensError(f"{len(found)} problem(s): " + "; ".join(found))
