"""`madlens truth sweep`: CCS and its baselines by layer on the truth datasets, with
transfer between datasets."""

import time
from typing import Annotated

import typer

from madlens.cli.options import Device, Dtype, Hooks, Model, OutDir, Seed, names, output_dir
from madlens.cli.runs import record_run, truth_rows
from madlens.models.registry import DEFAULT_MODEL

app = typer.Typer(
    help="Latent-knowledge (truth) probes: CCS and its baselines.", no_args_is_help=True
)


@app.command("sweep")
def sweep(
    out: OutDir,
    datasets: Annotated[
        str,
        typer.Option(
            help="comma-separated: cities, neg_cities, larger_than, smaller_than, capitals"
        ),  # fmt: skip
    ] = "cities,neg_cities,larger_than,smaller_than,capitals",
    model: Model = DEFAULT_MODEL,
    hooks: Hooks = None,
    n: Annotated[int, typer.Option(min=4, help="statements per dataset (balanced subset)")] = 400,
    transfer_hook: Annotated[
        str | None, typer.Option(help="hook for the transfer matrix (default: middle one)")
    ] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    seed: Seed = 0,
) -> None:
    """Accuracy by layer of CCS, CRC-TPC, a random direction, a logistic ceiling and the
    zero-shot answer on truth datasets, with transfer between datasets. Without --hooks:
    6 resid_post layers across depth."""
    from madlens.models import load_model, parse_hooks
    from madlens.truth import format_sweep, truth_sweep
    from madlens.truth.report import write_truth_outputs
    from madlens.truth.sweep import check_datasets, check_transfer_hook

    start = time.perf_counter()
    output_dir(out)
    dataset_list = check_datasets(names(datasets, "datasets"))
    hook_list = names(hooks, "hooks")
    transfer_list = names(transfer_hook, "transfer-hook")
    lm = load_model(model, dtype=dtype, device=device)
    hook_list = parse_hooks(",".join(hook_list), lm.n_layers) if hook_list else None
    transfer = check_transfer_hook(lm, transfer_list, hook_list)
    doc = truth_sweep(lm, dataset_list, hook_list, n, seed, transfer)
    paths = write_truth_outputs(doc, out)
    typer.echo(format_sweep(doc))
    typer.echo(f"\nwrote {paths['json']} and {paths['html']} in "
               f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    record_run("truth sweep", truth_rows(doc), start=start, model=model, fingerprint=lm.fingerprint)
