"""The run registry: every bench, truth sweep, SAE training, circuit discovery and monitor fit
recorded in one DuckDB file, so that "did my change make detection better?" is one query.

The file is `$MADLENS_RUNS_DB`, or `home() / "runs.duckdb"` (`home()` is `$MADLENS_HOME` or
`~/.cache/madlens`), read when each call is made. `MADLENS_NO_RUNS=1` switches recording off.

Two tables (DuckDB types):

- `runs`: `id` (8 hex characters), `created` (UTC), `command` (`bench`, `truth sweep`, ...),
  `config` (JSON: the command's arguments), `madlens_version`, `git_revision` (`HEAD` of the
  git work tree the command ran in, or null) and `git_dirty` (tracked files changed; null when
  unknown), `model`, `fingerprint` (of the weights, or null), `wall_s`, `status`.
- `rows`: `run_id`, `idx` (the row's place in its run), `row` (JSON: the whole result row)
  and, pulled out of it for queries, the nullable columns `task`, `detector`, `hook`,
  `status`, `auroc`, `auroc_lo`, `auroc_hi`, `ap`, `fpr_at_95tpr`, `tpr_at_1fpr`, `accuracy`.

Concurrency: DuckDB lets one process at a time open a file for writing (and none read while
it does). Every writer takes an exclusive `flock` on the sibling `runs.duckdb.lock`, every
reader a shared one; opening the database itself is retried with a bounded backoff while
another program (a `duckdb` shell, say) holds DuckDB's own lock. A writer gives up after
`WRITE_TIMEOUT_S` with a `MadlensError`; it never loses a run that it reported as recorded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from madlens import cache
from madlens.errors import MadlensError
from madlens.report import FAIL, PASS, esc, fmt, page

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: the DuckDB lock retries alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DB_ENV",
    "OFF_ENV",
    "Comparison",
    "Difference",
    "Run",
    "compare",
    "enabled",
    "exists",
    "get_run",
    "git_revision",
    "list_runs",
    "record",
    "registry_path",
    "render_comparison",
]

DB_ENV = "MADLENS_RUNS_DB"  # the registry file (default: home() / runs.duckdb)
OFF_ENV = "MADLENS_NO_RUNS"  # "1" (or any value but "", "0", "false", "no"): record nothing
FILE_NAME = "runs.duckdb"
ID_LENGTH = 8  # hex characters of a run id
WRITE_TIMEOUT_S = 60.0  # how long a writer waits for the lock before giving up
READ_TIMEOUT_S = 30.0
GIT_TIMEOUT_S = 2.0
TEXT_COLUMNS = ("task", "detector", "hook", "status")
METRIC_COLUMNS = ("auroc", "auroc_lo", "auroc_hi", "ap", "fpr_at_95tpr", "tpr_at_1fpr",
                  "accuracy")  # fmt: skip
LOWER_IS_BETTER = frozenset({"fpr_at_95tpr", "aurc", "ccs_loss", "loss", "dead_fraction"})
RUN_COLUMNS = ("id", "created", "command", "config", "madlens_version", "git_revision",
               "git_dirty", "model", "fingerprint", "wall_s", "status")  # fmt: skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY,
    created TIMESTAMP NOT NULL,
    command VARCHAR NOT NULL,
    config JSON,
    madlens_version VARCHAR,
    git_revision VARCHAR,
    git_dirty BOOLEAN,
    model VARCHAR,
    fingerprint VARCHAR,
    wall_s DOUBLE,
    status VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS rows (
    run_id VARCHAR NOT NULL,
    idx INTEGER NOT NULL,
    task VARCHAR,
    detector VARCHAR,
    hook VARCHAR,
    status VARCHAR,
    auroc DOUBLE,
    auroc_lo DOUBLE,
    auroc_hi DOUBLE,
    ap DOUBLE,
    fpr_at_95tpr DOUBLE,
    tpr_at_1fpr DOUBLE,
    accuracy DOUBLE,
    "row" JSON NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""


# --- where, and whether ------------------------------------------------------------------------


def registry_path() -> Path:
    """The registry file: `$MADLENS_RUNS_DB`, or `home() / "runs.duckdb"` (read at call time)."""
    override = os.environ.get(DB_ENV)
    return Path(override).expanduser() if override else cache.home() / FILE_NAME


def enabled() -> bool:
    """Whether runs are recorded (`MADLENS_NO_RUNS` unset, empty, `0`, `false` or `no`)."""
    return os.environ.get(OFF_ENV, "").strip().lower() in ("", "0", "false", "no")


def exists(path: str | Path | None = None) -> bool:
    """Whether the registry file exists (reading never creates it)."""
    return Path(path or registry_path()).is_file()


# --- what a run is -----------------------------------------------------------------------------


@dataclass
class Run:
    """One recorded run. `rows` is filled by `get_run` (empty in `list_runs`); `n_rows` and
    `mean_auroc` (over rows that have one) are always there."""

    id: str
    created: datetime  # UTC, naive
    command: str
    config: dict[str, Any]
    madlens_version: str | None
    git_revision: str | None
    git_dirty: bool | None
    model: str | None
    fingerprint: str | None
    wall_s: float | None
    status: str
    n_rows: int = 0
    mean_auroc: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def git(self) -> str:
        """The short revision, `+dirty` when tracked files had changed, or `-`."""
        if not self.git_revision:
            return "-"
        return self.git_revision[:10] + ("+dirty" if self.git_dirty else "")


@dataclass
class Difference:
    """One (task, detector, hook) of a comparison: the metric in run a and b with their CIs,
    `diff` = b - a, whether the CIs overlap, and `mark`: "=" (they overlap), "+" / "-" (b
    clearly better / worse: the CIs are apart), "?" (no CI on one side), "" (one side has no
    value: the row is in one run only, or did not run)."""

    task: str
    detector: str
    hook: str
    a: float | None
    a_lo: float | None
    a_hi: float | None
    b: float | None
    b_lo: float | None
    b_hi: float | None
    diff: float | None
    overlap: bool | None
    mark: str


@dataclass
class Comparison:
    """Run b against run a on one metric (higher is better unless in `LOWER_IS_BETTER`)."""

    a: Run
    b: Run
    metric: str
    rows: list[Difference]
    config_changes: list[tuple[str, Any, Any]]  # (argument, value in a, value in b)

    def count(self, mark: str) -> int:
        """How many rows carry `mark`."""
        return sum(d.mark == mark for d in self.rows)

    def summary(self) -> str:
        """One line: where b is better, worse, or not distinguishable from a."""
        matched = sum(d.a is not None and d.b is not None for d in self.rows)
        only = len(self.rows) - matched
        text = (f"{self.metric}: b better on {self.count('+')}, worse on {self.count('-')}, "
                f"CIs overlap on {self.count('=')}, no CI on {self.count('?')} "
                f"(of {matched} rows in both runs)")  # fmt: skip
        return text + (f"; {only} row(s) in one run only" if only else "")


# --- plain values ------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """`value` as plain JSON: numpy scalars and arrays as numbers and lists, non-finite floats
    as null, paths and anything else as text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _plain(value.tolist())
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _interval(row: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """The CI of `metric` in a row: `METRIC_ci: [lo, hi]`, or `METRIC_lo` and `METRIC_hi`."""
    ci = row.get(f"{metric}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return _number(ci[0]), _number(ci[1])
    return _number(row.get(f"{metric}_lo")), _number(row.get(f"{metric}_hi"))


def _columns(row: dict[str, Any]) -> list[Any]:
    """The queryable columns of a result row, in SCHEMA order (after run_id and idx)."""
    lo, hi = _interval(row, "auroc")
    values = {**{k: _number(row.get(k)) for k in METRIC_COLUMNS}, "auroc_lo": lo, "auroc_hi": hi}
    return [*(_text(row.get(k)) for k in TEXT_COLUMNS), *(values[k] for k in METRIC_COLUMNS)]


# --- git -------------------------------------------------------------------------------------


def git_revision(cwd: str | Path | None = None) -> tuple[str | None, bool | None]:
    """`(HEAD, dirty)` of the git work tree `cwd` (default: the current directory) is in, or
    `(None, None)` when it is none (or git is missing or slow). `dirty`: tracked files differ
    from HEAD (None when that could not be told). Takes no lock on the repository."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=GIT_TIMEOUT_S, check=False)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None

    inside = git("rev-parse", "--is-inside-work-tree")
    if inside is None or inside.returncode or inside.stdout.strip() != "true":
        return None, None
    head = git("rev-parse", "--verify", "HEAD")
    revision = head.stdout.strip() if head is not None and not head.returncode else ""
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", revision):
        return None, None  # no commit yet
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode else bool(status.stdout.strip())
    return revision, dirty


# --- opening the file --------------------------------------------------------------------------


def _backoff(deadline: float, attempt: int) -> bool:
    """Sleep before the next attempt (10 ms doubling to 0.5 s, jittered); False when the
    deadline has passed."""
    now = time.monotonic()
    if now >= deadline:
        return False
    delay = min(0.5, 0.01 * 2**attempt) * random.uniform(0.5, 1.0)
    time.sleep(min(delay, deadline - now))
    return True


@contextmanager
def _flock(db: Path, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold an flock on `db`'s sibling lock file (exclusive for writers, shared for readers).
    A reader that cannot create the lock file (a read-only folder) goes on without it."""
    if fcntl is None:
        yield
        return
    lock = db.with_name(db.name + ".lock")
    try:
        handle = open(lock, "a+b")  # noqa: SIM115 - closed below, after unlocking
    except OSError:
        if exclusive:
            raise
        yield
        return
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline, attempt = time.monotonic() + timeout, 0
    try:
        while True:
            try:
                fcntl.flock(handle.fileno(), mode)
                break
            except BlockingIOError:
                if not _backoff(deadline, attempt):
                    raise MadlensError(
                        f"the run registry {db} stayed locked by another process for {timeout:g} s"
                    ) from None
                attempt += 1
        yield
    finally:
        handle.close()  # releases the lock


def _is_lock_conflict(exc: Exception) -> bool:
    return "lock" in str(exc).lower() and "conflicting" in str(exc).lower()


@contextmanager
def _connect(db: Path, read_only: bool, timeout: float) -> Iterator[Any]:
    """A DuckDB connection to `db`, retried with backoff while another process holds
    DuckDB's own lock on it; closed on exit."""
    import duckdb

    deadline, attempt = time.monotonic() + timeout, 0
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only)
            break
        except duckdb.Error as exc:
            if not _is_lock_conflict(exc) or not _backoff(deadline, attempt):
                raise
            attempt += 1
    try:
        yield con
    finally:
        con.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def _reading(path: str | Path | None) -> Iterator[Any]:
    """A read-only connection, or None when the registry does not exist or holds no runs
    table; a file DuckDB cannot read is a `MadlensError`."""
    import duckdb

    db = Path(path or registry_path())
    if not db.is_file():
        yield None
        return
    try:
        with _flock(db, exclusive=False, timeout=READ_TIMEOUT_S), _connect(
            db, read_only=True, timeout=READ_TIMEOUT_S
        ) as con:  # fmt: skip
            tables = {name for (name,) in con.execute(
                "SELECT table_name FROM information_schema.tables").fetchall()}  # fmt: skip
            yield con if {"runs", "rows"} <= tables else None
    except (duckdb.Error, OSError) as exc:
        raise MadlensError(f"cannot read the run registry {db}: {_one_line(exc)}") from None


# --- writing -----------------------------------------------------------------------------------


def record(
    command: str,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    model: str | None = None,
    fingerprint: str | None = None,
    wall_s: float,
    status: str = "ok",
    path: str | Path | None = None,
) -> str | None:
    """Record one finished run and its result rows; returns its id (None when recording is
    off: `MADLENS_NO_RUNS`). Safe to call from several processes at once. Raises
    `MadlensError` (one line) when the registry cannot be written."""
    import duckdb

    if not enabled():
        return None
    if not isinstance(command, str) or not command.strip():
        raise MadlensError("a run needs a command name")
    bad = next((r for r in rows if not isinstance(r, dict)), None)
    if bad is not None:
        raise MadlensError(f"a result row is a dict, not {type(bad).__name__}")
    from madlens import __version__

    plain_rows = [_plain(r) for r in rows]
    columns = [_columns(r) for r in plain_rows]
    config_json = json.dumps(_plain(config or {}), ensure_ascii=False)
    revision, dirty = git_revision()
    created = datetime.now(UTC).replace(tzinfo=None)
    db = Path(path or registry_path())
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with _flock(db, exclusive=True, timeout=WRITE_TIMEOUT_S), _connect(
            db, read_only=False, timeout=WRITE_TIMEOUT_S
        ) as con:  # fmt: skip
            con.execute(SCHEMA)
            run_id = secrets.token_hex(ID_LENGTH // 2)
            while con.execute("SELECT 1 FROM runs WHERE id = ?", [run_id]).fetchone():
                run_id = secrets.token_hex(ID_LENGTH // 2)
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES (?, ?, ?, ?::JSON, ?, "
                    "?, ?, ?, ?, ?, ?)",
                    [run_id, created, command.strip(), config_json, __version__, revision,
                     dirty, model, fingerprint, _number(wall_s), status],
                )  # fmt: skip
                if plain_rows:
                    types = ["VARCHAR"] * len(TEXT_COLUMNS) + ["DOUBLE"] * len(METRIC_COLUMNS)
                    selects = ", ".join(f"unnest(?::{t}[])" for t in types)
                    con.execute(
                        f"INSERT INTO rows SELECT ?, unnest(?::INTEGER[]), {selects}, "
                        "unnest(?::JSON[])",
                        [run_id, list(range(len(plain_rows))),
                         *(list(col) for col in zip(*columns)),
                         [json.dumps(r, ensure_ascii=False) for r in plain_rows]],
                    )  # fmt: skip
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
    except (duckdb.Error, OSError) as exc:
        raise MadlensError(f"cannot write the run registry {db}: {_one_line(exc)}") from None
    return run_id


# --- reading -----------------------------------------------------------------------------------

_SELECT_RUNS = f"""
SELECT {", ".join("r." + c for c in RUN_COLUMNS)}, coalesce(s.n_rows, 0), s.mean_auroc
FROM runs r LEFT JOIN (
    SELECT run_id, count(*) AS n_rows, avg(auroc) AS mean_auroc FROM rows GROUP BY run_id
) s ON s.run_id = r.id
"""


def _run(values: tuple[Any, ...]) -> Run:
    fields = dict(zip([*RUN_COLUMNS, "n_rows", "mean_auroc"], values))
    fields["config"] = json.loads(fields["config"]) if fields["config"] else {}
    return Run(**fields)


def list_runs(
    limit: int | None = 20, command: str | None = None, path: str | Path | None = None
) -> list[Run]:
    """The newest runs first (at most `limit`; None: all), of one command when given (`truth`
    also matches `truth sweep`). A missing registry has none (and is not created)."""
    with _reading(path) as con:
        if con is None:
            return []
        where, params = "", []
        if command is not None:
            where = " WHERE r.command = ? OR starts_with(r.command, ?)"
            params = [command.strip(), command.strip() + " "]
        sql = _SELECT_RUNS + where + " ORDER BY r.created DESC, r.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_run(values) for values in con.execute(sql, params).fetchall()]


def get_run(run_id: str, path: str | Path | None = None) -> Run:
    """The run whose id is or starts with `run_id` (as git does with commits), with its rows.
    Raises `MadlensError` when there is none, or when the prefix names several."""
    prefix = run_id.strip().lower()
    db = Path(path or registry_path())
    with _reading(db) as con:
        if con is None:
            raise MadlensError(f"no run '{run_id}': no runs recorded yet ({db})")
        found = []
        if re.fullmatch(r"[0-9a-f]{1,64}", prefix):
            found = con.execute(
                _SELECT_RUNS + " WHERE starts_with(r.id, ?) ORDER BY r.id LIMIT 6",
                [prefix],
            ).fetchall()  # fmt: skip
        if not found:
            raise MadlensError(f"no run '{run_id}' in {db} (see 'madlens runs list')")
        if len(found) > 1:
            ids = ", ".join(values[0] for values in found[:5])
            more = ", ..." if len(found) > 5 else ""
            raise MadlensError(
                f"run id '{run_id}' is ambiguous: it starts {ids}{more}; give more characters"
            )
        run = _run(found[0])
        rows = con.execute('SELECT "row" FROM rows WHERE run_id = ? ORDER BY idx', [run.id])
        run.rows = [json.loads(text) for (text,) in rows.fetchall()]
    return run


# --- comparing ---------------------------------------------------------------------------------


def _keyed(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """Rows by (task, detector, hook, occurrence): a key seen twice pairs its n-th rows."""
    out: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for row in rows:
        base = (str(row.get("task", "")), str(row.get("detector", "")), str(row.get("hook", "")))
        seen[base] = seen.get(base, -1) + 1
        out[(*base, seen[base])] = row
    return out


def _difference(key: tuple[str, str, str, int], a: dict | None, b: dict | None,
                metric: str) -> Difference:  # fmt: skip
    va = _number(a.get(metric)) if a else None
    vb = _number(b.get(metric)) if b else None
    a_lo, a_hi = _interval(a, metric) if a else (None, None)
    b_lo, b_hi = _interval(b, metric) if b else (None, None)
    diff = None if va is None or vb is None else vb - va
    overlap, mark = None, ""
    if diff is not None:
        if None in (a_lo, a_hi, b_lo, b_hi):
            mark = "?"
        else:
            overlap = a_lo <= b_hi and b_lo <= a_hi  # type: ignore[operator]
            higher = b_lo > a_hi  # type: ignore[operator]
            mark = "=" if overlap else "+" if higher != (metric in LOWER_IS_BETTER) else "-"
    return Difference(*key[:3], va, a_lo, a_hi, vb, b_lo, b_hi, diff, overlap, mark)


def _config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, a.get(k), b.get(k)) for k in [*a, *(k for k in b if k not in a)]
            if a.get(k) != b.get(k)]  # fmt: skip


def compare(a: str, b: str, metric: str = "auroc", path: str | Path | None = None) -> Comparison:
    """Run `b` against run `a` (ids or unique prefixes): rows matched on (task, detector,
    hook), with `metric` in each, its CIs, `b - a` and whether the CIs overlap. Rows where
    neither run has a value of `metric` are left out; rows of one run only are kept."""
    if not re.fullmatch(r"\w+", metric):
        raise MadlensError(f"a metric is a row field name like auroc, not '{metric}'")
    run_a, run_b = get_run(a, path), get_run(b, path)
    rows_a, rows_b = _keyed(run_a.rows), _keyed(run_b.rows)
    keys = [*rows_a, *(k for k in rows_b if k not in rows_a)]
    diffs = [_difference(k, rows_a.get(k), rows_b.get(k), metric) for k in keys]
    diffs = [d for d in diffs if d.a is not None or d.b is not None]
    return Comparison(run_a, run_b, metric, diffs, _config_changes(run_a.config, run_b.config))


# --- the comparison page -----------------------------------------------------------------------

_PAGE_CSS = """
td.plus{color:#1a7f37;font-weight:600}td.minus{color:#c62828;font-weight:600}
td.same{color:#666}code{font-size:.9em}
"""


def _ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f"[{fmt(lo)}, {fmt(hi)}]"


def _run_line(label: str, run: Run) -> str:
    created = run.created.strftime("%Y-%m-%d %H:%M:%S")
    cells = [label, run.id, f"{created} UTC", run.command, run.model or "-",
             run.fingerprint or "-", run.git, run.madlens_version or "-",
             "-" if run.wall_s is None else f"{run.wall_s:.1f} s", run.status]  # fmt: skip
    return "<tr>" + "".join(f"<td class='l'>{esc(c)}</td>" for c in cells) + "</tr>"


def render_comparison(comparison: Comparison) -> str:
    """`comparison` as one self-contained HTML page (the report toolkit's shell)."""
    c, metric = comparison, esc(comparison.metric)
    out = [f"<h1>Run {esc(c.b.id)} against {esc(c.a.id)}</h1>",
           f"<p class='muted'>{metric} in run a and run b with their 95% CIs; diff = b - a. "
           "= the CIs overlap (no clear change), + b is clearly better (the CIs are apart), "
           "- b is clearly worse, ? a CI is missing.</p>",
           "<h2>Runs</h2><table class='text' id='runs'><tr><th></th><th>id</th><th>created</th>"
           "<th>command</th><th>model</th><th>fingerprint</th><th>git</th><th>madlens</th>"
           "<th>wall</th><th>status</th></tr>", _run_line("a", c.a), _run_line("b", c.b),
           "</table>"]  # fmt: skip
    if c.config_changes:
        out.append("<h2>Arguments that differ</h2><table class='text' id='changes'><tr>"
                   "<th>argument</th><th>a</th><th>b</th></tr>")  # fmt: skip
        for name, va, vb in c.config_changes:
            out.append(f"<tr><td>{esc(name)}</td><td><code>{esc(json.dumps(va))}</code></td>"
                       f"<td><code>{esc(json.dumps(vb))}</code></td></tr>")  # fmt: skip
        out.append("</table>")
    better, worse = c.count("+"), c.count("-")
    out.append(f"<h2>{metric}</h2><p id='summary'>{esc(c.summary())}</p>")
    if better or worse:
        out.append(f"<p><span class='{PASS}'>{better} better</span> · "
                   f"<span class='{FAIL}'>{worse} worse</span></p>")  # fmt: skip
    out.append("<table id='differences'><tr><th class='l'>task</th><th class='l'>detector</th>"
               f"<th class='l'>hook</th><th>{metric} a</th><th>95% CI a</th><th>{metric} b</th>"
               "<th>95% CI b</th><th>diff</th><th></th></tr>")  # fmt: skip
    css = {"+": "plus", "-": "minus", "=": "same"}
    for d in c.rows:
        diff = "" if d.diff is None else f"{d.diff:+.3f}"
        out.append(
            f"<tr><td class='l'>{esc(d.task)}</td><td class='l'>{esc(d.detector)}</td>"
            f"<td class='l'>{esc(d.hook)}</td><td>{fmt(d.a)}</td><td>{_ci(d.a_lo, d.a_hi)}</td>"
            f"<td>{fmt(d.b)}</td><td>{_ci(d.b_lo, d.b_hi)}</td><td>{diff}</td>"
            f"<td class='{css.get(d.mark, '')}'>{esc(d.mark)}</td></tr>"
        )
    out.append("</table>")
    if not c.rows:
        out.append(f"<p class='muted'>Neither run has a {metric} on any row.</p>")
    return page(f"madlens runs: {c.b.id} against {c.a.id}", "\n".join(out), css=_PAGE_CSS)
