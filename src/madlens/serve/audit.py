"""The audit log of `madlens serve`: one SQLite row per request, committed before the
response leaves, readable while the server runs (`madlens audit list | show | export`).

A row holds who asked (`key_id`, an API key's id, never the key), what was asked (the
SHA-256 of the canonical conversation JSON, and the conversation itself only when the server
runs with `--log-text`), what the monitor said (`scores`, `p_value`, `flagged`), what the
policy did (`policy`, `blocked`) and how it went (`latency_ms`, `status`).

The file is marked as ours twice: `PRAGMA application_id` (a madlens constant) and `PRAGMA
user_version` (the schema version). Any other file, SQLite or not, is refused with one line
and never modified.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from madlens.data.jsonl import write_jsonl
from madlens.errors import MadlensError

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4D41444C  # "MADL": marks the file as a madlens audit log
TABLE = "audit"
BUSY_TIMEOUT_S = 10.0

# (key, allowed Python types, SQL column type); a record comes back with exactly these keys.
FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("id", (str,), "TEXT PRIMARY KEY NOT NULL"),
    ("time", (float,), "REAL NOT NULL"),
    ("endpoint", (str,), "TEXT NOT NULL"),
    ("key_id", (str, type(None)), "TEXT"),
    ("conversation_sha256", (str,), "TEXT NOT NULL"),
    ("text", (str, type(None)), "TEXT"),
    ("scores", (dict,), "TEXT NOT NULL"),  # JSON text
    ("p_value", (float, type(None)), "REAL"),
    ("flagged", (bool, type(None)), "INTEGER"),
    ("policy", (str,), "TEXT NOT NULL"),
    ("blocked", (bool,), "INTEGER NOT NULL"),
    ("latency_ms", (float,), "REAL NOT NULL"),
    ("status", (int,), "INTEGER NOT NULL"),
)
KEYS = tuple(name for name, _, _ in FIELDS)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COLUMNS = ", ".join(KEYS)


def conversation_hash(messages: list[dict[str, Any]]) -> str:
    """The SHA-256 (hex) of a conversation's canonical JSON: keys sorted, no spaces, UTF-8
    (not ASCII-escaped), so the same conversation always hashes the same."""
    try:
        canonical = json.dumps(
            messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"conversation is not JSON-serialisable text: {exc}") from exc
    return hashlib.sha256(canonical).hexdigest()


def validate_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A checked copy of one audit entry (ints accepted where floats are wanted). A bad
    entry is a bug in the server, not bad user input, so it raises ValueError."""
    if not isinstance(entry, dict):
        raise ValueError(f"audit entry must be a dict, not {type(entry).__name__}")
    missing = [k for k in KEYS if k not in entry]
    extra = sorted(str(k) for k in entry if k not in KEYS)
    if missing or extra:
        raise ValueError(f"audit entry: missing keys {missing}, unknown keys {extra}")
    clean: dict[str, Any] = {}
    for key, types, _ in FIELDS:
        value = entry[key]
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is an int: only a field that allows bool takes one
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " | ".join("None" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"audit entry '{key}': expected {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"audit entry '{key}': not a finite number ({value})")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"audit entry '{key}': not UTF-8 text ({exc.reason})") from exc
        clean[key] = value
    if not clean["id"]:
        raise ValueError("audit entry 'id': empty")
    if not _SHA256.fullmatch(clean["conversation_sha256"]):
        raise ValueError("audit entry 'conversation_sha256': not 64 lowercase hex digits")
    if clean["p_value"] is not None and not 0.0 <= clean["p_value"] <= 1.0:
        raise ValueError(f"audit entry 'p_value': {clean['p_value']} is not in [0, 1]")
    if clean["latency_ms"] < 0:
        raise ValueError(f"audit entry 'latency_ms': negative ({clean['latency_ms']})")
    if not 100 <= clean["status"] <= 599:
        raise ValueError(f"audit entry 'status': {clean['status']} is no HTTP status")
    if not all(isinstance(k, str) for k in clean["scores"]):
        raise ValueError("audit entry 'scores': keys must be strings")
    try:
        clean["scores"] = json.dumps(clean["scores"], ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit entry 'scores': not JSON-serialisable ({exc})") from exc
    return clean


def _row_to_record(row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip(KEYS, row))
    record["scores"] = json.loads(record["scores"])
    record["flagged"] = None if record["flagged"] is None else bool(record["flagged"])
    record["blocked"] = bool(record["blocked"])
    return record


def _check_since(since: float | None) -> float | None:
    if since is None:
        return None
    if isinstance(since, bool) or not isinstance(since, int | float) or math.isnan(since):
        raise ValueError(f"since must be unix seconds, not {since!r}")
    return float(since)


class AuditLog:
    """The audit database at `path`: opened, or created when it does not exist (or is an
    empty file). `readonly=True` (the `madlens audit` commands) never creates or changes the
    database file: a missing file is an error.

    Thread-safe: one connection shared under a lock, so the engine's worker thread and the
    request threads may all call `record`.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly and not self.path.is_file():
            what = "is not a file" if self.path.exists() else "no such file"
            raise MadlensError(f"{self.path}: {what} (the audit log madlens serve writes)")
        if not readonly and self.path.is_dir():
            raise MadlensError(f"{self.path}: is a directory, not an audit log")
        try:
            if readonly:
                # mode=ro: a read never creates or writes the database file. A WAL database
                # still needs its -shm index, which SQLite creates next to it when missing.
                target = self.path.absolute().as_uri() + "?mode=ro"
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                target = str(self.path)
            # isolation_level=None: autocommit, so each INSERT is its own committed
            # transaction by the time execute() returns.
            self._conn = sqlite3.connect(
                target,
                uri=readonly,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except (sqlite3.Error, OSError) as exc:
            raise MadlensError(f"{self.path}: cannot open ({exc})") from exc
        try:
            self._open()
        except sqlite3.Error as exc:
            self._conn.close()
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise MadlensError(f"{self.path}: not a SQLite database") from exc
            raise MadlensError(f"{self.path}: cannot open ({exc})") from exc
        except BaseException:
            self._conn.close()
            raise

    # --- opening ---------------------------------------------------------------------------

    def _state(self) -> str:
        """What the file holds: "new" (an empty database) or "ours"; anything else (another
        application's database, a newer schema) raises."""
        app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            name
            for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if app_id == 0 and version == 0 and not tables:
            return "new"
        if app_id != APPLICATION_ID or TABLE not in tables or version < 1:
            raise MadlensError(f"{self.path}: a SQLite database, but not a madlens audit log")
        if version > SCHEMA_VERSION:
            raise MadlensError(
                f"{self.path}: audit log schema {version} is newer than this madlens reads "
                f"({SCHEMA_VERSION}); upgrade madlens"
            )
        return "ours"

    def _open(self) -> None:
        state = self._state()  # read before any write: never touch someone else's file
        if self.readonly:
            if state == "new":
                raise MadlensError(f"{self.path}: an empty database, not a madlens audit log")
            return
        # WAL: readers (`madlens audit ...`) never block the server, and a commit is one
        # append to the -wal file. synchronous=NORMAL: a commit is written to the OS (so it
        # survives a SIGKILL or crash of the server; the database always opens cleanly) but
        # fsync'd only at checkpoints, so a power loss or kernel crash may lose the last
        # commits, never corrupt the file. FULL would fsync on every request, inside the
        # request's latency and under the write lock; the requirement is process death, which
        # NORMAL meets.
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise MadlensError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        if state == "new":
            columns = ", ".join(f"{name} {sql}" for name, _, sql in FIELDS)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if self._state() == "new":  # another process may have created it meanwhile
                    self._conn.execute(f"CREATE TABLE {TABLE} ({columns})")
                    self._conn.execute(f"CREATE INDEX {TABLE}_time ON {TABLE} (time)")
                    self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # --- writing ---------------------------------------------------------------------------

    def record(self, entry: dict[str, Any]) -> None:
        """Insert one entry (keys: `KEYS`) and commit it before returning. A malformed entry
        or a repeated id raises ValueError."""
        if self.readonly:
            raise ValueError(f"{self.path}: opened read-only")
        clean = validate_entry(entry)
        placeholders = ", ".join("?" for _ in KEYS)
        with self._lock:
            try:
                self._conn.execute(
                    f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES ({placeholders})",
                    [clean[k] for k in KEYS],
                )
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"audit entry 'id': {clean['id']!r} already recorded") from exc

    # --- reading ---------------------------------------------------------------------------

    def list(self, limit: int = 20, since: float | None = None) -> list[dict[str, Any]]:
        """The newest `limit` records (at or after `since`, unix seconds), newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative int, not {limit!r}")
        since = _check_since(since)
        where, args = ("", []) if since is None else ("WHERE time >= ?", [since])
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM {TABLE} {where} ORDER BY time DESC, rowid DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
        return [_row_to_record(row) for row in rows]

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The record of one request id, or None."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ?", [request_id]
            ).fetchone()
        return None if row is None else _row_to_record(row)

    def _oldest_first(self, since: float | None) -> Iterator[dict[str, Any]]:
        where, args = ("", []) if since is None else ("WHERE time >= ?", [since])
        cursor = self._conn.execute(
            f"SELECT {_COLUMNS} FROM {TABLE} {where} ORDER BY time, rowid", args
        )
        for row in cursor:  # one statement: one consistent snapshot, streamed
            yield _row_to_record(row)

    def export(self, out: str | Path, since: float | None = None) -> int:
        """Write the records at or after `since` to JSONL file `out`, oldest first, one
        object per line; returns how many. Written to a temporary sibling and renamed into
        place, so `out` is either the old file or the whole new one."""
        since = _check_since(since)
        out = Path(out)
        if out.is_dir():
            raise MadlensError(f"output file {out} is a directory")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        count = 0

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal count
            for record in self._oldest_first(since):
                count += 1
                yield record

        try:
            with self._lock:
                write_jsonl(tmp, counted())
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise MadlensError(f"cannot write {out} ({exc.strerror or exc})") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return count

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (a writer checkpoints the WAL into the database file)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
