"""`madlens tasks list`: the built-in anomaly-detection tasks and the papers they follow."""

import typer

app = typer.Typer(help="The anomaly-detection tasks.", no_args_is_help=True)


@app.command("list")
def tasks_list() -> None:
    """List the built-in tasks: name, description, whether it fine-tunes a LoRA adapter,
    and the paper it follows."""
    from madlens.tasks import TASKS

    typer.echo(f"{'task':<22} {'model':<16} description")
    for name, spec in TASKS.items():
        model = "LoRA fine-tune" if spec.needs_finetune else "base model"
        typer.echo(f"{name:<22} {model:<16} {spec.description}")
        if spec.reference:
            typer.echo(f"{'':<22} {'':<16} follows: {spec.reference}")
    typer.echo("A custom JSONL task runs with: madlens bench --task-file FILE")
