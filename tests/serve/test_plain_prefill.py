"""A monitor that reads only residual-stream hooks is served from the plain Hugging Face
forward's hidden states (no TransformerLens bridge in the serving path): its verdicts equal
`Monitor.score` (which reads the bridge), and greedy answers equal HF `generate`."""

import pytest
import torch
from fastapi.testclient import TestClient
from serve_support import trusted_prompts

from madlens.data import format_chat
from madlens.monitor import Monitor
from madlens.serve.app import ServeOptions, create_app
from madlens.serve.engine import residual_layers

PROMPTS = ["Name a colour.", "zq zq zq ## !!", "What is the capital of France, and why?"]


def test_which_hooks_the_plain_forward_reads():
    assert residual_layers(["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"], 5) == [0, 3]
    assert residual_layers(["blocks.4.hook_resid_post"], 5) is None  # after the final norm
    assert residual_layers(["blocks.0.hook_mlp_out"], 5) is None
    assert residual_layers([], 5) is None


def test_residual_monitor_is_served_without_the_bridge(sharp_dir, tmp_path):
    monitor = Monitor(str(sharp_dir), hooks=[0], detectors=["mahalanobis", "knn"],
                      dtype="float32", device="cpu", progress=False)  # fmt: skip
    monitor.fit(trusted_prompts()).calibrate(fpr=0.1)
    monitor.save(tmp_path / "mon")
    reference = Monitor.load(tmp_path / "mon", device="cpu", progress=False)
    served = Monitor.load(tmp_path / "mon", device="cpu", progress=False)
    model = served.model

    def no_bridge(*args, **kwargs):
        raise AssertionError("the bridge ran in the serving path")

    app = create_app(served, ServeOptions(audit_db=tmp_path / "audit.db"))
    with TestClient(app) as client:
        model.bridge.run_with_hooks = no_bridge
        for text in PROMPTS:
            messages = [{"role": "user", "content": text}]
            body = {"model": model.name, "messages": messages, "max_tokens": 6, "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            scored = client.post("/v1/monitor/score", json={"messages": messages}).json()
            expected = reference.score([messages], cache=False).row(0)
            for verdict in (reply.json()["madlens"], scored):
                for name, value in expected["scores"].items():
                    assert verdict["scores"][name] == pytest.approx(value, rel=1e-4, abs=1e-5)
                assert verdict["flagged"] == expected["flagged"]
            ids = model.tokenizer(format_chat(model.tokenizer, messages), return_tensors="pt")
            with torch.inference_mode():
                out = model.hf_model.generate(**ids, max_new_tokens=6, do_sample=False,
                                              eos_token_id=None, pad_token_id=2)  # fmt: skip
            answer = model.tokenizer.decode(out[0, ids["input_ids"].shape[1] :],
                                            skip_special_tokens=True)  # fmt: skip
            assert reply.json()["choices"][0]["message"]["content"] == answer
