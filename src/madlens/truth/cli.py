"""`madlens truth ...`: the typer sub-app for truth probes. Thin: parses options, calls one
library function, prints a summary; heavy imports stay inside the commands."""

from pathlib import Path
from typing import Annotated

import typer

from madlens.errors import check_output

truth_app = typer.Typer(
    help="Latent-knowledge (truth) probes: CCS and its baselines.", no_args_is_help=True
)


@truth_app.command("sweep")
def sweep(
    out: Annotated[Path, typer.Option(help="output directory (truth.json, truth.html)")],
    datasets: Annotated[
        str,
        typer.Option(
            help="comma-separated: cities, neg_cities, larger_than, smaller_than, capitals"
        ),  # fmt: skip
    ] = "cities,neg_cities,larger_than,smaller_than,capitals",
    model: Annotated[str, typer.Option(help="model name, HF id or local dir")] = (
        "smollm2-135m-instruct"
    ),
    hooks: Annotated[
        str | None,
        typer.Option(
            help="comma-separated hooks; integers mean resid_post layers "
            "(default: 6 layers across depth)"
        ),  # fmt: skip
    ] = None,
    n: Annotated[int, typer.Option(min=4, help="statements per dataset (balanced subset)")] = 400,
    transfer_hook: Annotated[
        str | None, typer.Option(help="hook for the transfer matrix (default: middle one)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 (fast on CPU) or float32")] = "bfloat16",
    seed: Annotated[int, typer.Option(help="seed of subsets, splits and probe starts")] = 0,
) -> None:
    """Accuracy by layer of CCS, CRC-TPC, a random direction, a logistic ceiling and the
    zero-shot answer on truth datasets, with transfer between datasets."""
    import time

    from madlens.models import load_model, parse_hooks
    from madlens.truth import format_sweep, truth_sweep
    from madlens.truth.report import write_truth_outputs
    from madlens.truth.sweep import check_datasets

    start = time.perf_counter()
    check_output(out, directory=True)
    names = check_datasets([d.strip() for d in datasets.split(",") if d.strip()])
    lm = load_model(model, dtype=dtype)
    hook_list = parse_hooks(hooks, lm.n_layers) if hooks else None
    transfer = parse_hooks(transfer_hook, lm.n_layers)[0] if transfer_hook else None
    doc = truth_sweep(lm, names, hook_list, n, seed, transfer)
    paths = write_truth_outputs(doc, out)
    typer.echo(format_sweep(doc))
    typer.echo(f"\nwrote {paths['json']} and {paths['html']} in "
               f"{time.perf_counter() - start:.0f} s")  # fmt: skip
