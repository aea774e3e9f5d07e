"""The `madlens` command: one typer app, one module per command group. Commands are thin:
they parse, call one library function and print.

Bad input (a `MadlensError`, or an option typer rejects) is one line on stderr, exit code 2.
"""

import sys
import warnings

import typer

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from madlens.cli import (
    audit,
    bench,
    cache,
    circuits,
    detectors,
    extract,
    lab,
    models,
    monitor,
    runs,
    sae,
    serve,
    tasks,
    truth,
)
from madlens.errors import MadlensError

app = typer.Typer(
    help="madlens: catch a language model acting on the wrong mechanism.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("explain")(sae.explain)
app.command("extract")(extract.extract)
app.command("bench")(bench.bench)
app.command("serve")(serve.serve)
app.command("lab")(lab.lab)
app.add_typer(models.app, name="models")
app.add_typer(circuits.app, name="circuits")
app.add_typer(sae.app, name="sae")
app.add_typer(truth.app, name="truth")
app.add_typer(detectors.app, name="detectors")
app.add_typer(tasks.app, name="tasks")
app.add_typer(cache.app, name="cache")
app.add_typer(audit.app, name="audit")
app.add_typer(monitor.app, name="monitor")
app.add_typer(runs.app, name="runs")


def _show_warning(message: object, category: type, *args: object, **kwargs: object) -> None:
    typer.echo(f"warning: {_one_line(str(message))}", err=True)


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "(no message)"


def _fail(message: str) -> None:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(2)


def main(args: list[str] | None = None) -> None:
    """Entry point: run the app (on `args`, default the command line), turning bad input
    into one line on stderr and exit code 2."""
    warnings.showwarning = _show_warning
    try:
        code = app(args=args, prog_name="madlens", standalone_mode=False)
    except MadlensError as exc:
        _fail(str(exc))
    except NoArgsIsHelpError:
        sys.exit(2)  # the help is already printed
    except UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(exc.format_message() + where)
    except ClickException as exc:
        _fail(exc.format_message())
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
