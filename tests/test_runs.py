"""The run registry: what it stores (read back with plain DuckDB), comparisons against
hand-computed differences, two processes writing at once, a registry that cannot be written,
MADLENS_NO_RUNS, the `madlens runs` commands and the recording of real commands."""

import json
import math
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pytest
from browser import dump_dom

from madlens import __version__, runs
from madlens.cli.runs import circuit_rows, monitor_rows, record_run, sae_rows, truth_rows
from madlens.errors import MadlensError

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh registry file (not yet created) for one test."""
    path = tmp_path / "home" / "runs.duckdb"
    monkeypatch.setenv("MADLENS_RUNS_DB", str(path))
    monkeypatch.delenv("MADLENS_NO_RUNS", raising=False)
    return path


def query(path, sql, params=()):
    """Plain DuckDB, the independent reference for what the registry holds."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def row(task, detector, hook, auroc, ci=None, **extra):
    out = {"task": task, "detector": detector, "hook": hook, "auroc": auroc, **extra}
    if ci is not None:
        out["auroc_ci"] = list(ci)
    return out


# --- storing and reading back ------------------------------------------------------------------


def test_record_list_show_round_trip_against_plain_duckdb(db):
    bench_rows = [
        {"task": "ood", "detector": "knn", "hook": "blocks.1.hook_resid_post",
         "auroc": np.float64(0.75), "auroc_ci": [np.float32(0.5), 0.875], "ap": 0.5,
         "fpr_at_95tpr": 0.25, "tpr_at_1fpr": 0.125, "n_normal": np.int64(12), "status": "ok"},
        {"task": "ood", "detector": "ccs", "hook": "n/a", "auroc": float("nan"),
         "auroc_ci": [None, None], "status": "n/a", "reason": "no contrast pairs"},
    ]  # fmt: skip
    truth = [{"task": "cities", "detector": "ccs", "hook": "blocks.0.hook_resid_post",
              "accuracy": 0.625, "accuracy_sign_fixed": 0.625}]  # fmt: skip
    before = datetime.now(UTC).replace(tzinfo=None)
    first = runs.record("bench", {"out": Path("/x/y"), "n": np.int64(3), "tags": ("a", "b")},
                        bench_rows, model="tiny-test", fingerprint="f00d", wall_s=1.5)  # fmt: skip
    second = runs.record("truth sweep", {"n": 8}, truth, model="m", wall_s=2.0)
    third = runs.record("truthy", {}, [], wall_s=0.0, status="problems")
    after = datetime.now(UTC).replace(tzinfo=None)
    assert all(re.fullmatch(r"[0-9a-f]{8}", i) for i in (first, second, third))

    stored = query(db, "SELECT id, command, config, madlens_version, model, fingerprint, "
                       "wall_s, status, created FROM runs ORDER BY created")  # fmt: skip
    assert [s[:2] for s in stored] == [(first, "bench"), (second, "truth sweep"),
                                       (third, "truthy")]  # fmt: skip
    assert json.loads(stored[0][2]) == {"out": "/x/y", "n": 3, "tags": ["a", "b"]}
    assert stored[0][3:8] == (__version__, "tiny-test", "f00d", 1.5, "ok")
    assert stored[2][7] == "problems" and stored[1][5] is None
    assert all(before <= s[8] <= after for s in stored)
    cells = query(db, 'SELECT run_id, idx, task, detector, hook, status, auroc, auroc_lo, '
                      'auroc_hi, ap, fpr_at_95tpr, tpr_at_1fpr, accuracy, "row" FROM rows '
                      "ORDER BY run_id = ?, idx", [second])  # fmt: skip
    assert [c[:13] for c in cells] == [
        (first, 0, "ood", "knn", "blocks.1.hook_resid_post", "ok", 0.75, 0.5, 0.875, 0.5, 0.25,
         0.125, None),
        (first, 1, "ood", "ccs", "n/a", "n/a", None, None, None, None, None, None, None),
        (second, 0, "cities", "ccs", "blocks.0.hook_resid_post", None, None, None, None, None,
         None, None, 0.625),
    ]  # fmt: skip
    plain = [dict(bench_rows[0], auroc=0.75, auroc_ci=[0.5, 0.875], n_normal=12),
             dict(bench_rows[1], auroc=None)]  # NaN is stored as null  # fmt: skip
    assert [json.loads(c[13]) for c in cells] == [*plain, truth[0]]

    listed = runs.list_runs()
    assert [r.id for r in listed] == [third, second, first]  # newest first
    assert [r.n_rows for r in listed] == [0, 1, 2]
    assert listed[2].mean_auroc == 0.75 and listed[0].mean_auroc is None
    assert [r.id for r in runs.list_runs(limit=2)] == [third, second]
    assert [r.id for r in runs.list_runs(command="truth")] == [second]  # not "truthy"
    assert [r.id for r in runs.list_runs(command="truthy")] == [third]
    shown = runs.get_run(first[:5])
    assert shown.id == first and shown.rows == plain and shown.config["tags"] == ["a", "b"]
    assert (shown.model, shown.fingerprint, shown.wall_s) == ("tiny-test", "f00d", 1.5)


def test_git_revision_and_dirty_flag_against_the_repository_files(db, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "a.txt").write_text("one\n")
    subprocess.run([*git, "add", "a.txt"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=repo, check=True)
    head = (repo / ".git" / "refs" / "heads" / "main").read_text().strip()
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    clean = runs.get_run(runs.record("bench", {}, [], wall_s=1.0))
    (repo / "untracked.txt").write_text("new\n")  # untracked files do not make it dirty
    assert runs.git_revision() == (head, False)
    (repo / "a.txt").write_text("two\n")
    dirty = runs.get_run(runs.record("bench", {}, [], wall_s=1.0))
    assert (clean.git_revision, clean.git_dirty, clean.git) == (head, False, head[:10])
    assert (dirty.git_revision, dirty.git_dirty, dirty.git) == (head, True, head[:10] + "+dirty")
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert runs.git_revision() == (None, None)
    assert query(db, "SELECT count(*) FROM runs WHERE git_revision IS NULL") == [(0,)]


def test_reading_a_missing_registry_creates_nothing(db, run_cli):
    assert runs.list_runs() == [] and not runs.exists()
    with pytest.raises(MadlensError, match="no runs recorded yet"):
        runs.get_run("abc")
    for args in (["list"], ["show", "abc"], ["compare", "abc", "def"]):
        code, out, err = run_cli("runs", *args)
        assert (code, out.strip(), err) == (0, "no runs recorded yet", "")
    assert not db.parent.exists()  # neither the file, its lock nor its folder


# --- compare -----------------------------------------------------------------------------------

A_ROWS = [
    row("t1", "knn", "h", 0.80, (0.70, 0.90)),
    row("t1", "que", "h", 0.60, (0.50, 0.65)),
    row("t1", "maha", "h", 0.90, (0.85, 0.95)),
    row("t1", "msp", "output", 0.70),  # no CI
    row("t1", "pca", "h", 0.55, (0.50, 0.60)),
    row("t1", "ccs", "n/a", None, status="n/a"),  # no value on either side: left out
    row("t2", "knn", "h", 0.55, (0.40, 0.70)),  # in a only
]
B_ROWS = [
    row("t1", "knn", "h", 0.85, (0.80, 0.95)),
    row("t1", "que", "h", 0.80, (0.70, 0.90)),
    row("t1", "maha", "h", 0.70, (0.60, 0.80)),
    row("t1", "msp", "output", 0.72, (0.60, 0.80)),
    row("t1", "pca", "h", 0.65, (0.60, 0.70)),  # the CIs touch at 0.60: they overlap
    row("t1", "ccs", "n/a", None, status="n/a"),
    row("t3", "knn", "h", 0.90, (0.80, 1.00)),  # in b only
]
# (task, detector, hook, a, b, diff, overlap, mark), worked out by hand
EXPECTED = [
    ("t1", "knn", "h", 0.80, 0.85, 0.05, True, "="),
    ("t1", "que", "h", 0.60, 0.80, 0.20, False, "+"),
    ("t1", "maha", "h", 0.90, 0.70, -0.20, False, "-"),
    ("t1", "msp", "output", 0.70, 0.72, 0.02, None, "?"),
    ("t1", "pca", "h", 0.55, 0.65, 0.10, True, "="),
    ("t2", "knn", "h", 0.55, None, None, None, ""),
    ("t3", "knn", "h", None, 0.90, None, None, ""),
]


@pytest.fixture
def two_runs(db):
    a = runs.record("bench", {"detectors": "knn", "seed": 0}, A_ROWS, model="m", wall_s=1.0)
    b = runs.record("bench", {"detectors": "knn,que", "seed": 0, "quick": True}, B_ROWS,
                    model="m", wall_s=1.0)  # fmt: skip
    return a, b


def test_compare_against_hand_computed_differences(two_runs):
    a, b = two_runs
    comparison = runs.compare(a, b)
    got = [(d.task, d.detector, d.hook, d.a, d.b, d.diff, d.overlap, d.mark)
           for d in comparison.rows]  # fmt: skip
    assert [g[:5] + g[6:] for g in got] == [e[:5] + e[6:] for e in EXPECTED]
    for g, e in zip(got, EXPECTED):
        assert (g[5] is None and e[5] is None) or math.isclose(g[5], e[5], abs_tol=1e-12)
    assert (comparison.rows[1].a_lo, comparison.rows[1].a_hi) == (0.50, 0.65)
    assert (comparison.rows[1].b_lo, comparison.rows[1].b_hi) == (0.70, 0.90)
    assert comparison.config_changes == [("detectors", "knn", "knn,que"), ("quick", None, True)]
    assert comparison.summary() == (
        "auroc: b better on 1, worse on 1, CIs overlap on 2, no CI "
        "on 1 (of 5 rows in both runs); 2 row(s) in one run only"
    )
    # the other way round, every mark flips
    back = {(d.task, d.detector): d.mark for d in runs.compare(b, a).rows}
    assert (back["t1", "que"], back["t1", "maha"], back["t1", "knn"]) == ("-", "+", "=")


def test_compare_a_lower_is_better_metric_and_repeated_keys(db):
    a = runs.record("x", {}, [
        {"task": "t", "detector": "d", "hook": "h", "fpr_at_95tpr": 0.30,
         "fpr_at_95tpr_lo": 0.20, "fpr_at_95tpr_hi": 0.40},
        {"task": "r", "detector": "d", "hook": "h", "accuracy": 0.5},
        {"task": "r", "detector": "d", "hook": "h", "accuracy": 0.6},
    ], wall_s=1.0)  # fmt: skip
    b = runs.record("x", {}, [
        {"task": "t", "detector": "d", "hook": "h", "fpr_at_95tpr": 0.10,
         "fpr_at_95tpr_lo": 0.05, "fpr_at_95tpr_hi": 0.15},
        {"task": "r", "detector": "d", "hook": "h", "accuracy": 0.7},
        {"task": "r", "detector": "d", "hook": "h", "accuracy": 0.9},
    ], wall_s=1.0)  # fmt: skip
    fpr = runs.compare(a, b, metric="fpr_at_95tpr").rows
    assert [(d.task, d.mark) for d in fpr] == [("t", "+")]  # a lower FPR is better
    assert math.isclose(fpr[0].diff, -0.20)
    acc = runs.compare(a, b, metric="accuracy").rows
    assert [(d.a, d.b, d.mark) for d in acc] == [(0.5, 0.7, "?"), (0.6, 0.9, "?")]
    with pytest.raises(MadlensError, match="metric"):
        runs.compare(a, b, metric="auroc; DROP TABLE runs")


def test_cli_list_show_compare(two_runs, run_cli):
    a, b = two_runs
    code, out, err = run_cli("runs", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["id", "created", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == [b, a]
    # mean AUROC over the rows that have one: a (0.8+0.6+0.9+0.7+0.55+0.55)/6, b 4.62/6
    assert lines[1].split()[-2:] == ["0.770", "ok"] and lines[2].split()[-2:] == ["0.683", "ok"]
    code, out, _ = run_cli("runs", "list", "--command", "truth sweep")
    assert (code, out.strip()) == (0, "no 'truth sweep' runs")

    code, out, _ = run_cli("runs", "show", b[:6])
    assert code == 0 and out.splitlines()[0] == f"run          {b}"
    assert '  detectors          "knn,que"' in out.splitlines()
    table = [line.split() for line in out.splitlines() if line.startswith("t1 ")]
    assert table[1][:5] == ["t1", "que", "h", "0.800", "[0.700,"]
    code, out, _ = run_cli("runs", "show", a, "--json")
    doc = json.loads(out)
    assert doc["id"] == a and doc["rows"] == json.loads(json.dumps(A_ROWS))

    code, out, err = run_cli("runs", "compare", a[:4], b[:4])
    assert code == 0 and err == ""
    marks = {tuple(line.split()[:2]): line.split() for line in out.splitlines()
             if line.startswith(("t1 ", "t2 ", "t3 "))}  # fmt: skip
    assert marks["t1", "que"][-2:] == ["+0.200", "+"]
    assert marks["t1", "maha"][-2:] == ["-0.200", "-"]
    assert marks["t1", "knn"][-2:] == ["+0.050", "="] and marks["t1", "msp"][-2:] == ["+0.020", "?"]
    assert marks["t2", "knn"][3:] == ["0.550", "[0.400,", "0.700]", "-"]  # a only
    assert '   detectors: "knn" -> "knn,que"' in out.splitlines()
    assert out.splitlines()[-1].startswith("auroc: b better on 1, worse on 1")


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "zzzz"], "no run 'zzzz'"),
        (["show", "aaaa"], "is ambiguous: it starts aaaa0001, aaaa0002"),
        (["compare", "aaaa0001", "cccc"], "no run 'cccc'"),
        (["compare", "aaaa0001", "bbbb"], "metric is a row field"),
        (["list", "--limit", "0"], "--limit"),
    ],
)
def test_cli_bad_input_is_one_line(db, run_cli, monkeypatch, args, message):
    ids = iter(["aaaa0001", "aaaa0002", "bbbb0001"])
    monkeypatch.setattr(runs.secrets, "token_hex", lambda n: next(ids))
    for _ in range(3):
        runs.record("bench", {}, [row("t", "d", "h", 0.5)], wall_s=1.0)
    if args[0] == "compare" and args[-1] == "bbbb":
        args = [*args, "--metric", "a-b"]
    code, out, err = run_cli("runs", *args)
    assert code == 2 and message in err and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert runs.get_run("bbbb").id == "bbbb0001"


def test_a_corrupt_registry_is_one_error_line_to_read(db, run_cli):
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database" * 100)
    code, _, err = run_cli("runs", "list")
    assert code == 2 and err.startswith("error: cannot read the run registry")
    assert len(err.strip().splitlines()) == 1


def test_the_html_comparison_renders_in_chromium(db, run_cli, tmp_path):
    a = runs.record("bench", {}, [*A_ROWS, row("<i>x</i>", "knn", "h", 0.5, (0.4, 0.6))],
                    wall_s=1.0)  # fmt: skip
    b = runs.record("bench", {}, [*B_ROWS, row("<i>x</i>", "knn", "h", 0.5, (0.4, 0.6))],
                    wall_s=1.0)  # fmt: skip
    page = tmp_path / "out" / "compare.html"
    code, out, err = run_cli("runs", "compare", a, b, "--html", str(page))
    assert code == 0 and out.splitlines()[-1] == f"wrote {page}", err
    dom = dump_dom(page)
    assert f"Run {b} against {a}" in dom and dom.count(a) >= 2 and dom.count(b) >= 2
    body = dom[dom.index('id="differences"') :]
    body = body[: body.index("</table>")]
    assert body.count("<tr>") == len(EXPECTED) + 2  # header + the rows + the escaped task
    assert "&lt;i&gt;x&lt;/i&gt;" in body and "<i>x</i>" not in dom
    assert '<td class="plus">+</td>' in body and '<td class="minus">-</td>' in body
    assert "+0.200" in body and "[0.500, 0.650]" in body


# --- concurrency -------------------------------------------------------------------------------

WRITER = """
import os, sys, time
sys.path.insert(0, {src!r})
from madlens import runs
proc, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(30):
    rows = [{{"task": f"p{{proc}}-{{i}}", "detector": "d", "hook": str(j), "auroc": j / 25}}
            for j in range(25)]
    runs.record("bench", {{"proc": proc, "i": i}}, rows, model="m", wall_s=float(i))
"""


def test_two_processes_recording_at_once_lose_nothing(db, tmp_path):
    go = tmp_path / "go"
    script = WRITER.format(src=SRC)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in (0, 1)]  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()  # both start writing at the same moment
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and err == "", err
    recorded = query(db, "SELECT config->>'$.proc', (config->>'$.i')::INT, id, created "
                         "FROM runs")  # fmt: skip
    assert sorted((p, i) for p, i, _, _ in recorded) == [(p, i) for p in "01" for i in range(30)]
    assert len({r[2] for r in recorded}) == 60
    counts = query(db, "SELECT r.config->>'$.proc', (r.config->>'$.i')::INT, count(*), "
                       "min(x.task), max(x.task), sum(x.auroc) FROM runs r JOIN rows x "
                       "ON x.run_id = r.id GROUP BY ALL")  # fmt: skip
    assert sorted(c[:5] for c in counts) == sorted(
        (p, i, 25, f"p{p}-{i}", f"p{p}-{i}") for p in "01" for i in range(30)
    )
    assert all(math.isclose(c[5], sum(j / 25 for j in range(25))) for c in counts)
    spans = [[t for p, _, _, t in recorded if p == proc] for proc in "01"]
    assert max(min(s) for s in spans) < min(max(s) for s in spans)  # they did interleave


HOLDER = """
import sys, time, fcntl, duckdb
kind, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if kind == "duckdb":
    con = duckdb.connect(path)
else:
    handle = open(path + ".lock", "a+b")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(seconds)
"""


def _hold(kind, path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_lock_held_by_another_program_is_waited_out(db):
    db.parent.mkdir(parents=True)
    holder = _hold("duckdb", db, 1.5)  # a duckdb shell that ignores madlens's lock file
    start = time.monotonic()
    try:
        run_id = runs.record("bench", {}, [row("t", "d", "h", 0.5)], wall_s=1.0)
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 1.0  # it could only open the file once the holder had let go
    assert query(db, "SELECT id FROM runs") == [(run_id,)]


def test_a_lock_held_too_long_is_a_bounded_wait_then_one_warning(db, monkeypatch, capsys):
    db.parent.mkdir(parents=True)
    monkeypatch.setattr(runs, "WRITE_TIMEOUT_S", 0.5)
    holder = _hold("flock", db, 30)
    try:
        start = time.monotonic()
        with pytest.raises(MadlensError, match="stayed locked by another process for 0.5 s"):
            runs.record("bench", {}, [], wall_s=1.0)
        assert time.monotonic() - start < 5
        assert record_run("bench", [], start=time.perf_counter(), config={}) is None
    finally:
        holder.kill()
        holder.wait()
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("warning: run not recorded: ")
    assert not db.exists()


# --- a registry that cannot be written; recording switched off ---------------------------------


@pytest.mark.parametrize("broken", ["home is a file", "corrupt file"])
def test_a_registry_that_cannot_be_written_is_one_warning_line(tmp_path, monkeypatch, capsys,
                                                               broken):  # fmt: skip
    monkeypatch.delenv("MADLENS_RUNS_DB")
    home = tmp_path / "home"
    if broken == "home is a file":
        home.write_text("not a folder")
        expected = home.read_bytes()
    else:
        home.mkdir()
        (home / "runs.duckdb").write_bytes(b"\x00garbage" * 512)
        expected = (home / "runs.duckdb").read_bytes()
    monkeypatch.setenv("MADLENS_HOME", str(home))
    assert runs.registry_path() == home / "runs.duckdb"
    got = record_run("bench", [row("t", "d", "h", 0.5)], start=time.perf_counter(), config={})
    out, err = capsys.readouterr()
    assert got is None and out == ""
    assert err.count("\n") == 1 and err.startswith("warning: run not recorded: cannot write")
    assert (home.read_bytes() if home.is_file() else (home / "runs.duckdb").read_bytes()) == (
        expected
    )


def test_madlens_no_runs_records_nothing(db, monkeypatch, capsys):
    monkeypatch.setenv("MADLENS_NO_RUNS", "1")
    assert not runs.enabled()
    assert runs.record("bench", {}, [row("t", "d", "h", 0.5)], wall_s=1.0) is None
    assert record_run("bench", [], start=time.perf_counter(), config={}) is None
    assert capsys.readouterr() == ("", "")
    assert not db.parent.exists()
    for off in ("0", "", "false"):
        monkeypatch.setenv("MADLENS_NO_RUNS", off)
        assert runs.enabled()


# --- real commands record themselves -----------------------------------------------------------

BENCH = ["bench", "--model", "tiny-test", "--detectors", "knn,mahalanobis", "--dtype", "float32"]


def _nullify(value):
    """results.json as the registry keeps it: non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nullify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nullify(v) for v in value]
    return value


def test_a_cli_bench_run_is_recorded(db, tmp_path, monkeypatch, run_cli, weather_task_file, tiny):
    monkeypatch.chdir(tmp_path)  # not a git work tree
    out = tmp_path / "bench"
    start = time.monotonic()
    code, stdout, err = run_cli(*BENCH, "--task-file", str(weather_task_file), "--out", "bench")
    took = time.monotonic() - start
    assert code == 0, err
    (run_id,) = re.findall(r"^recorded run ([0-9a-f]{8}) ", stdout, flags=re.M)
    results = json.loads((out / "results.json").read_text())
    stored = query(db, "SELECT id, command, model, fingerprint, git_revision, wall_s, status, "
                       "config FROM runs")  # fmt: skip
    assert len(stored) == 1 and stored[0][:5] == (run_id, "bench", "tiny-test",
                                                  tiny.fingerprint, None)  # fmt: skip
    assert 0 < stored[0][5] <= took and stored[0][6] == "ok"
    config = json.loads(stored[0][7])
    assert config["task_file"] == str(weather_task_file)
    assert config["out"] == str(out) and config["detectors"] == "knn,mahalanobis"
    assert config["dtype"] == "float32" and config["seed"] == 0
    rows = query(db, 'SELECT "row", auroc, auroc_lo, auroc_hi FROM rows WHERE run_id = ? '
                     "ORDER BY idx", [run_id])  # fmt: skip
    assert [json.loads(r[0]) for r in rows] == _nullify(results["rows"])
    assert [r[1:] for r in rows] == [(r["auroc"], *r["auroc_ci"]) for r in results["rows"]]


@pytest.mark.parametrize("setting", ["corrupt registry", "MADLENS_NO_RUNS"])
def test_a_cli_bench_run_succeeds_whatever_the_registry(db, tmp_path, monkeypatch, run_cli,
                                                         weather_task_file, setting):  # fmt: skip
    db.parent.mkdir(parents=True)
    if setting == "corrupt registry":
        db.write_bytes(b"garbage" * 100)
    else:
        monkeypatch.setenv("MADLENS_NO_RUNS", "1")
    code, out, err = run_cli(*BENCH, "--task-file", str(weather_task_file),
                             "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 0 and "Traceback" not in out + err
    assert (tmp_path / "o" / "results.json").is_file() and "recorded run" not in out
    warnings = [line for line in err.splitlines() if "run not recorded" in line]
    if setting == "corrupt registry":
        assert len(warnings) == 1 and db.read_bytes() == b"garbage" * 100
    else:
        assert warnings == [] and not db.exists()


def test_monitor_fit_and_circuits_record_their_results(db, tmp_path, run_cli):
    from madlens.data import write_jsonl

    trusted = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line number {i} here"}
                                                 for i in range(40)])  # fmt: skip
    code, _, err = run_cli("monitor", "fit", "--trusted", str(trusted), "--model", "tiny-test",
                           "--hooks", "0,1", "--detectors", "mahalanobis,knn", "--fpr", "0.2",
                           "--holdout", "0.5", "--dtype", "float32",
                           "--out", str(tmp_path / "mon"))  # fmt: skip
    assert code == 0, err
    saved = json.loads((tmp_path / "mon" / "monitor.json").read_text())
    code, _, err = run_cli("circuits", "ioi", "--model", "tiny-test", "--out",
                           str(tmp_path / "ioi"), "--n-prompts", "6", "--dtype", "float32",
                           "--no-cache")  # fmt: skip
    assert code == 0, err
    circuit = json.loads((tmp_path / "ioi" / "circuit.json").read_text())
    (circuits_id, monitor_id) = [r.id for r in runs.list_runs()]
    mon = runs.get_run(monitor_id)
    assert (mon.command, mon.fingerprint) == ("monitor fit", saved["model"]["fingerprint"])
    assert {r["detector"]: r["threshold"] for r in mon.rows} == saved["thresholds"]
    assert {(r["n_fit"], r["n_calibration"], r["fpr"]) for r in mon.rows} == {(20, 20, 0.2)}
    assert mon.rows[0]["hook"] == "blocks.0.hook_resid_post+blocks.1.hook_resid_post"
    ioi = runs.get_run(circuits_id)
    assert ioi.command == "circuits ioi" and ioi.config["n_prompts"] == 6
    summary = ioi.rows[0]
    assert (summary["detector"], summary["faithfulness"], summary["completeness"]) == (
        "circuit",
        circuit["faithfulness"],
        circuit["completeness"],
    )
    heads = {(r["detector"], r["layer"], r["head"]) for r in ioi.rows[1:]}
    assert heads == {(c, h[0], h[1]) for c, hs in circuit["heads"].items() for h in hs}


def test_the_row_builders_on_documents_shaped_like_the_commands_outputs():
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    acc = {"accuracy": 0.25, "accuracy_sign_fixed": 0.75}
    truth = {"datasets": {"cities": {
        "n_eval": 4, "zero_shot": {"accuracy": 0.5, "accuracy_sign_fixed": 0.5,
                                   "accuracy_calibrated": 0.75},
        "methods": {m: {h: acc for h in hooks} for m in ("ccs", "random")},
        "ccs_loss": {hooks[0]: 0.1, hooks[1]: 0.2}}}}  # fmt: skip
    rows = truth_rows(truth)
    assert [(r["detector"], r["hook"]) for r in rows] == [
        ("ccs", hooks[0]), ("ccs", hooks[1]), ("random", hooks[0]), ("random", hooks[1]),
        ("zero-shot", "output")]  # fmt: skip
    assert rows[1] == {"task": "cities", "detector": "ccs", "hook": hooks[1], **acc,
                       "ccs_loss": 0.2, "n_eval": 4}  # fmt: skip
    assert "ccs_loss" not in rows[2] and rows[4]["accuracy_calibrated"] == 0.75
    sae = sae_rows({"architecture": "topk", "hook": hooks[1], "d_sae": 128, "history": [{}],
                    "config": {"k": 4}, "eval": {"explained_variance": 0.5, "l0": 4.0},
                    "final_train": {"mse": 1.5}})  # fmt: skip
    assert sae == [
        {
            "task": "sae",
            "detector": "topk",
            "hook": hooks[1],
            "architecture": "topk",
            "d_sae": 128,
            "explained_variance": 0.5,
            "l0": 4.0,
            "train_mse": 1.5,
        }
    ]
    circuit = circuit_rows(
        {"model": "m", "faithfulness": 0.9, "heads": {"name_mover": [[1, 2]], "induction": []}}
    )
    assert circuit == [{"task": "ioi", "detector": "circuit", "hook": "all heads",
                        "faithfulness": 0.9},
                       {"task": "ioi", "detector": "name_mover", "hook": "1.2", "layer": 1,
                        "head": 2}]  # fmt: skip
    monitor = monitor_rows({"hooks": hooks, "thresholds": {"knn": 2.5}, "fpr": 0.1, "n_fit": 3,
                            "n_calibration": 4, "position": "last",
                            "detectors": [{"name": "knn", "params": {"k": 2}}]})  # fmt: skip
    assert monitor == [{"task": "monitor", "detector": "knn", "hook": "+".join(hooks),
                        "threshold": 2.5, "fpr": 0.1, "n_fit": 3, "n_calibration": 4,
                        "position": "last", "params": {"k": 2}}]  # fmt: skip
