"""The official `openai` client against a `madlens serve` subprocess (API keys on): text
equal to Hugging Face's own generate, scores equal to the saved monitor's, the stream's
chunks, stop sequences, /v1/models, auth, /metrics and what the audit log keeps."""

import json
import sqlite3

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_support import KEYS, calm_prompts, flagged_prompt, reference_text

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def client(main_server):
    return openai.OpenAI(
        base_url=f"{main_server.url}/v1", api_key=KEYS["alice"], max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def assert_same_verdict(madlens, reference):
    """The server's verdict on one prompt equals the reference monitor's (`Scores.row`)."""
    for detector, value in reference["scores"].items():
        assert madlens["scores"][detector] == pytest.approx(value, rel=1e-5, abs=1e-6)
    for detector, value in reference["p_values"].items():
        assert madlens["p_values"][detector] == pytest.approx(value, abs=1e-9)
    assert madlens["p_value"] == pytest.approx(reference["p_value"], abs=1e-9)
    assert madlens["flagged"] == reference["flagged"]
    assert madlens["thresholds"] == pytest.approx(reference["thresholds"])
    assert madlens["fpr"] == reference["fpr"]
    assert madlens["top_hook"] == reference["top_hook"]


def test_chat_completion_matches_hf_generate_and_the_monitor(
    client, model_id, ref_hf, ref_monitor, sharp_dir
):
    prompts = calm_prompts(ref_monitor, 3)
    texts = set()
    for messages in prompts:
        reply = client.chat.completions.create(
            model=model_id, messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        want, n_prompt = reference_text(ref_hf, messages, MAX_TOKENS)
        choice = reply.choices[0]
        assert choice.message.content == want
        assert choice.message.role == "assistant"
        assert choice.finish_reason == (
            "length" if reply.usage.completion_tokens == MAX_TOKENS else "stop"
        )
        assert reply.usage.prompt_tokens == n_prompt
        assert reply.usage.total_tokens == n_prompt + reply.usage.completion_tokens
        assert reply.object == "chat.completion"
        assert reply.id.startswith("chatcmpl-")
        madlens = reply.model_extra["madlens"]
        assert_same_verdict(madlens, ref_monitor.score([messages], cache=False).row(0))
        assert madlens["policy"] == "flag" and madlens["blocked"] is False
        texts.add(want)
    assert len(texts) == len(prompts)  # the answers depend on the prompt
    assert model_id == str(sharp_dir)


def test_streaming_matches_the_plain_answer(client, model_id, ref_hf, ref_monitor):
    messages = calm_prompts(ref_monitor, 1)[0]
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    want, n_prompt = reference_text(ref_hf, messages, MAX_TOKENS)
    assert text == want
    assert len(with_choices) > 3  # streamed in pieces, not in one chunk
    assert with_choices[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    # the verdict comes with the first chunk, before any text
    assert_same_verdict(
        chunks[0].model_extra["madlens"], ref_monitor.score([messages], cache=False).row(0)
    )
    assert chunks[-1].usage.prompt_tokens == n_prompt


def test_seeded_sampling_matches_hf_sampling(client, model_id, ref_hf, ref_monitor):
    messages = calm_prompts(ref_monitor, 2)[1]
    answers = []
    for seed in (7, 8):
        reply = client.chat.completions.create(
            model=model_id, messages=messages, temperature=0.7, seed=seed, max_tokens=MAX_TOKENS
        )
        want, _ = reference_text(ref_hf, messages, MAX_TOKENS, seed=seed, temperature=0.7)
        assert reply.choices[0].message.content == want
        answers.append(want)
    assert answers[0] != answers[1]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_answer(client, model_id, ref_hf, ref_monitor, stream):
    messages = calm_prompts(ref_monitor, 1)[0]
    full, _ = reference_text(ref_hf, messages, MAX_TOKENS)
    clean = [i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, full
    stop = full[clean[len(clean) // 2] :][:2]
    want = full[: full.find(stop)]
    reply = client.chat.completions.create(
        model=model_id,
        messages=messages,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stop=[stop],
        stream=stream,
    )
    if stream:
        chunks = [c for c in reply if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == want
    assert finish == "stop"


def test_models_list(client, sharp_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(sharp_dir)]
    assert client.models.retrieve(str(sharp_dir)).id == str(sharp_dir)


def test_auth(main_server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{main_server.url}/v1/chat/completions"
    for headers in (
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": KEYS["bob"]},
        {"Authorization": f"Basic {KEYS['bob']}"},
    ):
        response = httpx.post(url, json=body, headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(
        base_url=f"{main_server.url}/v1", api_key="sk-alice-5a1f0c2e9b7d4e3X", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    response = httpx.post(
        url, json=body, headers={"Authorization": f"Bearer {KEYS['bob']}"}, timeout=30
    )
    assert response.status_code == 200
    assert httpx.get(f"{main_server.url}/healthz").status_code == 200  # open
    assert httpx.get(f"{main_server.url}/metrics").status_code == 200  # open
    # the audit log names the key by its id and never holds a key
    with sqlite3.connect(main_server.audit) as db:
        key_id = db.execute(
            "SELECT key_id FROM audit WHERE id = ?", [response.json()["id"]]
        ).fetchone()
    assert key_id == ("bob",)


def test_metrics_count_requests_and_flags(main_server, client, model_id, ref_monitor):
    def counts():
        text = httpx.get(f"{main_server.url}/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "madlens_requests_total":
                    out[(sample.labels["endpoint"], sample.labels["status"])] = sample.value
                if sample.name == "madlens_flagged_total":
                    out[("flagged", sample.labels["endpoint"])] = sample.value
                if sample.name == "madlens_request_seconds_count":
                    out[("seconds", sample.labels["endpoint"])] = sample.value
        return out

    before = counts()
    calm = calm_prompts(ref_monitor, 2)
    for messages in calm:
        client.chat.completions.create(model=model_id, messages=messages, max_tokens=2)
    score = httpx.post(
        f"{main_server.url}/v1/monitor/score",
        json={"messages": flagged_prompt(ref_monitor)},
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
        timeout=30,
    )
    assert score.status_code == 200 and score.json()["flagged"] is True
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=[], max_tokens=2)
    after = counts()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta(("/v1/chat/completions", "200")) == 2
    assert delta(("/v1/chat/completions", "400")) == 1
    assert delta(("/v1/monitor/score", "200")) == 1
    assert delta(("flagged", "/v1/monitor/score")) == 1
    assert delta(("flagged", "/v1/chat/completions")) == 0
    assert delta(("seconds", "/v1/chat/completions")) == 3


def test_score_endpoint_equals_the_monitor(main_server, ref_monitor):
    prompt = calm_prompts(ref_monitor, 1)[0]
    transcript = [*prompt, {"role": "assistant", "content": "Paris, I think."}]
    for messages in (prompt, transcript, flagged_prompt(ref_monitor)):
        response = httpx.post(
            f"{main_server.url}/v1/monitor/score",
            json={"messages": messages},
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
            timeout=30,
        )
        assert response.status_code == 200
        assert_same_verdict(response.json(), ref_monitor.score([messages], cache=False).row(0))


def test_the_log_and_the_audit_db_never_hold_a_key(main_server, model_id):
    url = f"{main_server.url}/v1/chat/completions"
    wrong = "sk-alice-5a1f0c2e9b7d4e3X"
    for i, key in enumerate([*KEYS.values(), wrong]):
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": f"q{i}"}],
            "max_tokens": 2,
        }
        response = httpx.post(
            url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert response.status_code == (401 if key == wrong else 200)
    with sqlite3.connect(main_server.audit) as db:
        rows = db.execute("SELECT key_id, text FROM audit").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert {"alice", "bob"} <= {r[0] for r in rows} <= {"alice", "bob"}
    assert all(r[1] is not None for r in rows)  # --log-text keeps the conversations
    assert any('"q0"' in r[1] for r in rows)
    blobs = [main_server.output().encode()]
    for suffix in ("", "-wal"):
        path = main_server.audit.with_name(main_server.audit.name + suffix)
        if path.exists():
            blobs.append(path.read_bytes())
    assert b"POST /v1/chat/completions" in blobs[0]  # the log is the server's access log
    for key in [*KEYS.values(), wrong]:
        assert all(key.encode() not in blob for blob in blobs)


def test_verdicts_in_the_audit_db(main_server, ref_monitor):
    flagged = flagged_prompt(ref_monitor)
    response = httpx.post(
        f"{main_server.url}/v1/monitor/score",
        json={"messages": flagged},
        headers={"Authorization": f"Bearer {KEYS['alice']}"},
        timeout=30,
    )
    reference = ref_monitor.score([flagged], cache=False).row(0)
    with sqlite3.connect(main_server.audit) as db:
        row = db.execute(
            "SELECT endpoint, key_id, scores, p_value, flagged, policy, blocked, status "
            "FROM audit WHERE id = ?",
            [response.json()["id"]],
        ).fetchone()
    endpoint, key_id, scores, p_value, flagged_col, policy, blocked, status = row
    assert (endpoint, key_id, policy, blocked, status) == (
        "/v1/monitor/score",
        "alice",
        "flag",
        0,
        200,
    )
    assert flagged_col == 1
    assert json.loads(scores)["mahalanobis"] == pytest.approx(
        reference["scores"]["mahalanobis"], rel=1e-5
    )
    assert p_value == pytest.approx(reference["p_value"])
    assert np.isfinite(p_value)
