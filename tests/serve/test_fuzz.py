"""Fuzzing the app: schemathesis from its own OpenAPI schema (valid and invalid requests for
every operation), and a seeded generator of 1,200 malformed requests. No response may be a
5xx, every error is OpenAI's error object, and /metrics (read with prometheus_client's
parser) counts no 5xx either: the catch-all 500 handler is never reached."""

import json
import random

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode

from madlens.monitor import Monitor
from madlens.serve.app import ServeOptions, create_app

MAX_BODY = 8192
N_MALFORMED = 1200
EXAMPLES = 25  # per operation and mode


@pytest.fixture(scope="module")
def fuzz_app(monitor_dir, tmp_path_factory):
    options = ServeOptions(
        audit_db=tmp_path_factory.mktemp("fuzz") / "audit.db",
        max_messages=32,
        max_body_bytes=MAX_BODY,
        default_max_tokens=4,
    )
    app = create_app(Monitor.load(monitor_dir, progress=False), options)
    with TestClient(app):  # runs the lifespan: the engine starts, and stops at the end
        yield app


def server_errors(app) -> float:
    # a TestClient outside `with` runs no lifespan, so the module's engine keeps running
    text = TestClient(app).get("/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "madlens_requests_total" and s.labels["status"].startswith("5")
    )


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    async def without_lifespan(scope, receive, send):
        # schemathesis's ASGI client runs the lifespan around every call; the module's
        # TestClient runs the app's own (the engine) once
        if scope["type"] == "lifespan":
            for reply in ("lifespan.startup.complete", "lifespan.shutdown.complete"):
                await receive()
                await send({"type": reply})
            return
        await fuzz_app(scope, receive, send)

    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan)


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (method, path, mode): an operation without a typed input (no body, a free string in
# the path) has no invalid requests to generate
OPERATIONS = [
    ("POST", "/v1/chat/completions", POSITIVE),
    ("POST", "/v1/chat/completions", NEGATIVE),
    ("POST", "/v1/monitor/score", POSITIVE),
    ("POST", "/v1/monitor/score", NEGATIVE),
    ("GET", "/v1/models/{model}", POSITIVE),
    ("GET", "/v1/models", POSITIVE),
    ("GET", "/healthz", POSITIVE),
    ("GET", "/metrics", POSITIVE),
]


@pytest.mark.parametrize("method, path, mode", OPERATIONS)
def test_schemathesis_no_server_errors(api_schema, fuzz_app, method, path, mode):
    operation = api_schema[path][method]
    seen = []

    @given(operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        response = case.call()
        seen.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    run()
    assert seen
    if mode == POSITIVE and method == "POST":
        assert 200 in seen  # valid requests were generated and answered


# --- a seeded generator of malformed requests -----------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "seed",
    "stop",
]


def junk_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(14)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**30, 7])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e308, -1e-300, 3.5, 2.0000001])
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(0, 20)))
    if kind == 5:
        return rng.choice(["user", "tool", "function", "", "USER", "assistant ", "developer"])
    if kind == 6 and depth < 3:
        return [junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 7 and depth < 3:
        return {
            rng.choice(FIELDS + ["role", "content", "x"]): junk_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))
        }
    if kind == 8:
        return [
            {
                "role": rng.choice(["user", "system", "assistant", "bot", 1]),
                "content": junk_value(rng, depth + 1) if depth < 2 else "x",
            }
            for _ in range(rng.randrange(0, 5))
        ]
    if kind == 9:
        return [{"type": rng.choice(["text", "image_url", 3]), "text": "abc"}]
    if kind == 10:
        return "\ud800" if rng.random() < 0.5 else "a\x00b"
    if kind == 11:
        return rng.choice([-5, 0, 1, 3, 250, 100000])
    if kind == 12:
        return "x" * rng.choice([1, 100, 300, 5000])
    return rng.choice(["NaN", "Infinity", "null", "[]", "{}"])


def malformed(rng: random.Random) -> tuple[str, str, dict, bytes | list[bytes]]:
    """(method, path, headers, body) of one malformed request; a list body is chunked."""
    path = rng.choice(["/v1/chat/completions"] * 6 + ["/v1/monitor/score"] * 3 + ["/v1/models"])
    headers = {"content-type": "application/json"}
    kind = rng.randrange(10)
    body_obj = json.loads(json.dumps(GOOD))
    if kind == 0:  # broken JSON: a valid body cut short, or with bytes flipped
        raw = json.dumps(body_obj).encode()
        if rng.random() < 0.5:
            raw = raw[: rng.randrange(len(raw))]
        else:
            raw = bytearray(raw)
            for _ in range(rng.randrange(1, 5)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(raw)
        return "POST", path, headers, raw
    if kind == 1:  # wrong types or values in one or more fields
        for _ in range(rng.randrange(1, 4)):
            body_obj[rng.choice(FIELDS)] = junk_value(rng)
        if rng.random() < 0.3:
            body_obj["max_tokens"] = rng.choice([1, 2, 3])
    elif kind == 2:  # unknown roles, odd messages
        body_obj["messages"] = (
            junk_value(rng)
            if rng.random() < 0.5
            else [{"role": rng.choice(["tool", "function", "bot", "", None]), "content": "x"}]
        )
    elif kind == 3:  # non-UTF-8 bytes, raw
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        return "POST", path, headers, raw
    elif kind == 4:  # deep nesting
        depth = rng.choice([50, 500, 5000])
        inner = "[" * depth + "]" * depth
        raw = ('{"messages": ' + inner + "}").encode()
        return "POST", path, headers, raw
    elif kind == 5:  # oversized, declared or chunked
        raw = json.dumps({"messages": [{"role": "user", "content": "y" * (MAX_BODY + 100)}]})
        if rng.random() < 0.5:
            return "POST", path, headers, raw.encode()
        cut = rng.randrange(1, len(raw))
        return "POST", path, headers, [raw[:cut].encode(), raw[cut:].encode()]
    elif kind == 6:  # NaN / Infinity literals and huge numbers, written raw
        field = rng.choice(["temperature", "top_p", "max_tokens", "seed", "n"])
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "-0"])
        raw = json.dumps(body_obj)[:-1] + f', "{field}": {literal}}}'
        return "POST", path, headers, raw.encode()
    elif kind == 7:  # wrong or missing content type, other methods
        headers = {
            "content-type": rng.choice(
                ["text/plain", "", "application/xml", "multipart/form-data; boundary=x"]
            )
        }
        method = rng.choice(["POST", "PUT", "GET", "DELETE", "PATCH"])
        return method, path, headers, json.dumps(body_obj).encode()
    elif kind == 8:  # many messages, long content, stop sequences
        n = rng.choice([0, 1, 33, 200])
        body_obj["messages"] = [{"role": "user", "content": "z" * rng.choice([0, 10, 400])}] * n
        body_obj["stop"] = junk_value(rng)
    else:  # valid JSON of the wrong shape
        return "POST", path, headers, json.dumps(junk_value(rng)).encode()
    try:
        raw = json.dumps(body_obj).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        raw = b"{"
    return "POST", path, headers, raw


def test_a_thousand_malformed_requests(fuzz_app):
    rng = random.Random(20240613)
    statuses: dict[int, int] = {}
    before = server_errors(fuzz_app)
    client = TestClient(fuzz_app)
    for _ in range(N_MALFORMED):
        method, path, headers, body = malformed(rng)
        content = iter(body) if isinstance(body, list) else body
        response = client.request(method, path, content=content, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (method, path, body[:200], response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["message"]
    assert sum(statuses.values()) == N_MALFORMED
    assert statuses.get(413, 0) > 50 and statuses.get(400, 0) > 500
    assert server_errors(fuzz_app) == before == 0


def test_the_catch_all_turns_a_bug_into_a_json_500(fuzz_app, monkeypatch):
    # the reference for "never reached" above: a handler that raises does produce a 500 JSON
    # (and the counter counts it), so zero 5xx means the fuzz never got there
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    before = server_errors(fuzz_app)
    monkeypatch.setattr(fuzz_app.state.engine, "submit", broken)
    response = TestClient(fuzz_app, raise_server_exceptions=False).post(
        "/v1/monitor/score", json=GOOD
    )
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "a bug" not in response.text
    assert server_errors(fuzz_app) == before + 1
