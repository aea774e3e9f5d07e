"""The engine in this process: the block policy (no generation for a flagged prompt),
batched requests equal to the same requests one at a time, and monitors that read the answer
(position `mean`), scored on the transcript after generating."""

import json
import sqlite3
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serve_support import calm_prompts, flagged_prompt, reference_text, running

from madlens.errors import MadlensError
from madlens.monitor import Monitor
from madlens.serve.app import ServeOptions, create_app
from madlens.serve.engine import REFUSAL, choose_token


def counting_forward(monkeypatch, model):
    """Count calls of the plain HF model's forward: the decode steps (the prefill pass runs
    through the TransformerLens bridge, a separate module over the same weights)."""
    calls = []
    original = model.hf_model.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.hf_model, "forward", forward)
    return calls


def test_block_policy_refuses_a_flagged_prompt_without_generating(
    monitor_dir, ref_monitor, ref_hf, tmp_path, monkeypatch
):
    audit = tmp_path / "audit.db"
    monitor = Monitor.load(monitor_dir, progress=False)
    app = create_app(monitor, ServeOptions(policy="block", audit_db=audit))
    calls = counting_forward(monkeypatch, monitor.model)
    flagged = flagged_prompt(ref_monitor)
    calm = calm_prompts(ref_monitor, 1)[0]
    with TestClient(app) as client:
        body = {"messages": flagged, "max_tokens": 8, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert calls == []
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "content_filter"
        assert choice["message"]["content"] == REFUSAL
        assert reply["usage"]["completion_tokens"] == 0
        assert reply["madlens"]["flagged"] is True and reply["madlens"]["blocked"] is True
        assert reply["madlens"]["p_value"] == pytest.approx(
            float(ref_monitor.score([flagged], cache=False).combined_p[0])
        )
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert calls == []
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == REFUSAL
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert chunks[0]["madlens"]["blocked"] is True
        # a prompt the monitor does not flag is answered as usual
        reply = client.post("/v1/chat/completions", json={**body, "messages": calm}).json()
        assert len(calls) == 7  # 8 tokens: the first from the prefill, then 7 decode steps
        assert reply["madlens"]["blocked"] is False
        assert reply["choices"][0]["message"]["content"] == reference_text(ref_hf, calm, 8)[0]
        ids = [reply["id"]]
    with sqlite3.connect(audit) as db:
        rows = db.execute("SELECT id, flagged, blocked, policy FROM audit ORDER BY time").fetchall()
    assert [r[1:] for r in rows] == [(1, 1, "block"), (1, 1, "block"), (0, 0, "block")]
    assert rows[-1][0] == ids[0]


def _post_all(url, requests, concurrent):
    """POST each (path, body); all at once from threads, or one after another."""
    results = [None] * len(requests)

    def send(i):
        path, body = requests[i]
        if body.get("stream"):
            with httpx.stream("POST", url + path, json=body, timeout=120) as response:
                lines = [ln for ln in response.iter_lines() if ln.startswith("data: {")]
            chunks = [json.loads(ln[6:]) for ln in lines]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            results[i] = {"text": text, "madlens": chunks[0]["madlens"]}
            return
        reply = httpx.post(url + path, json=body, timeout=120).json()
        if "choices" in reply:
            results[i] = {
                "text": reply["choices"][0]["message"]["content"],
                "madlens": reply["madlens"],
            }
        else:
            results[i] = {"text": None, "madlens": reply}

    if concurrent:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    else:
        for i in range(len(requests)):
            send(i)
    return results


def _batch_sizes(url):
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "madlens_prefill_batch_size":
            values = {s.name: s.value for s in family.samples if not s.labels.get("le")}
            buckets = {s.labels["le"]: s.value for s in family.samples if s.labels.get("le")}
            return (
                values["madlens_prefill_batch_size_count"],
                values["madlens_prefill_batch_size_sum"],
                buckets,
            )
    raise AssertionError("no madlens_prefill_batch_size in /metrics")


def test_batched_requests_equal_unbatched(monitor_dir, ref_monitor, ref_hf, tmp_path):
    prompts = calm_prompts(ref_monitor, 4) + [flagged_prompt(ref_monitor)]
    requests = [
        ("/v1/chat/completions", {"messages": prompts[0], "max_tokens": 5, "temperature": 0}),
        ("/v1/chat/completions", {"messages": prompts[1], "max_tokens": 17, "temperature": 0}),
        (
            "/v1/chat/completions",
            {"messages": prompts[2], "max_tokens": 12, "temperature": 0.8, "seed": 3},
        ),
        (
            "/v1/chat/completions",
            {"messages": prompts[3], "max_tokens": 9, "temperature": 0, "stream": True},
        ),
        ("/v1/chat/completions", {"messages": prompts[4], "max_tokens": 11, "temperature": 0}),
        ("/v1/monitor/score", {"messages": prompts[1]}),
        (
            "/v1/chat/completions",
            {
                "messages": prompts[0],
                "max_tokens": 14,
                "temperature": 0.5,
                "top_p": 0.9,
                "seed": 11,
            },
        ),
    ]
    options = ServeOptions(audit_db=tmp_path / "audit.db", max_batch=8, batch_wait_ms=500)
    app = create_app(Monitor.load(monitor_dir, progress=False), options)
    with running(app) as server:
        batched = _post_all(server.url, requests, concurrent=True)
        count, total, buckets = _batch_sizes(server.url)
        assert total == len(requests)
        assert count < len(requests)  # some prefill passes took several requests
        assert buckets["1.0"] < count
        alone = _post_all(server.url, requests, concurrent=False)
        count_after, total_after, _ = _batch_sizes(server.url)
        assert (count_after - count, total_after - total) == (len(requests), len(requests))
    for (_, body), b, a in zip(requests, batched, alone):
        assert b["text"] == a["text"]
        reference = ref_monitor.score([body["messages"]], cache=False).row(0)
        for got in (b["madlens"], a["madlens"]):
            score = got["scores"]["mahalanobis"]
            assert score == pytest.approx(reference["scores"]["mahalanobis"], rel=1e-5)
            assert got["flagged"] == reference["flagged"]
        assert b["madlens"]["scores"]["mahalanobis"] == pytest.approx(
            a["madlens"]["scores"]["mahalanobis"], rel=1e-5
        )
        if body.get("temperature") == 0:
            want, _ = reference_text(ref_hf, body["messages"], body["max_tokens"])
            assert b["text"] == want
    assert batched[4]["madlens"]["flagged"] is True


def test_a_monitor_of_answers_scores_the_transcript(mean_monitor_dir, ref_monitor, tmp_path):
    ref = Monitor.load(mean_monitor_dir, progress=False)
    monitor = Monitor.load(mean_monitor_dir, progress=False)
    with pytest.raises(MadlensError, match="policy block"):
        create_app(monitor, ServeOptions(policy="block", audit_db=tmp_path / "a.db"))
    app = create_app(monitor, ServeOptions(audit_db=tmp_path / "audit.db"))
    prompt = calm_prompts(ref_monitor, 1)[0]
    with TestClient(app) as client:
        body = {"messages": prompt, "max_tokens": 10, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body).json()
        answer = reply["choices"][0]["message"]["content"]
        transcript = [*prompt, {"role": "assistant", "content": answer}]
        want = ref.score([transcript], cache=False).row(0)
        assert reply["madlens"]["scores"]["mahalanobis"] == pytest.approx(
            want["scores"]["mahalanobis"], rel=1e-5
        )
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        assert "madlens" not in chunks[0]  # the verdict needs the answer: it comes last
        assert chunks[-1]["madlens"]["scores"]["mahalanobis"] == pytest.approx(
            want["scores"]["mahalanobis"], rel=1e-5
        )
        scored = client.post("/v1/monitor/score", json={"messages": transcript}).json()
        assert scored["p_value"] == pytest.approx(want["p_value"])
        refused = client.post("/v1/monitor/score", json={"messages": prompt})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "messages[0].role"
    with sqlite3.connect(tmp_path / "audit.db") as db:
        (n,) = db.execute("SELECT count(*) FROM audit WHERE status = 200").fetchone()
    assert n == 3


def test_sampling_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    picks = {choose_token(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {0}  # token 0 alone holds over half the mass
    draws = [choose_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(3000)]
    assert set(draws) == {0, 1, 2, 3, 4}
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert np.abs(freq - torch.softmax(logits, -1).numpy()).max() < 0.03
    assert choose_token(logits, 0, 1.0, None) == 0
