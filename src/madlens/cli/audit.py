"""`madlens audit list | show ID | export`: read the server's SQLite audit log.

Every command opens the database read-only: it never creates, migrates or changes it, and
works while `madlens serve` is writing to it.
"""

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from madlens.cli.options import output_file
from madlens.errors import MadlensError
from madlens.serve.audit import AuditLog

app = typer.Typer(help="Read the audit log of madlens serve.", no_args_is_help=True)

Db = Annotated[
    Path,
    typer.Option(
        help="the audit database (madlens serve writes MONITOR_DIR/audit.db by default)",
        show_default=False,
    ),
]
SINCE_HELP = "only requests at or after this time: ISO-8601 date or date-time (UTC unless it "
SINCE_HELP += "carries an offset) or unix seconds"


def parse_since(value: str | None) -> float | None:
    """`--since` as unix seconds: an ISO-8601 date / date-time (naive means UTC) or a number
    of unix seconds."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise MadlensError(f"--since '{value}': not a finite number of unix seconds")
        return seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise MadlensError(
            f"--since '{value}': not an ISO-8601 date / date-time (2025-01-31, "
            "2025-01-31T12:00:00Z) or unix seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def iso(seconds: float) -> str:
    """Unix seconds as an ISO-8601 UTC time to the second: `2025-01-31T12:00:00Z`."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cells(record: dict[str, Any]) -> list[str]:
    flagged = {None: "-", True: "yes", False: "no"}[record["flagged"]]
    p_value = "-" if record["p_value"] is None else f"{record['p_value']:.4g}"
    return [
        iso(record["time"]),
        record["id"],
        record["endpoint"],
        record["key_id"] or "-",
        flagged,
        p_value,
        f"{record['latency_ms']:.1f}",
        str(record["status"]),
    ]


def table(records: list[dict[str, Any]]) -> list[str]:
    """The records as aligned text lines under a header."""
    header = ["time (UTC)", "id", "endpoint", "key", "flagged", "p", "ms", "status"]
    rows = [header, *(_cells(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {5, 6, 7}  # numbers
    return [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


@app.command("list")
def list_records(
    db: Db,
    limit: Annotated[int, typer.Option(min=1, help="at most this many records")] = 20,
    since: Annotated[str | None, typer.Option(help=SINCE_HELP)] = None,
) -> None:
    """The newest requests first: time, id, endpoint, key, flagged, p-value, latency."""
    after = parse_since(since)
    with AuditLog(db, readonly=True) as log:
        records = log.list(limit=limit, since=after)
    if not records:
        typer.echo(f"no records in {db}" + ("" if since is None else f" since {since}"))
        return
    for line in table(records):
        typer.echo(line)


@app.command("show")
def show(
    request_id: Annotated[str, typer.Argument(metavar="ID", help="the request id")],
    db: Db,
) -> None:
    """One request's record, as indented JSON."""
    with AuditLog(db, readonly=True) as log:
        record = log.get(request_id)
    if record is None:
        raise MadlensError(f"no request '{request_id}' in {db}")
    typer.echo(json.dumps(record, indent=2, ensure_ascii=False))


@app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="the JSONL file to write", show_default=False)],
    db: Db,
    since: Annotated[str | None, typer.Option(help=SINCE_HELP + " (default: all)")] = None,
) -> None:
    """Write the records to a JSONL file, oldest first, one object per line."""
    after = parse_since(since)
    output_file(out)
    with AuditLog(db, readonly=True) as log:
        count = log.export(out, since=after)
    typer.echo(f"wrote {count} record(s) to {out}")
