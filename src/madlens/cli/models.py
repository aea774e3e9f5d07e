"""`madlens models list|pull`: the registered models and the embedded model's conversion."""

import time
from typing import Annotated

import typer

from madlens.errors import MadlensError
from madlens.models.registry import DEFAULT_MODEL, KNOWN_MODELS, known_model_names

app = typer.Typer(help="List and fetch models.", no_args_is_help=True)


@app.command("list")
def models_list() -> None:
    """List the registered models and whether each is ready to load."""
    from madlens.models import smollm2

    for name, info in KNOWN_MODELS.items():
        if name == DEFAULT_MODEL:
            state = "converted" if smollm2.is_converted() else "not converted (madlens models pull)"
        else:
            state = "built in-process"
        typer.echo(f"{name:<24} {info.description}")
        typer.echo(f"{'':<24} source: {info.source}; {state}")
    typer.echo("Any Hugging Face id (org/name) or local model dir also works as --model.")


@app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="registered model name")] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="convert again even if cached")] = False,
) -> None:
    """Convert the embedded model's GGUF into a cached safetensors dir (once)."""
    from madlens.models import smollm2

    if name not in KNOWN_MODELS:
        raise MadlensError(
            f"unknown model '{name}'; known models: {', '.join(known_model_names())}"
        )
    if name != DEFAULT_MODEL:
        typer.echo(f"{name} is built in-process; nothing to pull")
        return
    start = time.perf_counter()
    path = smollm2.convert(force=force)
    typer.echo(f"{name} ready at {path} ({time.perf_counter() - start:.1f} s)")
