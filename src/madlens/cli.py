"""The `madlens` command: parses arguments, calls one library function, prints the result.

Bad input (a `MadlensError`) is printed as one line on stderr with exit code 2.
"""

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from madlens.circuits.cli import circuits_app
from madlens.errors import MadlensError, check_output
from madlens.sae.cli import explain as sae_explain
from madlens.sae.cli import sae_app
from madlens.truth.cli import truth_app

app = typer.Typer(
    help="madlens: catch a language model acting on the wrong mechanism.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List and fetch models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(circuits_app, name="circuits")
app.add_typer(sae_app, name="sae")
app.command("explain")(sae_explain)
app.add_typer(truth_app, name="truth")

DTYPE_HELP = "float32 or bfloat16 (about 3x faster on CPU)"


@models_app.command("list")
def models_list() -> None:
    """List the registered models and whether each is ready to load."""
    from madlens.models import KNOWN_MODELS, smollm2

    for name, info in KNOWN_MODELS.items():
        if name == "smollm2-135m-instruct":
            state = "converted" if smollm2.is_converted() else "not converted (madlens models pull)"
        else:
            state = "built in-process"
        typer.echo(f"{name:<24} {info.description}")
        typer.echo(f"{'':<24} source: {info.source}; {state}")
    typer.echo("Any Hugging Face id (org/name) or local model dir also works as --model.")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="registered model name")] = "smollm2-135m-instruct",
    force: Annotated[bool, typer.Option(help="convert again even if cached")] = False,
) -> None:
    """Convert the embedded model's GGUF into a cached safetensors dir (once)."""
    from madlens.models import KNOWN_MODELS, known_model_names, smollm2

    if name not in KNOWN_MODELS:
        raise MadlensError(
            f"unknown model '{name}'; known models: {', '.join(known_model_names())}"
        )
    if name != "smollm2-135m-instruct":
        typer.echo(f"{name} is built in-process; nothing to pull")
        return
    start = time.perf_counter()
    path = smollm2.convert(force=force)
    typer.echo(f"{name} ready at {path} ({time.perf_counter() - start:.1f} s)")


@app.command()
def extract(
    data: Annotated[Path, typer.Option(help="JSONL file: one {'text'} or {'messages'} per line")],
    out: Annotated[Path, typer.Option(help="output directory")],
    model: Annotated[str, typer.Option(help="model name, HF id or local dir")] = (
        "smollm2-135m-instruct"
    ),
    hooks: Annotated[
        str, typer.Option(help="comma-separated hook names; integers mean resid_post layers")
    ] = "-1",
    positions: Annotated[str, typer.Option(help="comma-separated: last, all, response, mean")] = (
        "last"
    ),
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "float32",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    padding_side: Annotated[str, typer.Option(help="right or left")] = "right",
    logits: Annotated[bool, typer.Option(help="also save final-token logits")] = False,
    logprobs: Annotated[bool, typer.Option(help="also save per-token log-probs")] = False,
    max_length: Annotated[int | None, typer.Option(help="context limit in tokens")] = None,
    strict: Annotated[bool, typer.Option(help="fail on inputs longer than the context")] = False,
    cache: Annotated[bool, typer.Option(help="use the on-disk activation cache")] = True,
) -> None:
    """Capture activations of a JSONL dataset at hook points; writes one safetensors file
    per position and hook (`acts`, `lengths`) and a manifest.json."""
    from safetensors.numpy import save_file

    from madlens.activations import extract as run_extract
    from madlens.activations.positions import check_position
    from madlens.activations.store import LOGPROBS, chunk_to_tensors
    from madlens.data import read_inputs
    from madlens.models import load_model, parse_hooks

    position_list = [check_position(p.strip()) for p in positions.split(",") if p.strip()]
    inputs = read_inputs(data)
    lm = load_model(model, dtype=dtype)
    hook_list = lm.check_hooks(parse_hooks(hooks, lm.n_layers))
    manifest = {"model": lm.name, "dtype": dtype, "n_inputs": len(inputs), "files": []}
    for position in position_list:
        acts = run_extract(
            lm, inputs, hook_list, position, batch_size=batch_size, padding_side=padding_side,
            logits=logits, logprobs=logprobs, max_length=max_length, strict=strict, cache=cache,
        )  # fmt: skip
        folder = out / position
        folder.mkdir(parents=True, exist_ok=True)
        for hook in hook_list:
            save_file(
                {"acts": acts[hook], "lengths": acts.lengths}, str(folder / f"{hook}.safetensors")
            )
            manifest["files"].append(
                {
                    "position": position,
                    "hook": hook,
                    "path": f"{position}/{hook}.safetensors",
                    "shape": list(acts[hook].shape),
                }  # fmt: skip
            )
        if logits or logprobs:
            outputs = {}
            if logits:
                outputs["logits"] = acts.logits
            if logprobs:
                packed = chunk_to_tensors(acts, LOGPROBS)
                outputs["token_logprobs"] = packed["values"]
                outputs["token_logprobs_lengths"] = packed["lengths"]
            save_file(outputs, str(folder / "outputs.safetensors"))
        typer.echo(
            f"{position}: {len(hook_list)} hook(s), {int(acts.lengths.sum())} rows -> {folder}"
        )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


@app.command()
def bench(
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names (default all)")] = (
        None
    ),
    detectors: Annotated[str | None, typer.Option(help="comma-separated detector names")] = None,
    hooks: Annotated[
        str | None,
        typer.Option(
            help="comma-separated hooks; integers mean resid_post layers "
            "(default: 5 layers across depth)"
        ),  # fmt: skip
    ] = None,
    model: Annotated[str, typer.Option(help="model name, HF id or local dir")] = (
        "smollm2-135m-instruct"
    ),
    task_file: Annotated[Path | None, typer.Option(help="custom task JSONL")] = None,
    quick: Annotated[bool, typer.Option(help="shrink data and fine-tune budgets")] = False,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/bench"),
    seed: Annotated[int, typer.Option()] = 0,
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "bfloat16",
) -> None:
    """Build the tasks, run every detector on them, write results.json and report.html."""
    from madlens.bench import format_table, run_bench

    check_output(out, directory=True)
    start = time.perf_counter()
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if task_file is not None and task_list is None:
        task_list = []
    detector_list = [d.strip() for d in detectors.split(",") if d.strip()] if detectors else None
    hook_list = [h.strip() for h in hooks.split(",") if h.strip()] if hooks else None
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


def _show_warning(message: object, category: type, *args: object, **kwargs: object) -> None:
    typer.echo(f"warning: {message}", err=True)


def main() -> None:
    """Entry point: run the app, turning bad input into one line and exit code 2."""
    warnings.showwarning = _show_warning
    try:
        app()
    except MadlensError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
