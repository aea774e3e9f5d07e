"""`madlens lab list` and `madlens lab NAME --out DIR`: re-run a research finding on a model
you control; writes DIR/lab.json and DIR/lab.html (docs/lab.md)."""

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from madlens.cli.options import Device, Model, Seed, output_dir
from madlens.cli.runs import align, record_run
from madlens.models.registry import DEFAULT_MODEL


def lab(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="an experiment, or 'list' to list them")
    ],
    out: Annotated[
        Path | None, typer.Option(help="output directory (default runs/lab/NAME)")
    ] = None,
    quick: Annotated[bool, typer.Option(help="the small budget (<= 10 min on 2 CPU cores)")] = (
        False
    ),
    seed: Seed = 0,
    model: Model = DEFAULT_MODEL,
    device: Device = "auto",
) -> None:
    """Run a lab experiment (a paper's finding re-run on MODEL) and write lab.json and
    lab.html; 'madlens lab list' names the experiments."""
    from madlens.lab.runner import experiments, get_experiment, run_lab

    if name == "list":
        found = experiments()
        if not found:
            typer.echo("no experiments registered")
            return
        table = [["name", "description", "re-runs"]] + [
            [e.name, e.description, e.reference or "-"] for _, e in sorted(found.items())
        ]
        for line in align(table):
            typer.echo(line)
        return
    get_experiment(name)  # an unknown name fails before any work
    out = output_dir(out if out is not None else Path("runs/lab") / name)
    start = time.perf_counter()
    result, doc = run_lab(name, out, quick=quick, seed=seed, progress=True, device=device,
                          model=model)  # fmt: skip
    if result.verdict:
        typer.echo(result.verdict)
    typer.echo(f"\nreport: {out / 'lab.html'}  results: {out / 'lab.json'}  "
               f"({result.seconds:.0f} s)")  # fmt: skip
    record_run(f"lab {name}", lab_rows(doc), start=start, model=model)


def lab_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A lab run as one registry row: the experiment and its scalar top-level figures."""
    row: dict[str, Any] = {"task": doc["experiment"], "detector": "lab", "hook": "n/a"}
    for key, value in doc["figures"].items():
        if value is None or isinstance(value, (bool, int, float, str)):
            row.setdefault(key, value)
    return [row]
