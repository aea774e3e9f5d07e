"""Bad input gets a 4xx with OpenAI's error object naming the field, case by case."""

import json

import pytest
from fastapi.testclient import TestClient
from serve_support import calm_prompts

from madlens.monitor import Monitor
from madlens.serve.app import ServeOptions, create_app

HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(monitor_dir, tmp_path_factory):
    options = ServeOptions(
        audit_db=tmp_path_factory.mktemp("errors") / "audit.db",
        max_messages=6,
        max_body_bytes=4096,
        default_max_tokens=3,
    )
    app = create_app(Monitor.load(monitor_dir, progress=False), options)
    with TestClient(app) as client:
        yield client


def post(client, body, path="/v1/chat/completions", headers=JSON):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers=headers)


CASES = [  # (body, status, param, code)
    (b"{", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_body"),
    (b'"messages"', 400, None, "invalid_body"),
    ({}, 400, "messages", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": {"role": "user"}}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", None),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content[0].type",
        "invalid_value",
    ),
    ({"messages": [*HI, "x"]}, 400, "messages[1]", "invalid_value"),
    ({"messages": HI * 7}, 400, "messages", "too_many_messages"),
    ({"messages": HI, "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ({"messages": HI, "max_tokens": 2.5}, 400, "max_tokens", "invalid_value"),
    ({"messages": HI, "max_tokens": True}, 400, "max_tokens", "invalid_value"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"messages": HI, "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ({"messages": HI, "max_tokens": 10**40}, 400, "max_tokens", "invalid_value"),
    ({"messages": HI, "max_tokens": 250}, 400, "max_tokens", "context_length_exceeded"),
    (
        {"messages": HI, "max_completion_tokens": 250},
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    ({"messages": HI, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    (
        b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
        400,
        "temperature",
        "invalid_value",
    ),
    (b'{"messages": [{"role": "user", "content": "a"}], "top_p": Infinity}', 400, "top_p", None),
    ({"messages": HI, "top_p": -0.1}, 400, "top_p", "invalid_value"),
    ({"messages": HI, "n": 2}, 400, "n", "unsupported_value"),
    ({"messages": HI, "n": 0}, 400, "n", "invalid_value"),
    ({"messages": HI, "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"messages": HI, "stream_options": []}, 400, "stream_options", "invalid_value"),
    ({"messages": HI, "seed": 2**64}, 400, "seed", "invalid_value"),
    ({"messages": HI, "stop": ""}, 400, "stop", "invalid_value"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"messages": HI, "stop": 7}, 400, "stop", "invalid_value"),
    ({"messages": HI, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": HI, "model": 4}, 400, "model", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content", None),
    (
        {"messages": [{"role": "user", "content": "a" * 300}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        {"messages": [{"role": "user", "content": "a" * 300}], "stream": True},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (b"\xff\xfe{}", 400, None, None),
    (b"[" * 3000, 400, None, None),
]


@pytest.mark.parametrize("body, status, param, code", CASES)
def test_bad_chat_request(client, body, status, param, code):
    response = post(client, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]


def test_unknown_fields_are_ignored_and_content_parts_are_read(client, ref_monitor):
    messages = calm_prompts(ref_monitor, 1)[0]
    text = messages[0]["content"]
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": text[:5]}, {"type": "text", "text": text[5:]}],
        }
    ]
    plain = post(client, {"messages": messages, "max_tokens": 3, "temperature": 0})
    odd = post(
        client,
        {
            "messages": parts,
            "max_tokens": 3,
            "temperature": 0,
            "logit_bias": {},
            "user": "u1",
            "frobnicate": [1, {"x": None}],
            "tools": [],
        },
    )
    assert plain.status_code == odd.status_code == 200
    assert odd.json()["madlens"]["scores"] == plain.json()["madlens"]["scores"]
    assert odd.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_body_size_limit(client):
    big = json.dumps({"messages": [{"role": "user", "content": "a" * 5000}]}).encode()
    response = post(client, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    chunked = client.post(
        "/v1/chat/completions", content=iter([big[:3000], big[3000:]]), headers=JSON
    )
    assert chunked.status_code == 413
    assert post(client, big, path="/v1/monitor/score").status_code == 413


def test_score_endpoint_bad_input(client):
    assert post(client, {"messages": []}, "/v1/monitor/score").json()["error"]["param"] == (
        "messages"
    )
    long = {"messages": [{"role": "user", "content": "b" * 400}]}
    response = post(client, long, "/v1/monitor/score")
    assert (response.status_code, response.json()["error"]["code"]) == (
        400,
        "context_length_exceeded",
    )


def test_paths_methods_and_content_types(client):
    for method, path, status in [
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/nope", 404),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/models/x", 404),
        ("POST", "/healthz", 405),
    ]:
        response = client.request(method, path)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    body = json.dumps({"messages": HI, "max_tokens": 1}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = post(client, body, headers={"content-type": content_type})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_body"
