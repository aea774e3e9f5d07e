"""`madlens serve` as a real process: SIGKILL under load loses no audit record of an
answered request and leaves a database that opens cleanly; SIGTERM lets the requests in
flight finish, then the process exits. Checked with sqlite3 and the HTTP answers."""

import json
import random
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from serve_support import KEYS

CHAT = "/v1/chat/completions"
SCORE = "/v1/monitor/score"


def audit_ids(path) -> tuple[set[str], str]:
    with sqlite3.connect(path) as db:
        ok = db.execute("PRAGMA integrity_check").fetchone()[0]
        ids = {row[0] for row in db.execute("SELECT id FROM audit")}
    return ids, ok


def test_sigkill_under_load_keeps_every_answered_request_audited(servers):
    server = servers["kill"].ready()
    answered: list[str] = []  # request ids of 200 answers (for a stream: its headers)
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            while not stop.is_set():
                question = f"Question {rng.randrange(10**6)}: what is {rng.randrange(99)}?"
                body = {
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": rng.randrange(1, 24),
                    "temperature": rng.choice([0, 1]),
                }
                kind = rng.randrange(3)
                try:
                    if kind == 0:
                        with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
                            if r.status_code == 200:
                                with lock:
                                    answered.append(r.headers["x-request-id"])
                            for _ in r.iter_lines():
                                pass
                    else:
                        path, payload = (CHAT, body) if kind == 1 else (SCORE, body)
                        r = http.post(path, json=payload)
                        if r.status_code == 200:
                            with lock:
                                answered.append(r.json()["id"])
                except (httpx.HTTPError, OSError) as exc:
                    with lock:
                        failures.append(type(exc).__name__)
                    return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answered) < 40 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert server.proc.returncode == -signal.SIGKILL
    assert len(answered) >= 40
    assert failures  # requests were in flight when the server died
    ids, ok = audit_ids(server.audit)
    assert ok == "ok"
    missing = set(answered) - ids
    assert not missing, f"{len(missing)} answered requests have no audit record"
    with sqlite3.connect(server.audit) as db:
        keys = {row[0] for row in db.execute("SELECT DISTINCT key_id FROM audit")}
        statuses = {row[0] for row in db.execute("SELECT DISTINCT status FROM audit")}
    assert keys == {"alice"} and statuses == {200}


def test_sigterm_finishes_the_requests_in_flight_then_exits(servers, ref_monitor):
    server = servers["term"].ready()  # a 1 s batch window: requests wait in the engine
    question = [{"role": "user", "content": "What is the tallest mountain in Africa?"}]
    results: dict[str, tuple[float, int, dict | list]] = {}

    def chat() -> None:
        body = {"messages": question, "max_tokens": 16, "temperature": 0}
        r = httpx.post(server.url + CHAT, json=body, timeout=60)
        results["chat"] = (time.monotonic(), r.status_code, r.json())

    def stream() -> None:
        body = {"messages": question, "max_tokens": 12, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + CHAT, json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        results["stream"] = (time.monotonic(), r.status_code, lines)

    def score() -> None:
        r = httpx.post(server.url + SCORE, json={"messages": question}, timeout=60)
        results["score"] = (time.monotonic(), r.status_code, r.json())

    threads = [threading.Thread(target=f) for f in (chat, stream, score)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    server.proc.wait(timeout=60)
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert set(results) == {"chat", "stream", "score"}
    for when, status, _ in results.values():
        assert status == 200
        assert when > signalled  # answered after the signal: it was in flight
    _, _, reply = results["chat"]
    assert reply["usage"]["completion_tokens"] == 16 or reply["choices"][0]["finish_reason"] == (
        "stop"
    )
    _, _, lines = results["stream"]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    _, _, scored = results["score"]
    want = ref_monitor.score([question], cache=False).row(0)
    assert scored["p_value"] == pytest.approx(want["p_value"])
    output = server.output()
    assert "Application shutdown complete" in output
    assert "Traceback" not in output
    ids, ok = audit_ids(server.audit)
    assert ok == "ok" and len(ids) == 3
    try:
        httpx.get(server.url + "/healthz", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.ConnectError:
        pass
