"""Helpers of the `madlens serve` tests (a plain module, imported by the tests).

The served model is a *sharp* variant of tiny-test: the same random 2-layer Llama and
byte-level ChatML tokenizer, initialised with a larger weight scale (std 0.5 instead of
0.02) and saved as a local model dir. tiny-test's own weights are so small that its greedy
answer is one token repeated whatever the prompt, so "the server's text equals Hugging
Face's generate" would hold even if generation ignored the prompt (a KV cache left empty
does exactly that); the sharp model's answers depend on every prompt token.

References are independent of the code under test: the model dir read by plain
`transformers` (`AutoModelForCausalLM`, the tokenizer's own chat template), a monitor
loaded from the saved folder on its own (`Monitor.load(...).score`), sqlite3 for the audit
log and prometheus_client's parser for /metrics.
"""

import contextlib
import io
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"alice": "sk-alice-5a1f0c2e9b7d4e3f", "bob": "sk-bob-0e4c7a9d2b6f1e8a"}
READY_TIMEOUT_S = 300  # ~12 s on an idle 2-core machine; far more when it is shared


def build_sharp_model(path: Path) -> Path:
    """Save the sharp tiny Llama and tiny-test's tokenizer (with its chat template) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from madlens.models.tiny import N_CTX, SPECIAL_TOKENS, tiny_tokenizer

    config = LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + 256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=N_CTX,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def trusted_prompts(n: int = 160) -> list[list[dict]]:
    """`n` English questions as one-turn conversations, shuffled."""
    from madlens.data.generators import english_questions

    questions = english_questions(n, seed=0)
    random.Random(0).shuffle(questions)
    return [[{"role": "user", "content": q}] for q in questions]


def reference_text(ref_hf, messages, max_new_tokens, seed=None, temperature=0.0):
    """Hugging Face's own generate on the tokenizer's own chat template: greedy, or sampled
    from `torch.manual_seed(seed)` at `temperature` (no top-k / top-p). Returns the new
    text (special tokens dropped) and the prompt's token count."""
    model, tokenizer = ref_hf
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt")
    kwargs = {"do_sample": False}
    if temperature:
        torch.manual_seed(seed)
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=2, **kwargs)
    new = out[0, batch["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(batch["input_ids"][0])


def flagged_prompt(ref_monitor) -> list[dict]:
    """A prompt of random symbols, far from the trusted questions, that the reference
    monitor flags."""
    rng = random.Random(1)
    messages = [{"role": "user", "content": "".join(rng.choice("#@!%&*~^|") for _ in range(60))}]
    assert bool(ref_monitor.score([messages], cache=False).flagged[0])
    return messages


def calm_prompts(ref_monitor, n: int) -> list[list[dict]]:
    """Held-out questions (not in the trusted set) that the reference monitor does not flag."""
    from madlens.data.generators import english_questions

    trusted = {m[0]["content"] for m in trusted_prompts()}
    pool = [
        [{"role": "user", "content": q}] for q in english_questions(60, seed=5, exclude=trusted)
    ]
    flags = ref_monitor.score(pool, cache=False).flagged
    calm = [p for p, f in zip(pool, flags) if not f]
    assert len(calm) >= n
    return calm[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc=None, timeout: float = READY_TIMEOUT_S, log: Path | None = None):
    """Poll /healthz until it answers 200 (fail early if the process exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log else ""
            raise AssertionError(f"server exited with {proc.returncode}: {text[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    text = log.read_text(errors="replace")[-2000:] if log else ""
    raise AssertionError(f"server at {url} not ready after {timeout}s: {text}")


class ServerProcess:
    """`madlens serve --port P ARGS` as a real subprocess, its output in `log`."""

    def __init__(self, args: list[str], log: Path, audit: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.audit = audit
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from madlens.cli import main; main()",
                "serve",
                "--port",
                str(self.port),
                *args,
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def ready(self) -> "ServerProcess":
        wait_ready(self.url, self.proc, log=self.log)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._out.close()


class LiveServer:
    """An app under uvicorn in this process (see `running`)."""

    def __init__(self, url: str, app, log: io.StringIO, audit: Path | None) -> None:
        self.url, self.app, self.log, self.audit = url, app, log, audit

    def output(self) -> str:
        return self.log.getvalue()


@contextlib.contextmanager
def running(app, audit: Path | None = None):
    """An app under uvicorn in this process, on a free port, its log lines (uvicorn's
    access and error logs, madlens.serve's) kept in memory; yields a `LiveServer`."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", lifespan="on")
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "madlens.serve")]
    for logger in loggers:
        logger.addHandler(handler)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=60)
        yield LiveServer(url, app, log, audit)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        for logger in loggers:
            logger.removeHandler(handler)
        assert not thread.is_alive()
