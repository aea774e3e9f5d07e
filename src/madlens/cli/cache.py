"""`madlens cache list | size | clear`: see and free what madlens keeps under MADLENS_HOME."""

from collections import defaultdict
from datetime import datetime
from typing import Annotated

import typer

from madlens import cache
from madlens.errors import MadlensError

app = typer.Typer(help="See and free the cache (MADLENS_HOME).", no_args_is_help=True)

Kind = Annotated[
    str | None, typer.Option(help="only this kind (activations, adapters, models, ...)")
]


def human(size: float) -> str:
    """A byte count as `12.3 MB`."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _check_kind(kind: str | None) -> None:
    if kind is None:
        return
    known = sorted({e.kind for e in cache.entries()})
    if kind not in known:
        listed = ", ".join(known) if known else "the cache is empty"
        raise MadlensError(f"no cache kind '{kind}' under {cache.home()} ({listed})")


@app.command("list")
def list_entries(kind: Kind = None) -> None:
    """Every cached item, largest first: kind, size, last use, path."""
    _check_kind(kind)
    found = cache.entries(kind)
    for entry in found:
        used = datetime.fromtimestamp(entry.modified).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{entry.kind:<14}{human(entry.size):>10}  {used}  {entry.path}")
    typer.echo(f"{len(found)} item(s), {human(sum(e.size for e in found))} in {cache.home()}")


@app.command("size")
def size(kind: Kind = None) -> None:
    """The size of the cache, by kind."""
    _check_kind(kind)
    totals: dict[str, int] = defaultdict(int)
    for entry in cache.entries(kind):
        totals[entry.kind] += entry.size
    for name, total in sorted(totals.items(), key=lambda item: -item[1]):
        typer.echo(f"{name:<14}{human(total):>10}")
    typer.echo(f"{'total':<14}{human(sum(totals.values())):>10}  {cache.home()}")


@app.command("clear")
def clear(
    older_than: Annotated[
        float | None, typer.Option(min=0, help="only items not used for this many days")
    ] = None,
    kind: Kind = None,
) -> None:
    """Delete cached items (all, or those not used for --older-than DAYS)."""
    _check_kind(kind)
    removed = cache.clear(older_than_days=older_than, kind=kind)
    typer.echo(f"removed {len(removed)} item(s), {human(sum(e.size for e in removed))}")
