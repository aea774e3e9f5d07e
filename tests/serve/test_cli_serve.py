"""`madlens serve` refuses every bad start with one line and exit code 2, before it listens:
a missing or uncalibrated monitor, a bad key file, a bad port or address, a policy the
monitor cannot apply, an audit file that is not an audit log."""

import hashlib
import socket

import pytest
from serve_support import trusted_prompts

from madlens.monitor import Monitor
from madlens.serve.auth import load_keys


@pytest.fixture(scope="module")
def uncalibrated_dir(sharp_dir, tmp_path_factory):
    monitor = Monitor(str(sharp_dir), hooks=[1], detectors=["mahalanobis"], progress=False)
    monitor.fit(trusted_prompts(40))  # held-out scores, but no calibrate(): no fpr
    return monitor.save(tmp_path_factory.mktemp("uncal") / "monitor")


def one_line_error(result, *words):
    code, out, err = result
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_bad_starts_are_one_line(
    run_cli, monitor_dir, uncalibrated_dir, mean_monitor_dir, tmp_path
):
    serve = ["serve", "--monitor", str(monitor_dir), "--port", "1"]  # never reached: all fail
    one_line_error(run_cli("serve", "--monitor", str(tmp_path / "none")), "no saved monitor")
    one_line_error(
        run_cli("serve", "--monitor", str(uncalibrated_dir), "--port", "1"), "not calibrated"
    )
    one_line_error(
        run_cli("serve", "--monitor", str(mean_monitor_dir), "--policy", "block", "--port", "1"),
        "policy block",
        "mean",
    )
    one_line_error(run_cli(*serve, "--policy", "deny"), "--policy")
    one_line_error(run_cli(*serve[:-1], "70000"), "--port", "65535")
    one_line_error(run_cli(*serve, "--max-batch", "0"), "--max-batch")
    one_line_error(run_cli(*serve, "--batch-wait-ms", "5000"), "--batch-wait-ms")
    one_line_error(run_cli(*serve, "--host", "no.such.host.invalid"), "--host")
    not_audit = tmp_path / "other.db"
    not_audit.write_bytes(b"not a database at all, just some bytes" * 100)
    one_line_error(
        run_cli(*serve[:-2], "--port", "18999", "--audit-db", str(not_audit)), "other.db"
    )


def test_a_busy_port_is_one_line(run_cli, monitor_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(
            run_cli("serve", "--monitor", str(monitor_dir), "--port", str(port)),
            f"127.0.0.1:{port}",
        )
    assert "listen" in line


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["no such file"]),
        (b"", ["holds no key"]),
        (b"# only a comment\n\n", ["holds no key"]),
        (b"\xff\xfesk-key\n", ["not UTF-8"]),
        (b"alice:sk-one\nalice:sk-two\n", ["appears twice"]),
        (b"a:sk-same\nb:sk-same\n", ["appears twice"]),
        (b"bob:sk secret with spaces\n", ["line 1", "spaces"]),
        (b"carol:\n", ["line 1"]),
        ("dave:sk-\u00e9t\u00e9\n".encode(), ["ASCII"]),
    ],
)
def test_bad_key_files(run_cli, monitor_dir, tmp_path, content, words):
    path = tmp_path / "keys.txt"
    if content is not None:
        path.write_bytes(content)
    line = one_line_error(
        run_cli("serve", "--monitor", str(monitor_dir), "--api-key-file", str(path)), *words
    )
    for secret in ("sk-one", "sk-two", "sk-same", "secret", "sk-key"):
        assert secret not in line  # an error never quotes a key


def test_key_file_forms(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# keys\nops:sk-abc\n\n  sk-bare  \n")
    keys = load_keys(path)
    bare_id = hashlib.sha256(b"sk-bare").hexdigest()[:8]
    assert [ident for ident, _ in keys.entries] == ["ops", bare_id]
    assert keys.check(b"Bearer sk-abc") == "ops"
    assert keys.check(b"bearer  sk-bare ") == bare_id
    for header in (
        None,
        b"",
        b"Bearer",
        b"Bearer sk-ab",
        b"Bearer sk-abcd",
        b"sk-abc",
        b"Basic sk-abc",
        b"Bearer ops:sk-abc",
    ):
        assert keys.check(header) is None


def test_serve_is_a_command_with_a_hidden_baseline_option(run_cli):
    code, out, _ = run_cli("serve", "--help")
    assert code == 0
    for option in (
        "--monitor",
        "--policy",
        "--api-key-file",
        "--audit-db",
        "--log-text",
        "--max-batch",
        "--batch-wait-ms",
        "--max-body-bytes",
        "--max-messages",
    ):
        assert option in out
    assert "--no-monitor" not in out
