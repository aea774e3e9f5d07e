"""`madlens serve`: check everything, then run the app under uvicorn.

Every check happens before uvicorn starts, each failing as one `MadlensError` line: the
monitor dir loads, its model's weights match the fingerprint it was fitted on, it is
calibrated, the key file reads, the audit database opens, the address can be bound.
SIGTERM (and Ctrl-C) stop the server gracefully: it takes no new connections, lets the
requests in flight finish, then the engine drains and the audit log closes.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from madlens.errors import MadlensError
from madlens.serve.app import ServeOptions, check_options, create_app
from madlens.serve.auth import load_keys


def prepare(
    monitor_dir: str | Path,
    *,
    api_key_file: str | Path | None = None,
    audit_db: str | Path | None = None,
    device: str = "auto",
    **options: Any,
) -> tuple[Any, ServeOptions]:
    """Load the monitor and check the options: `(monitor, ServeOptions)`, or one
    `MadlensError` line."""
    from madlens.monitor import Monitor

    keys = None if api_key_file is None else load_keys(api_key_file)
    monitor_dir = Path(monitor_dir)
    audit_path = Path(audit_db) if audit_db is not None else monitor_dir / "audit.db"
    opts = ServeOptions(keys=keys, audit_db=audit_path, **options)
    monitor = Monitor.load(monitor_dir, device=device, progress=False)
    with _no_progress_bars():  # a server logs lines, not bars
        monitor.model  # noqa: B018 - loads the weights and checks their fingerprint
    check_options(monitor, opts)
    from madlens.serve.audit import AuditLog

    AuditLog(audit_path).close()  # it opens (or is created) as a madlens audit log
    return monitor, opts


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_address(host: str, port: int) -> None:
    """Fail now, in one line, when `host:port` cannot be listened on."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise MadlensError(f"--port must be between 1 and 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise MadlensError(f"--host {host!r}: cannot resolve it ({exc})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise MadlensError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def serve(
    monitor_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_file: str | Path | None = None,
    audit_db: str | Path | None = None,
    log_level: str = "info",
    device: str = "auto",
    **options: Any,
) -> None:
    """Check everything, then serve until SIGTERM / Ctrl-C."""
    check_address(host, port)
    monitor, opts = prepare(monitor_dir, api_key_file=api_key_file, audit_db=audit_db,
                            device=device, **options)  # fmt: skip
    if opts.keys is None:
        warnings.warn(
            f"no --api-key-file: anyone who can reach {host}:{port} can use the API",
            stacklevel=2,
        )
    if not opts.scoring:
        warnings.warn(
            "--no-monitor: nothing is scored (a benchmark baseline, not a monitored server)",
            stacklevel=2,
        )
    app = create_app(monitor, opts)
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=None, server_header=False,
    )  # fmt: skip
    uvicorn.Server(config).run()
