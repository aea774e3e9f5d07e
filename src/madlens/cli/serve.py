"""`madlens serve`: a saved monitor behind an OpenAI-compatible HTTP API."""

from pathlib import Path
from typing import Annotated

import typer

from madlens.cli.options import Device


def serve(
    monitor: Annotated[Path, typer.Option(help="a folder written by 'madlens monitor fit'")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    policy: Annotated[
        str, typer.Option(help="flag: answer and flag; block: refuse flagged prompts")
    ] = "flag",
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="bearer API keys, one 'key' or 'id:key' per line (default: no auth)"),
    ] = None,
    audit_db: Annotated[
        Path | None, typer.Option(help="SQLite audit log (default: MONITOR/audit.db)")
    ] = None,
    log_text: Annotated[
        bool, typer.Option(help="also store each conversation's text in the audit log")
    ] = False,
    max_batch: Annotated[
        int, typer.Option(min=1, max=256, help="requests per prefill forward pass")
    ] = 8,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0, max=1000, help="how long to wait to fill a batch (ms)")
    ] = 5.0,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, max=64 << 20, help="largest request body (413 above)")
    ] = 1_000_000,
    max_messages: Annotated[
        int, typer.Option(min=1, max=100_000, help="most messages in one request")
    ] = 256,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="answer length when a request names none")
    ] = 512,
    no_monitor: Annotated[
        bool,
        typer.Option(
            "--no-monitor",
            hidden=True,
            help="benchmark baseline: serve the model without scoring anything",
        ),
    ] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug")
    ] = "info",
    device: Device = "auto",
) -> None:
    """Serve a saved monitor's model behind an OpenAI-compatible API
    (POST /v1/chat/completions, POST /v1/monitor/score, GET /v1/models, /healthz, /metrics):
    every prompt is scored in its prefill pass, audited in SQLite, and flagged or blocked."""
    from madlens.errors import MadlensError
    from madlens.serve.server import serve as run

    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise MadlensError("--log-level must be critical, error, warning, info or debug")
    run(
        monitor, host=host, port=port, api_key_file=api_key_file, audit_db=audit_db,
        policy=policy, log_text=log_text, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
        max_body_bytes=max_body_bytes, max_messages=max_messages,
        default_max_tokens=max_tokens, scoring=not no_monitor, log_level=log_level,
        device=device,
    )  # fmt: skip
