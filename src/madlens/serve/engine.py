"""The serving engine: one worker thread owns the model (torch forwards are not run
concurrently), batches requests for the prefill forward pass, scores them from that same
pass, writes the audit record and decodes.

Batching: the worker waits for a first request, then collects more for at most
`batch_wait_ms` (or until `max_batch`), and runs one left-padded `activations.prefill` over
them: the activations the monitor reads and the KV cache generation continues from come out
of one forward pass. The batch's rows then decode together, token by token, from that cache
(`Model.hf_model`, explicit position ids for the left padding), each with its own
`max_tokens`, temperature, top_p and seeded `torch.Generator`; a finished row is dropped from
the batch. Requests that arrive while a batch decodes are prefilled as a new batch (a
*cohort*) between two decode steps, so a score or a verdict never waits for another
request's answer, and the cohorts then take decode steps in turn.

Each request gets its events (`Verdict`, `Delta`, `Done`, `Failed`) through `Job.emit`,
which the app points at an asyncio queue (`loop.call_soon_threadsafe`).

The audit record is written by this thread, committed, before the event that lets the
response go: a streamed completion's at its verdict (before the first byte), any other
request's when it is done (before the response).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from madlens.activations import Activations, prefill
from madlens.data import format_chat
from madlens.errors import MadlensError

log = logging.getLogger("madlens.serve")

REFUSAL = "I can't help with that request: the safety monitor flagged it."
CHAT = "/v1/chat/completions"
SCORE = "/v1/monitor/score"
DEFAULT_MAX_TOKENS = 512  # when a request names no max_tokens (OpenAI: up to the context)
MODES = ("prefill", "prompt", "transcript", "off")


# --- events ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    """The monitor's verdict on a prompt (None when it is given at the end), known after
    the prefill pass; a streamed response starts here."""

    madlens: dict[str, Any] | None
    prompt_tokens: int


@dataclass
class Delta:
    """New answer text for a streamed completion."""

    text: str


@dataclass
class Done:
    """The request's end: the answer (empty for a score), why it stopped and the verdict."""

    finish_reason: str | None
    text: str
    prompt_tokens: int
    completion_tokens: int
    madlens: dict[str, Any] | None


@dataclass
class Failed:
    """The request failed: an HTTP status and OpenAI's error fields."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    kind: str = "invalid_request_error"


Event = Verdict | Delta | Done | Failed


class JobError(Exception):
    """A request the engine refuses (reported to its client as `Failed`)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.failed = Failed(status, message, param, code)


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)
class Job:
    """One request for the engine. `emit` must be safe to call from the worker thread."""

    id: str
    endpoint: str
    messages: list[dict[str, str]]
    emit: Callable[[Event], None]
    generate: bool = True
    stream: bool = False
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    key_id: str | None = None
    created: float = field(default_factory=time.time)
    start: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # set by the engine
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    prefill_input: Any = field(default=None, repr=False)
    budget: int = 0
    madlens: dict[str, Any] | None = None
    audited: bool = False


def scoring_mode(monitor: Any) -> str:
    """How the server scores a chat completion: `prefill` (from the prompt's prefill pass:
    position `last`, detectors that read activations or outputs), `prompt` (the prompt, by
    `Monitor.score`, before decoding: position `last` with a transcript detector) or
    `transcript` (prompt and answer after generating: position `mean`)."""
    if monitor.position != "last":
        return "transcript"
    return "prompt" if "transcripts" in monitor.reads else "prefill"


def residual_layers(hooks: list[str], n_layers: int) -> list[int] | None:
    """The block numbers of `hooks` when every one is a `blocks.L.hook_resid_post` that a
    plain Hugging Face forward returns as a hidden state (every block but the last, whose
    hidden state comes after the final norm); None otherwise (the bridge reads them)."""
    layers = []
    for hook in hooks:
        found = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
        if found is None or int(found[1]) >= n_layers - 1:
            return None
        layers.append(int(found[1]))
    return layers or None


# --- per-row decoding state --------------------------------------------------------------------


@dataclass(eq=False)
class _Row:
    job: Job
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    count: int = 0  # tokens generated, end-of-sequence included
    text: str = ""
    sent: str = ""
    finish: str | None = None


@dataclass(eq=False)
class _Cohort:
    rows: list[_Row]
    mask: torch.Tensor
    logits: torch.Tensor  # (rows, vocab): each row's next-token logits, float32 on the host
    cache: Any


def choose_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """The next token from one row's logits: greedy at temperature 0, else sampled after
    temperature and nucleus (top-p) filtering, as Hugging Face's sampling does them."""
    if temperature == 0 or generator is None:
        return int(logits.argmax())
    scores = logits.float() / temperature
    if top_p < 1:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[-1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -math.inf)
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` a stream must hold back: an incomplete UTF-8
    character (decoded as U+FFFD) and the start of a stop sequence."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    keep = len(text) - end
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), longest, -1):
            if text[end - k : end] == stop[:k]:
                longest = k
                break
    return keep + longest


class Engine:
    """The worker that owns the model. `start` it, `submit` jobs from any thread, `stop`
    it (it finishes every job it took first)."""

    def __init__(
        self,
        monitor: Any,
        *,
        scoring: bool = True,
        policy: str = "flag",
        audit_path: str | Path | None = None,
        log_text: bool = False,
        max_batch: int = 8,
        batch_wait_ms: float = 5.0,
        max_active: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        metrics: Any = None,
    ) -> None:
        self.monitor = monitor
        self.model = monitor.model
        self.mode = scoring_mode(monitor) if scoring else "off"
        self.policy = policy
        self.audit_path = None if audit_path is None else Path(audit_path)
        self.log_text = log_text
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self.max_active = max_active or 4 * max_batch
        self.default_max_tokens = default_max_tokens
        self.metrics = metrics
        tokenizer = self.model.tokenizer
        config_eos = getattr(self.model.hf_model.generation_config, "eos_token_id", None)
        eos = {tokenizer.eos_token_id}
        eos.update(config_eos if isinstance(config_eos, list) else [config_eos])
        self.eos = {int(t) for t in eos if t is not None}
        params = inspect.signature(self.model.hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._startup_error: BaseException | None = None
        self._audit: Any = None
        self.failure: str | None = None  # why the worker died, if it did
        self.active_rows = 0

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and wait until it has opened the audit log. A stopped engine
        starts again (an app's lifespan may run more than once, as under test clients)."""
        with self._lock:
            restart = self._thread is not None and not self._thread.is_alive()
            if restart and self._stopping.is_set() and self.failure is None:
                self._stopping.clear()
                self._ready.clear()
                self._startup_error = None
                self._thread = None
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="madlens-engine", daemon=True
                )
                self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def submit(self, job: Job) -> None:
        """Queue a job (starting the worker if nothing started it); raises `EngineStopped`
        once `stop` was called."""
        if self._thread is None:
            self.start()
        with self._lock:
            if self._stopping.is_set() or self.failure is not None:
                raise EngineStopped()
            self._queue.put(job)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued and running ones, then end the worker."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        return self._queue.qsize()

    # --- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.audit_path is not None:
                from madlens.serve.audit import AuditLog

                self._audit = AuditLog(self.audit_path)
            if self.mode == "prefill":
                self._check_cache()
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        active: list[_Cohort] = []
        try:
            while True:
                jobs = self._take(wait=not active)
                if jobs is None:
                    break
                if jobs:
                    active.extend(self._begin(jobs))
                for cohort in active:
                    self._advance(cohort)
                active = [c for c in active if any(r.finish is None for r in c.rows)]
                self.active_rows = sum(len(c.rows) for c in active)
        except BaseException as exc:  # noqa: BLE001 - the worker must not die silently
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("madlens serve: the engine stopped: %s", self.failure)
            for cohort in active:
                for row in cohort.rows:
                    if row.finish is None:
                        self._fail(row.job, Failed(500, "internal error", kind="server_error"))
            stopped = Failed(503, "the engine stopped", None, "unavailable", "server_error")
            while not self._queue.empty():
                self._fail(self._queue.get_nowait(), stopped)
        finally:
            if self._audit is not None:
                self._audit.close()

    def _check_cache(self) -> None:
        """The prefill pass must hand back a filled KV cache (`activations.prefill`)."""
        _, state = prefill(self.model, ["ok"], [], "last")
        width = state.input_ids.shape[1]
        if state.kv_cache is None or state.kv_cache.get_seq_length() != width:
            raise MadlensError(
                "the model's prefill pass returned no KV cache to generate from (a "
                "TransformerLens / transformers version mismatch)"
            )

    def _take(self, wait: bool) -> list[Job] | None:
        """The next batch of jobs: when idle, block for one and collect more for at most
        `batch_wait`; while decoding, whatever is queued. None: stopping and nothing left."""
        room = min(self.max_batch, self.max_active - self.active_rows)
        jobs: list[Job] = []
        if room <= 0:
            return jobs
        if wait:
            while True:
                try:
                    jobs.append(self._queue.get(timeout=0.05))
                    break
                except queue.Empty:
                    with self._lock:
                        if self._stopping.is_set() and self._queue.empty():
                            return None
            deadline = time.monotonic() + self.batch_wait
            while len(jobs) < room:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        jobs.append(self._queue.get(timeout=remaining))
                    else:
                        jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        else:
            while len(jobs) < room:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        return [job for job in jobs if not job.cancelled]

    # --- a new batch: prepare, prefill, score, verdicts -----------------------------------------

    def _begin(self, jobs: list[Job]) -> list[_Cohort]:
        """Prefill and score a batch of new jobs, deliver their verdicts, and return the
        cohort of rows that go on to decode (none, or one)."""
        ready = []
        for job in jobs:
            try:
                self._prepare(job)
                ready.append(job)
            except JobError as exc:
                self._fail(job, exc.failed)
            except Exception as exc:  # noqa: BLE001 - the chat template or tokenizer refused it
                if _is_input_error(exc):
                    self._fail(job, Failed(400, f"messages: {exc}", "messages", "invalid_value"))
                else:
                    log.exception("madlens serve: preparing a request failed")
                    self._fail(job, Failed(500, f"internal error ({type(exc).__name__})",
                                           kind="server_error"))  # fmt: skip
        if not ready:
            return []
        try:
            scored = self._prefill_and_score(ready)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the server
            if len(ready) > 1:
                # each job on its own, so that one cannot fail the others
                return [c for job in ready for c in self._begin([job])]
            if isinstance(exc, MadlensError):
                self._fail(ready[0], Failed(400, str(exc), "messages"))
            else:
                log.exception("madlens serve: a batch failed")
                self._fail(ready[0], Failed(500, f"internal error ({type(exc).__name__})",
                                            kind="server_error"))  # fmt: skip
            return []
        try:
            cohort = self._deliver(ready, *scored)
        except Exception as exc:  # noqa: BLE001 - a bug here fails this batch, not the server
            log.exception("madlens serve: delivering a batch failed")
            for job in ready:
                self._fail(job, Failed(500, f"internal error ({type(exc).__name__})",
                                       kind="server_error"))  # fmt: skip
            return []
        return [] if cohort is None else [cohort]

    def _prepare(self, job: Job) -> None:
        """Check one job against the model (context length, what the monitor can score)
        and tokenise its prompt."""
        model = self.model
        tokenizer = model.tokenizer
        messages = job.messages
        last = messages[-1]
        if not job.generate:
            if self.mode == "off":
                raise JobError(
                    503, "the server runs without a monitor (--no-monitor)", None, "unavailable"
                )
            if self.mode == "transcript":
                if last["role"] != "assistant":
                    raise JobError(
                        400,
                        f"this monitor reads the answer (position '{self.monitor.position}'): "
                        "the last message must be the assistant's",
                        f"messages[{len(messages) - 1}].role",
                    )
                if not last["content"]:
                    raise JobError(400, "the assistant's answer is empty: nothing to score",
                                   f"messages[{len(messages) - 1}].content")  # fmt: skip
            text = format_chat(tokenizer, messages)
            job.prefill_input = messages
        elif last["role"] == "assistant":
            # the model answers in a new assistant turn after the conversation
            text = format_chat(tokenizer, messages, add_generation_prompt=True)
            job.prefill_input = text
        else:
            text = format_chat(tokenizer, messages)
            job.prefill_input = messages
        job.prompt_ids = list(tokenizer(text)["input_ids"])
        n, n_ctx = len(job.prompt_ids), model.n_ctx
        if not n:
            raise JobError(400, "the conversation is empty after tokenisation", "messages")
        if not job.generate:
            if n > n_ctx:
                message = f"the conversation is {n} tokens; {model.name} reads at most {n_ctx}"
                raise JobError(400, message, "messages", "context_length_exceeded")
            return
        if n >= n_ctx:
            message = (
                f"the conversation is {n} tokens; {model.name} reads at most {n_ctx}, "
                "answer included"
            )
            raise JobError(400, message, "messages", "context_length_exceeded")
        room = n_ctx - n
        if job.max_tokens is not None:
            if job.max_tokens > room:
                raise JobError(
                    400,
                    f"{job.max_tokens_param} is {job.max_tokens}, but the conversation takes "
                    f"{n} of {model.name}'s {n_ctx} tokens: at most {room} remain",
                    job.max_tokens_param,
                    "context_length_exceeded",
                )
            job.budget = job.max_tokens
        else:
            job.budget = min(self.default_max_tokens, room)

    def _prefill_and_score(
        self, jobs: list[Job]
    ) -> tuple[list[dict[str, Any] | None], tuple[torch.Tensor, torch.Tensor, Any] | None]:
        """The batch's verdict rows (None where the monitor gives none now) and the prefill
        state generation continues from (mask, next-token logits, KV cache)."""
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(jobs))
        monitor = self.monitor
        state = None
        rows: list[dict[str, Any] | None] = [None] * len(jobs)
        if self.mode == "prefill":
            reads = monitor.reads
            hooks = monitor.hooks if "activations" in reads else []
            outputs = "outputs" in reads
            layers = None if outputs else residual_layers(hooks, self.model.n_layers)
            if layers is not None:
                # Residual-stream hooks are the plain model's hidden states: the same pass,
                # without the bridge's hook points on every submodule.
                mask, last_logits, cache, hidden = self._plain_prefill(
                    [job.prompt_ids for job in jobs], layers
                )
                acts = Activations(acts=dict(zip(hooks, hidden, strict=True)),
                                   lengths=np.ones(len(jobs), dtype=np.int64),
                                   position="last")  # fmt: skip
                rows = monitor.score_features(monitor.features_from(acts)).rows()
                state = (mask, last_logits, cache)
            else:
                acts, pf = prefill(self.model, [job.prefill_input for job in jobs], hooks, "last",
                                   logits=outputs, logprobs=outputs, strict=True)  # fmt: skip
                rows = monitor.score_features(monitor.features_from(acts)).rows()
                state = (pf.attention_mask, pf.logits[:, -1].float().cpu(), pf.kv_cache)
        else:
            scored = [i for i, job in enumerate(jobs) if not job.generate]
            if self.mode == "prompt":
                scored = list(range(len(jobs)))
            if scored:
                found = monitor.score([jobs[i].prefill_input for i in scored], cache=False)
                for i, row in zip(scored, found.rows()):
                    rows[i] = row
            decoding = [job for job in jobs if job.generate]
            if decoding:
                state = self._plain_prefill([job.prompt_ids for job in jobs])[:3]
        return rows, state

    def _deliver(
        self,
        jobs: list[Job],
        rows: list[dict[str, Any] | None],
        state: tuple[torch.Tensor, torch.Tensor, Any] | None,
    ) -> _Cohort | None:
        keep: list[int] = []
        for i, (job, row) in enumerate(zip(jobs, rows)):
            if self._verdict(job, row):
                keep.append(i)
        if not keep or state is None:
            return None
        mask, logits, cache = state
        if len(keep) < len(jobs):
            index = torch.tensor(keep, dtype=torch.long, device=mask.device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index.cpu()]
        decode_rows = [_Row(jobs[i], self._generator(jobs[i])) for i in keep]
        return _Cohort(decode_rows, mask, logits, cache)

    def _plain_prefill(
        self, prompts: list[list[int]], layers: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any, list[np.ndarray]]:
        """A left-padded prefill through the plain Hugging Face model (no hooks): for
        monitors that read only residual-stream hooks (`layers`: the last token's output of
        each of these blocks, as float32 host arrays), for monitors that do not read this
        pass, and for the unmonitored baseline."""
        width = max(len(p) for p in prompts)
        pad = self.model.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        device = self._device()
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        with torch.inference_mode():
            out = self.model.hf_model(input_ids=ids, attention_mask=mask,
                                      position_ids=positions, use_cache=True,
                                      output_hidden_states=bool(layers))  # fmt: skip
        # hidden_states[0] is the embeddings, so block L's output is hidden_states[L + 1]
        hidden = [out.hidden_states[layer + 1][:, -1].float().cpu().numpy()
                  for layer in layers or []]  # fmt: skip
        return mask, out.logits[:, -1].float().cpu(), _cache_of(out), hidden

    def _device(self) -> torch.device:
        return next(self.model.hf_model.parameters()).device

    def _generator(self, job: Job) -> torch.Generator | None:
        if job.temperature == 0:
            return None
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)

    def _verdict(self, job: Job, row: dict[str, Any] | None) -> bool:
        """Deliver a job's verdict after the prefill; True when it goes on to decode."""
        blocked = bool(
            job.generate and self.policy == "block" and row is not None and row.get("flagged")
        )
        if row is not None:
            job.madlens = finite({**row, "policy": self.policy, "blocked": blocked})
            if row.get("flagged") and self.metrics is not None:
                self.metrics.flagged.labels(job.endpoint).inc()
        prompt_tokens = len(job.prompt_ids)
        if not job.generate:
            if self._audited(job):
                job.emit(Done(None, "", prompt_tokens, 0, job.madlens))
            return False
        if blocked:
            if self.metrics is not None:
                self.metrics.blocked.inc()
            if self._audited(job):
                job.emit(Verdict(job.madlens, prompt_tokens))
                job.emit(Done("content_filter", REFUSAL, prompt_tokens, 0, job.madlens))
            return False
        if job.stream:
            if self.mode != "transcript" and not self._audited(job):
                return False
            job.emit(Verdict(job.madlens, prompt_tokens))
        return True

    # --- decoding ---------------------------------------------------------------------------------

    def _advance(self, cohort: _Cohort) -> None:
        """One decode step of a cohort: choose each row's next token, stream and finish
        rows, then run the rows still going through the model."""
        try:
            self._step(cohort)
        except Exception as exc:  # noqa: BLE001 - fail this cohort, keep serving
            log.exception("madlens serve: decoding failed")
            for row in cohort.rows:
                if row.finish is None:
                    row.finish = "error"
                    self._fail(row.job, Failed(500, f"internal error ({type(exc).__name__})",
                                               kind="server_error"))  # fmt: skip
            cohort.rows = []

    def _step(self, cohort: _Cohort) -> None:
        tokenizer = self.model.tokenizer
        n_ctx = self.model.n_ctx
        chosen: list[int] = []
        finished: list[_Row] = []
        for i, row in enumerate(cohort.rows):
            job = row.job
            if job.cancelled:
                row.finish = "cancelled"
                chosen.append(0)
                continue
            token = choose_token(cohort.logits[i], job.temperature, job.top_p, row.generator)
            chosen.append(token)
            row.count += 1
            if token in self.eos:
                row.finish = "stop"
            else:
                row.ids.append(token)
                row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
                if job.stop:
                    hits = [row.text.find(s) for s in job.stop]
                    hits = [h for h in hits if h >= 0]
                    if hits:
                        row.text = row.text[: min(hits)]
                        row.finish = "stop"
                if row.finish is None and (
                    row.count >= job.budget or len(job.prompt_ids) + row.count >= n_ctx
                ):
                    row.finish = "length"
            if job.stream:
                self._stream(row)
            if row.finish is not None:
                finished.append(row)
        if finished:
            self._finish(finished)
        keep = [i for i, row in enumerate(cohort.rows) if row.finish is None]
        if not keep:
            cohort.rows = [r for r in cohort.rows if r.finish is None]
            return
        if len(keep) < len(cohort.rows):
            index = torch.tensor(keep, dtype=torch.long, device=cohort.mask.device)
            cohort.cache.batch_select_indices(index)
            cohort.mask = cohort.mask[index]
            cohort.rows = [cohort.rows[i] for i in keep]
            chosen = [chosen[i] for i in keep]
        cohort.mask = torch.cat([cohort.mask, cohort.mask.new_ones((len(keep), 1))], dim=1)
        positions = cohort.mask.sum(1, keepdim=True) - 1
        with torch.inference_mode():
            out = self.model.hf_model(
                input_ids=torch.tensor(chosen, dtype=torch.long, device=cohort.mask.device)[
                    :, None
                ],
                attention_mask=cohort.mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cohort.cache},
            )
        cohort.cache = _cache_of(out)
        cohort.logits = out.logits[:, -1].float().cpu()  # sampled on the host, per row

    def _stream(self, row: _Row) -> None:
        text = row.text
        if row.finish is None:
            text = text[: len(text) - _held_back(text, row.job.stop)]
        if len(text) > len(row.sent) and text.startswith(row.sent):
            row.job.emit(Delta(text[len(row.sent) :]))
            row.sent = text

    def _finish(self, rows: list[_Row]) -> None:
        if self.metrics is not None:
            self.metrics.completion_tokens.inc(sum(r.count for r in rows))
        live = [r for r in rows if r.finish not in ("cancelled", "error")]
        if self.mode == "transcript" and live:
            self._score_answers(live)
        for row in live:
            job = row.job
            if not self._audited(job):
                continue
            job.emit(Done(row.finish, row.text, len(job.prompt_ids), row.count, job.madlens))

    def _score_answers(self, rows: list[_Row]) -> None:
        """Transcript mode: score each finished row's prompt and answer."""
        scorable = [r for r in rows if r.text.strip()]
        for row in rows:
            if row not in scorable:
                row.job.madlens = {"flagged": None, "policy": self.policy, "blocked": False,
                                   "error": "the answer is empty: nothing to score"}  # fmt: skip
        if not scorable:
            return
        transcripts = [
            [*r.job.messages, {"role": "assistant", "content": r.text}] for r in scorable
        ]
        try:
            found = self.monitor.score(transcripts, cache=False).rows()
        except MadlensError:
            found = []
            for transcript in transcripts:
                try:
                    found.append(self.monitor.score([transcript], cache=False).row(0))
                except MadlensError as exc:
                    found.append({"flagged": None, "error": str(exc)})
        for row, verdict in zip(scorable, found):
            row.job.madlens = finite({**verdict, "policy": self.policy, "blocked": False})
            if verdict.get("flagged") and self.metrics is not None:
                self.metrics.flagged.labels(row.job.endpoint).inc()

    # --- audit and failure ------------------------------------------------------------------------

    def _audited(self, job: Job, status: int = 200) -> bool:
        """Write and commit the job's audit record; on failure, fail the job (a response
        never leaves without its record)."""
        if self._audit is None or job.audited:
            job.audited = True
            return True
        from madlens.serve.audit import conversation_hash

        verdict = job.madlens or {}
        p_value = verdict.get("p_value")
        entry = {
            "id": job.id,
            "time": job.created,
            "endpoint": job.endpoint,
            "key_id": job.key_id,
            "conversation_sha256": conversation_hash(job.messages),
            "text": json.dumps(job.messages, ensure_ascii=False) if self.log_text else None,
            "scores": dict(verdict.get("scores") or {}),
            "p_value": None if p_value is None else float(p_value),
            "flagged": verdict.get("flagged"),
            "policy": self.policy if self.mode != "off" else "off",
            "blocked": bool(verdict.get("blocked", False)),
            "latency_ms": (time.perf_counter() - job.start) * 1000,
            "status": status,
        }
        try:
            self._audit.record(entry)
        except Exception as exc:  # noqa: BLE001 - fail closed: no record, no response
            log.error("madlens serve: audit write failed for %s: %s", job.id, exc)
            self._fail(job, Failed(500, "the audit log could not be written", None,
                                   "audit_failed", "server_error"))  # fmt: skip
            job.cancelled = True
            return False
        job.audited = True
        return True

    def _fail(self, job: Job, failed: Failed) -> None:
        job.emit(failed)


def _is_input_error(exc: Exception) -> bool:
    """Whether an exception from formatting or tokenising a conversation is about the
    conversation (a chat template that rejects it raises a jinja2 TemplateError)."""
    if isinstance(exc, ValueError | MadlensError):
        return True
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - transformers depends on jinja2
        return False
    return isinstance(exc, TemplateError)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
