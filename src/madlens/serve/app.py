"""The FastAPI app of `madlens serve`: an OpenAI-compatible chat endpoint whose prompts the
monitor scores in their prefill pass, `/v1/monitor/score`, `/v1/models`, `/healthz` and
Prometheus `/metrics`.

Open without a key: `/healthz` (load balancers), `/metrics` (Prometheus scrapers, which
carry no OpenAI key; they show counts, never text) and `/openapi.json` (the API's shape).
Everything else needs a key when the server has any.

Every error is OpenAI's JSON error object, and client input never produces a 5xx: the body
is size-checked before it is parsed, validated field by field (`schemas`), and checked
against the model's context by the engine. Middleware, outermost first: telemetry (request
counts and latency; any exception left is a 500 JSON here), auth, the body-size limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from madlens import __version__
from madlens.errors import MadlensError
from madlens.serve.auth import ApiKeys
from madlens.serve.engine import (
    CHAT,
    DEFAULT_MAX_TOKENS,
    SCORE,
    Delta,
    Done,
    Engine,
    EngineStopped,
    Event,
    Failed,
    Job,
    Verdict,
    scoring_mode,
)
from madlens.serve.metrics import Metrics
from madlens.serve.schemas import (
    ChatCompletionRequest,
    ScoreRequest,
    error_body,
    param_of,
    plain_messages,
)

log = logging.getLogger("madlens.serve")

POLICIES = ("flag", "block")
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json"})
ENDPOINTS = frozenset({CHAT, SCORE, "/v1/models", "/healthz", "/metrics", "/openapi.json"})
LIMITS = {  # option: (least, most)
    "max_batch": (1, 256),
    "batch_wait_ms": (0, 1000),
    "max_body_bytes": (1024, 64 << 20),
    "max_messages": (1, 100_000),
    "default_max_tokens": (1, 1 << 20),
}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class ServeOptions:
    """What `madlens serve` takes besides the monitor.

    `scoring=False` (`--no-monitor`) serves the model without scoring anything: the
    baseline the benchmark measures the monitor's overhead against."""

    policy: str = "flag"
    keys: ApiKeys | None = None
    audit_db: Path | None = None
    log_text: bool = False
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    scoring: bool = True


def check_options(monitor: Any, options: ServeOptions) -> None:
    """Every reason the server cannot serve this monitor with these options, as one
    `MadlensError` line, before anything starts."""
    if options.policy not in POLICIES:
        raise MadlensError(f"--policy must be flag or block, not '{options.policy}'")
    for name, (least, most) in LIMITS.items():
        value = getattr(options, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (least <= value <= most)
        ):
            flag = "--" + name.replace("_", "-")
            raise MadlensError(f"{flag} must be between {least} and {most}, got {value!r}")
    if not monitor.fitted_:
        raise MadlensError("the monitor is not fitted: run madlens monitor fit first")
    if options.scoring and monitor.fpr_ is None:
        raise MadlensError(
            "the monitor is not calibrated (no false-positive rate): calibrate it "
            "(madlens monitor fit --fpr ...) before serving it"
        )
    if options.policy == "block" and options.scoring and scoring_mode(monitor) == "transcript":
        raise MadlensError(
            f"--policy block needs a verdict before the answer, but this monitor reads the "
            f"answer (position '{monitor.position}'): serve it with --policy flag"
        )
    if options.policy == "block" and not options.scoring:
        raise MadlensError("--policy block needs the monitor: drop --no-monitor")
    tokenizer = monitor.model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise MadlensError(f"{monitor.model.name} has no chat template: it cannot serve chat")


# --- plain ASGI middleware ---------------------------------------------------------------------


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()), *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def endpoint_label(path: str) -> str:
    """The metrics label of a path: a known endpoint, or `other` (never the raw path, so a
    scan of random paths cannot grow the label set)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class Telemetry:
    """Counts requests by endpoint and status, times them to the last byte, and turns an
    exception nothing else handled into a 500 JSON error."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_label(scope["path"])
        start = time.perf_counter()
        status = 500
        started = False

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:  # noqa: BLE001 - the last line: a JSON 500, never a traceback out
            log.exception("madlens serve: unhandled error on %s", endpoint)
            status = 500
            if not started:
                await _send_json(send, 500, _internal_error())
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class Auth:
    """Bearer keys: a request outside `OPEN_PATHS` needs one of the keys; the id of the key
    it used goes into `scope["state"]["key_id"]`."""

    def __init__(self, app: Any, keys: ApiKeys | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key_id = None
        if self.keys is not None and scope["path"] not in OPEN_PATHS:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            key_id = self.keys.check(header)
            if key_id is None:
                message = (
                    "missing API key: send 'Authorization: Bearer KEY'"
                    if header is None
                    else "invalid API key"
                )
                body = error_body(message, None, "invalid_api_key")
                await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
                return
        scope.setdefault("state", {})["key_id"] = key_id
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a body over `max_bytes` with 413 before anything parses it: by its
    Content-Length, or while reading a chunked body. The body read is replayed to the app."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = error_body(
            f"the request body is over the server's limit of {self.max_bytes} bytes",
            None, "request_too_large",
        )  # fmt: skip
        await _send_json(send, 413, body, [(b"connection", b"close")])


class JSON(JSONResponse):
    """JSON with non-ASCII characters escaped: any text a client sent (a model name in an
    error message, even a lone surrogate) renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")  # fmt: skip


def _internal_error() -> dict[str, Any]:
    return error_body("internal server error", None, "internal_error", "server_error")


# --- the app -----------------------------------------------------------------------------------


def create_app(monitor: Any, options: ServeOptions | None = None) -> FastAPI:
    """The server's ASGI app for a fitted, calibrated monitor (its model is loaded here).
    The engine starts with the app's lifespan (or on the first request) and drains and
    stops when the lifespan ends."""
    options = options or ServeOptions()
    check_options(monitor, options)
    model = monitor.model
    model_id = model.name
    fingerprint = f"madlens-{__version__}-{model.fingerprint}"
    metrics = Metrics()
    engine = Engine(
        monitor,
        scoring=options.scoring,
        policy=options.policy,
        audit_path=options.audit_db,
        log_text=options.log_text,
        max_batch=options.max_batch,
        batch_wait_ms=options.batch_wait_ms,
        default_max_tokens=options.default_max_tokens,
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(engine.start)
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(
        title="madlens serve",
        version=__version__,
        description="An OpenAI-compatible chat API whose prompts a madlens monitor scores.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        default_response_class=JSON,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.monitor = monitor
    app.state.options = options

    def error(status: int, message: str, param: str | None = None, code: str | None = None,
              kind: str = "invalid_request_error") -> JSON:  # fmt: skip
        return JSON(error_body(message, param, code, kind), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSON:
        problems = exc.errors()
        if not problems:
            return error(400, "invalid request body")
        # the most specific problem: in a union (`content`: a string or a list of parts)
        # the member that got furthest names the field best
        first = max(problems, key=lambda p: len(p.get("loc", ())))
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON", None, "invalid_json")
        param = param_of(first.get("loc", ()))
        if param is None:
            message = "the request body must be a JSON object (Content-Type: application/json)"
            return error(400, message, None, "invalid_body")
        text = str(first.get("msg", "invalid value"))
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return error(400, f"{param}: {text}{more}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSON:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}
        if exc.status_code == 400:
            detail = "the request body could not be read as JSON"
        response = error(exc.status_code, detail, None, codes.get(exc.status_code))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> JSON:
        log.error("madlens serve: unhandled %s on %s", type(exc).__name__, request.url.path)
        return JSON(_internal_error(), status_code=500)

    def check_model(name: str | None) -> JSON | None:
        if name is not None and name != model_id:
            return error(404, f"the model '{name}' is not served here; this server serves "
                              f"'{model_id}'", "model", "model_not_found")  # fmt: skip
        return None

    def check_messages(count: int) -> JSON | None:
        if count > options.max_messages:
            message = (
                f"messages: {count} messages; this server takes at most {options.max_messages}"
            )
            return error(400, message, "messages", "too_many_messages")
        return None

    async def submit(job: Job, events: asyncio.Queue[Event]) -> Event:
        try:
            engine.submit(job)
        except EngineStopped:
            return Failed(503, "the server is shutting down", None, "unavailable", "server_error")
        except MadlensError as exc:  # the engine could not start
            log.error("madlens serve: the engine failed to start: %s", exc)
            return Failed(503, "the engine is not available", None, "unavailable", "server_error")
        try:
            return await events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def new_job(request: Request, events: asyncio.Queue[Event], prefix: str, **kw: Any) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(
            id=f"{prefix}-{uuid.uuid4().hex}",
            key_id=request.scope.get("state", {}).get("key_id"),
            emit=lambda event: None,
            **kw,
        )

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody waits for this job any more
                job.cancelled = True

        job.emit = emit
        return job

    def failed_response(failed: Failed, job: Job) -> JSON:
        response = error(failed.status, failed.message, failed.param, failed.code, failed.kind)
        response.headers["x-request-id"] = job.id
        return response

    # --- routes ----------------------------------------------------------------------------

    @app.post(CHAT, summary="Chat completion (OpenAI-compatible), scored by the monitor")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        problem = check_model(body.model) or check_messages(len(body.messages))
        if problem is not None:
            return problem
        if body.n not in (None, 1):
            return error(400, "n: only n=1 is supported", "n", "unsupported_value")
        max_param = "max_tokens"
        if body.max_completion_tokens is not None:
            max_param = "max_completion_tokens"
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = new_job(
            request, events, "chatcmpl",
            endpoint=CHAT,
            messages=plain_messages(body.messages),
            generate=True,
            stream=bool(body.stream),
            max_tokens=body.max_completion_tokens or body.max_tokens,
            max_tokens_param=max_param,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            seed=body.seed,
            stop=body.stops(),
        )  # fmt: skip
        first = await submit(job, events)
        if isinstance(first, Failed):
            return failed_response(first, job)
        created = int(job.created)
        if not job.stream:
            event = first
            try:
                while not isinstance(event, Done | Failed):
                    event = await events.get()
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            if isinstance(event, Failed):
                return failed_response(event, job)
            return JSON(
                {
                    "id": job.id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_id,
                    "system_fingerprint": fingerprint,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": event.text,
                                "refusal": None,
                            },
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                        }
                    ],
                    "usage": _usage(event.prompt_tokens, event.completion_tokens),
                    "madlens": event.madlens,
                },  # fmt: skip
                headers={"x-request-id": job.id},
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(job, first, events, model_id, fingerprint, created, include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no",
                     "x-request-id": job.id},
        )  # fmt: skip

    @app.post(SCORE, summary="Score a prompt (or a prompt and its answer) without generating")
    async def monitor_score(body: ScoreRequest, request: Request) -> Response:
        problem = check_model(body.model) or check_messages(len(body.messages))
        if problem is not None:
            return problem
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = new_job(request, events, "score", endpoint=SCORE,
                      messages=plain_messages(body.messages), generate=False)  # fmt: skip
        event = await submit(job, events)
        try:
            while not isinstance(event, Done | Failed):
                event = await events.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if isinstance(event, Failed):
            return failed_response(event, job)
        verdict = dict(event.madlens or {})
        verdict.pop("blocked", None)
        return JSON(
            {"id": job.id, "object": "monitor.score", "created": int(job.created),
             "model": model_id, "usage": {"prompt_tokens": event.prompt_tokens}, **verdict},
            headers={"x-request-id": job.id},
        )  # fmt: skip

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "madlens"}

    @app.get("/v1/models", summary="The served model (OpenAI list format)")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", summary="One model")
    async def get_model(model: str) -> Response:
        if model != model_id:
            return error(404, f"the model '{model}' is not served here", "model",
                         "model_not_found")  # fmt: skip
        return JSON(model_card())

    @app.get("/healthz", summary="Liveness: 200 while the engine runs")
    async def healthz() -> Response:
        ok = engine.failure is None
        body = {
            "status": "ok" if ok else "failing",
            "model": model_id,
            "monitor": engine.mode,
            "policy": options.policy,
            "queued": engine.queued(),
        }
        return JSON(body, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)  # fmt: skip
            parts = schema.get("components", {}).get("schemas", {})
            for name in ("ChatCompletionRequest", "ScoreRequest"):
                props = parts.get(name, {}).get("properties", {})
                if "model" in props:
                    props["model"] = {"anyOf": [{"type": "string", "enum": [model_id]},
                                                {"type": "null"}]}  # fmt: skip
                if "messages" in props:
                    props["messages"]["maxItems"] = options.max_messages
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    app.add_middleware(Auth, keys=options.keys)
    app.add_middleware(Telemetry, metrics=metrics)
    return app


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


async def _sse(
    job: Job,
    first: Event,
    events: asyncio.Queue[Event],
    model_id: str,
    fingerprint: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """A completion as server-sent events: a first chunk with the role (and the verdict,
    when the monitor gave it at prefill), content deltas, a last chunk with the finish
    reason (and the verdict, when it scored the answer), the usage chunk if asked, [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    sent = ""
    try:
        verdict = first.madlens if isinstance(first, Verdict) else None
        opening = {"madlens": verdict} if verdict is not None else {}
        yield chunk({"role": "assistant", "content": ""}, **opening)
        event = first
        while True:
            if isinstance(event, Delta):
                sent += event.text
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                if len(event.text) > len(sent) and event.text.startswith(sent):
                    yield chunk({"content": event.text[len(sent) :]})
                closing = {"madlens": event.madlens} if verdict is None else {}
                yield chunk({}, event.finish_reason, **closing)
                if include_usage:
                    usage = _usage(event.prompt_tokens, event.completion_tokens)
                    body = {"id": job.id, "object": "chat.completion.chunk", "created": created,
                            "model": model_id, "choices": [], "usage": usage}  # fmt: skip
                    yield b"data: " + json.dumps(body).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            elif isinstance(event, Failed):
                yield (
                    b"data: "
                    + json.dumps(
                        error_body(event.message, event.param, event.code, event.kind)
                    ).encode()
                    + b"\n\n"
                )
                return
            event = await events.get()
    finally:
        job.cancelled = True  # the client went away, or the stream ended: stop decoding
