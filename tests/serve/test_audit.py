"""The audit log of `madlens serve` (`madlens.serve.audit`) and `madlens audit list | show |
export`. Everything is checked against the sqlite3 module and json, not against the
log's own reads."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from madlens.errors import MadlensError
from madlens.serve.audit import AuditLog, conversation_hash

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
KEYS = [
    "id", "time", "endpoint", "key_id", "conversation_sha256", "text", "scores", "p_value",
    "flagged", "policy", "blocked", "latency_ms", "status",
]  # fmt: skip


def entry(i: int, **changes) -> dict:
    record = {
        "id": f"req-{i:04d}",
        "time": T0 + 60.0 * i,
        "endpoint": "/v1/chat/completions",
        "key_id": f"key-{i % 3}",
        "conversation_sha256": hashlib.sha256(f"conversation {i}".encode()).hexdigest(),
        "text": None,
        "scores": {"mahalanobis": 1.5 + i, "knn": 0.25},
        "p_value": 0.5,
        "flagged": False,
        "policy": "flag",
        "blocked": False,
        "latency_ms": 12.5 + i,
        "status": 200,
    }
    record.update(changes)
    return record


def rows(path: Path, sql: str = "SELECT id FROM audit ORDER BY id", *args) -> list[tuple]:
    """Read through an independent sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path):
    """An audit log holding entries 0..4 (one a minute from T0), closed again."""
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        for i in (3, 0, 4, 1, 2):  # out of order: list / export must sort by time
            log.record(entry(i))
    return path


# --- the library -------------------------------------------------------------------------


def test_wal_mode_and_a_record_is_committed_when_record_returns(tmp_path):
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    other = sqlite3.connect(path)  # independent, open before the write
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == 1
        log.record(entry(7))
        assert other.execute("SELECT id, status FROM audit").fetchall() == [("req-0007", 200)]
        log.record(entry(8))
        assert other.execute("SELECT count(*) FROM audit").fetchone()[0] == 2
    finally:
        other.close()
        log.close()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {
            "key_id": None,
            "text": json.dumps([{"role": "user", "content": 'héllo ☃ "quoted"\nline'}]),
            "scores": {"a": -1e300, "nested": {"b": [1, 2.5, None]}, "ü": 0.0},
            "p_value": None,
            "flagged": None,
            "blocked": True,
            "status": 403,
        },
        {"flagged": True, "p_value": 0.0, "latency_ms": 0.0, "scores": {}, "status": 503},
    ],
    ids=["typical", "nulls-and-text", "edges"],
)
def test_every_field_round_trips_with_its_type(tmp_path, changes):
    path = tmp_path / "audit.db"
    original = entry(1, **changes)
    with AuditLog(path) as log:
        log.record(dict(original))
        back = log.get(original["id"])
    assert back == original
    assert list(back) == KEYS
    for key in KEYS:
        assert type(back[key]) is type(original[key]), key
    (raw,) = rows(path, "SELECT scores, flagged, blocked, text FROM audit")
    assert json.loads(raw[0]) == original["scores"]
    assert raw[1] == {None: None, True: 1, False: 0}[original["flagged"]]
    assert raw[2] == int(original["blocked"])
    assert raw[3] == original["text"]


def test_get_of_an_unknown_id_is_none(db):
    with AuditLog(db) as log:
        assert log.get("req-9999") is None
        assert log.get("req-0002")["time"] == T0 + 120.0


def test_list_is_newest_first_with_limit_and_since(db):
    times = {i: T0 + 60.0 * i for i in range(5)}
    newest_first = [f"req-{i:04d}" for i in sorted(times, key=lambda i: -times[i])]
    with AuditLog(db) as log:
        assert [r["id"] for r in log.list()] == newest_first
        assert [r["id"] for r in log.list(limit=2)] == newest_first[:2]
        assert [r["id"] for r in log.list(since=T0 + 120.0)] == newest_first[:3]
        assert [r["id"] for r in log.list(limit=1, since=T0 + 121.0)] == ["req-0004"]
        assert log.list(since=T0 + 1e6) == []
        assert log.list()[0] == entry(4)


def test_export_is_oldest_first_jsonl_with_a_since_filter(db, tmp_path):
    out = tmp_path / "out" / "audit.jsonl"
    with AuditLog(db) as log:
        assert log.export(out) == 5
        lines = out.read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == [entry(i) for i in range(5)]
        assert log.export(out, since=T0 + 180.0) == 2  # replaces the file
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["req-0003", "req-0004"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["audit.jsonl"]  # no temporaries


@pytest.mark.parametrize(
    "changes",
    [
        {"id": 5},
        {"id": ""},
        {"time": "2024-01-01"},
        {"time": float("nan")},
        {"key_id": 3},
        {"conversation_sha256": "abc"},
        {"conversation_sha256": "A" * 64},
        {"text": b"bytes"},
        {"scores": [1.0]},
        {"scores": {1: 0.5}},
        {"scores": {"x": object()}},
        {"p_value": 1.5},
        {"p_value": "0.5"},
        {"flagged": 1},
        {"blocked": None},
        {"latency_ms": -1.0},
        {"status": True},
        {"status": 200.0},
        {"status": 42},
        {"extra": 1},
    ],
)
def test_a_malformed_entry_is_a_value_error_and_writes_nothing(tmp_path, changes):
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        with pytest.raises(ValueError):
            log.record(entry(0, **changes))
    assert rows(path) == []


def test_a_missing_key_or_a_repeated_id_is_a_value_error(tmp_path):
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        incomplete = entry(0)
        del incomplete["policy"]
        with pytest.raises(ValueError, match="policy"):
            log.record(incomplete)
        log.record(entry(0))
        with pytest.raises(ValueError, match="req-0000"):
            log.record(entry(0, status=500))
    assert rows(path, "SELECT id, status FROM audit") == [("req-0000", 200)]


def test_an_existing_log_is_reopened_and_appended_to(db):
    with AuditLog(db) as log:
        log.record(entry(5))
    assert rows(db) == [(f"req-{i:04d}",) for i in range(6)]


def test_concurrent_records_from_eight_threads(tmp_path):
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(thread: int) -> None:
        try:
            start.wait()
            for n in range(50):
                log.record(entry(thread * 50 + n))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    assert errors == []
    assert rows(path) == [(f"req-{i:04d}",) for i in range(400)]
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]


CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from madlens.serve.audit import AuditLog

    log = AuditLog(sys.argv[1])
    i = 0
    while True:
        rid = f"req-{i:06d}"
        log.record({
            "id": rid, "time": 1.7e9 + i, "endpoint": "/v1/monitor/score", "key_id": None,
            "conversation_sha256": hashlib.sha256(rid.encode()).hexdigest(),
            "text": "x" * 4000, "scores": {"knn": i / 7}, "p_value": None, "flagged": None,
            "policy": "off", "blocked": False, "latency_ms": 1.0, "status": 200,
        })
        print(rid, flush=True)
        i += 1
    """
)


def test_sigkill_mid_load_keeps_every_committed_record(tmp_path):
    path = tmp_path / "audit.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    printed = []
    try:
        # ~1500 records of 4 kB: past the WAL's automatic checkpoint (1000 pages)
        while len(printed) < 1500:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            printed.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    printed += rest.split()  # printed after we stopped reading: committed too
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    stored = {rid for (rid,) in rows(path)}
    assert set(printed) <= stored
    assert len(stored - set(printed)) <= 1  # at most the one committed but not yet printed
    with AuditLog(path) as log:  # opens cleanly, and takes new records
        log.record(entry(0))
        assert log.get("req-0000") == entry(0)
        assert len(log.list(limit=len(stored) + 5)) == len(stored) + 1


def test_conversation_hash_is_the_sha256_of_canonical_json():
    messages = [{"role": "user", "content": "héllo ☃"}, {"content": "hi", "role": "assistant"}]
    canonical = '[{"content":"héllo ☃","role":"user"},{"content":"hi","role":"assistant"}]'
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert conversation_hash(messages) == expected
    reordered = [{"content": "héllo ☃", "role": "user"}, {"role": "assistant", "content": "hi"}]
    assert conversation_hash(reordered) == expected
    assert conversation_hash(messages[:1]) != expected


# --- files that are not ours -------------------------------------------------------------


def foreign_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("this is a text file, not SQLite\n" * 50)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE audit (id TEXT)")  # even a table of the same name
    conn.commit()
    conn.close()
    newer = tmp_path / "newer.db"
    AuditLog(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    return {"text": text, "other": other, "newer": newer}


@pytest.mark.parametrize("kind", ["text", "other", "newer"])
@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_an_audit_log_is_refused_and_left_alone(tmp_path, kind, readonly):
    path = foreign_files(tmp_path)[kind]
    before = digest(path)
    expected = {
        "text": "not a SQLite database",
        "other": "not a madlens audit log",
        "newer": "schema 99 is newer",
    }[kind]
    with pytest.raises(MadlensError, match=expected):
        AuditLog(path, readonly=readonly)
    assert digest(path) == before


def test_opening_read_only_never_creates_the_database(tmp_path):
    path = tmp_path / "missing.db"
    with pytest.raises(MadlensError, match="no such file"):
        AuditLog(path, readonly=True)
    assert list(tmp_path.iterdir()) == []


def test_read_only_reads_a_live_wal_log_and_never_changes_the_file(db):
    writer = AuditLog(db)
    writer.record(entry(9))  # in the -wal file, not yet checkpointed into the database
    assert Path(f"{db}-wal").stat().st_size > 0
    with AuditLog(db, readonly=True) as reader:
        assert reader.get("req-0009") == entry(9)
        with pytest.raises(ValueError):
            reader.record(entry(10))
    writer.close()
    assert not Path(f"{db}-wal").exists()  # the writer checkpointed and removed it
    before = digest(db)
    with AuditLog(db, readonly=True) as reader:  # no -wal, no -shm: created for the read
        assert [r["id"] for r in reader.list(limit=2)] == ["req-0009", "req-0004"]
    assert digest(db) == before
    with AuditLog(db) as writer:  # a writer still works after the reader's leftovers
        writer.record(entry(10))
    assert len(rows(db)) == 7
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


# --- the CLI -----------------------------------------------------------------------------


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def test_cli_list_prints_a_table_newest_first(db, run_cli):
    code, out, err = run_cli("audit", "list", "--db", str(db), "--limit", "3")
    assert code == 0 and not err
    header, *lines = out.strip().splitlines()
    assert header.split()[:2] == ["time", "(UTC)"]
    assert len(lines) == 3
    for line, i in zip(lines, (4, 3, 2)):
        e = entry(i)
        assert line.split() == [
            iso(e["time"]), e["id"], e["endpoint"], e["key_id"], "no", "0.5",
            f"{e['latency_ms']:.1f}", "200",
        ]  # fmt: skip


def test_cli_list_since_and_no_records(db, run_cli):
    code, out, _ = run_cli("audit", "list", "--db", str(db), "--since", str(T0 + 180))
    assert code == 0
    assert [line.split()[1] for line in out.strip().splitlines()[1:]] == ["req-0004", "req-0003"]
    code, out, _ = run_cli("audit", "list", "--db", str(db), "--since", "2030-01-01")
    assert code == 0 and out.startswith("no records")


def test_cli_show_prints_the_record_as_json(db, run_cli):
    code, out, err = run_cli("audit", "show", "req-0002", "--db", str(db))
    assert code == 0 and not err
    assert json.loads(out) == entry(2)
    assert out.startswith("{\n  ")  # indented


@pytest.mark.parametrize(
    "since, ids",
    [
        ("2023-11-14T22:15:20Z", [2, 3, 4]),  # T0 + 120
        ("2023-11-14T23:15:20+01:00", [2, 3, 4]),  # the same instant
        ("2023-11-14T22:15:21", [3, 4]),  # naive: UTC
        ("2023-11-14", [0, 1, 2, 3, 4]),
        ("2023-11-15", []),
        (str(int(T0 + 240)), [4]),
        (str(T0 + 239.5), [4]),
    ],
)
def test_cli_export_since_iso_or_unix_seconds(db, run_cli, tmp_path, since, ids):
    out = tmp_path / "export.jsonl"
    code, stdout, err = run_cli(
        "audit", "export", "--db", str(db), "--since", since, "--out", str(out)
    )
    assert code == 0 and not err
    assert stdout.strip() == f"wrote {len(ids)} record(s) to {out}"
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [entry(i) for i in ids]


def test_cli_export_without_since_writes_everything(db, run_cli, tmp_path):
    out = tmp_path / "all.jsonl"
    code, _, _ = run_cli("audit", "export", "--db", str(db), "--out", str(out))
    assert code == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [
        f"req-{i:04d}" for i in range(5)
    ]


def test_cli_bad_inputs_are_one_line_exit_2(db, run_cli, tmp_path):
    files = foreign_files(tmp_path)
    missing = tmp_path / "missing" / "audit.db"
    cases = [
        (["audit", "list", "--db", str(missing)], "no such file"),
        (["audit", "show", "x", "--db", str(missing)], "no such file"),
        (["audit", "list", "--db", str(tmp_path)], "not a file"),
        (["audit", "list", "--db", str(files["text"])], "not a SQLite database"),
        (["audit", "show", "req-0001", "--db", str(files["other"])], "not a madlens audit log"),
        (["audit", "list", "--db", str(files["newer"])], "newer"),
        (["audit", "show", "req-9999", "--db", str(db)], "no request 'req-9999'"),
        (["audit", "list", "--db", str(db), "--since", "yesterday"], "--since 'yesterday'"),
        (["audit", "list", "--db", str(db), "--since", "nan"], "--since 'nan'"),
        (
            ["audit", "export", "--db", str(db), "--since", "2023-13-45", "--out", "x.jsonl"],
            "--since '2023-13-45'",
        ),  # fmt: skip
        (["audit", "export", "--db", str(db), "--out", str(tmp_path)], "is a directory"),
        (["audit", "list"], "--db"),
        (["audit", "list", "--db", str(db), "--limit", "0"], "--limit"),
    ]
    for args, expected in cases:
        code, out, err = run_cli(*args)
        assert code == 2, args
        assert expected in one_error_line(err), (args, err)
    assert not missing.parent.exists()  # reading never creates the database or its folder
    assert not (Path.cwd() / "x.jsonl").exists()
