"""The FastAPI application: OpenAI-compatible completions and chat completions over the orchestrator.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as server-sent
events, ``data: {chunk}`` ... ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Each generation request is submitted to the orchestrator with a callback that hops from the loop thread to the
event loop (``call_soon_threadsafe``) into a per-request queue. Admission is all-or-nothing: a full queue answers
429 with ``Retry-After`` before anything is created. A client that goes away (stream closed, or a non-streamed
request's connection dropped) has its request cancelled, so its slot frees at the next batch boundary. While the
server drains for shutdown, new generation requests get 503 and ``/health`` reports ``draining``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ltr_jax.engine.orchestrator import (
    MAX_TEMPERATURE,
    SEED_LIMIT,
    QueueFullError,
    SamplingParams,
    ShuttingDownError,
    StreamEvent,
)
from ltr_jax.machine import resident_mb
from ltr_jax.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ltr_jax.server.runtime import Runtime
from ltr_jax.server.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    bad_request,
    chat_messages,
    format_validation_error,
    stop_strings,
    unsupported_options,
)

log = logging.getLogger(__name__)

_KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    """Mutable serving state shared by the routes and the graceful-shutdown logic."""

    runtime: Runtime
    api_key: str | None
    started_at: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0  # generation requests admitted and not yet answered in full
    idle: asyncio.Event | None = None

    def request_started(self) -> None:
        self.inflight += 1

    def request_done(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self.idle is not None:
            self.idle.set()


# ------------------------------------------------------------------------------------------------ helpers
class _EventBridge:
    """Orchestrator events (loop thread) -> an asyncio queue on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

    def __call__(self, event: StreamEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the server's loop has closed (it shut down): no client is left to read the event
            if not self.loop.is_closed():
                raise

    def drain_ready(self, first: StreamEvent) -> list[StreamEvent]:
        """``first`` plus every event already queued behind it (one write for a burst of tokens)."""
        events = [first]
        while not events[-1].finished:
            try:
                events.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return events


class _GenerationStream(StreamingResponse):
    """A streaming response that always runs ``on_close`` once it ends, however it ends (even when the client
    disconnects before the first chunk, when the body generator never starts)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _usage(event: StreamEvent) -> dict[str, int]:
    return {"prompt_tokens": event.num_prompt_tokens, "completion_tokens": event.num_generated,
            "total_tokens": event.num_prompt_tokens + event.num_generated}


def _failure(event: StreamEvent, timeout_s: float | None) -> APIError | None:
    """The error a finished event stands for (None when it finished normally)."""
    reason = event.finish_reason
    if reason in ("stop", "length"):
        return None
    if reason == "timeout":
        return APIError(504, f"the request exceeded its time limit of {timeout_s} s after generating "
                             f"{event.num_generated} tokens", code="timeout", type="timeout_error")
    if reason == "cancelled":
        return APIError(503, "the request was cancelled because the server is shutting down",
                        code="server_shutting_down", type="server_error")
    return APIError(500, f"generation failed: {event.error or 'internal error'}", code="internal_error",
                    type="server_error")


class _ResponseCounter:
    """Pure ASGI middleware counting responses by route and status (it leaves streaming and disconnects alone)."""

    def __init__(self, app, count: Callable[[str, int], None]):
        self.app = app
        self.count = count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope.get("path", "")
            self.count(path if path in _KNOWN_ROUTES else "other", status)


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_ROLE_KEY = re.compile(rb'"role"\s*:')


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_host_names(bind_host: str, allowed: list[str] | None) -> frozenset[str] | None:
    """The Host / Origin names the server answers (None: any). On a loopback bind with nothing configured only
    the loopback names: a web page's script then cannot reach the server through a rebound DNS name."""
    if allowed is None:
        return frozenset(_LOOPBACK_NAMES) if _is_loopback(bind_host) else None
    if "*" in allowed:
        return None
    return frozenset(h.lower().strip("[]") for h in allowed)


def _host_name(value: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    return (urlsplit("//" + value).hostname or "").lower()


class _HostGuard:
    """Pure ASGI middleware: refuse requests whose Host, or Origin when sent, is not an allowed name (403)."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = _host_name(headers.get("host", ""))
        origin = headers.get("origin")
        bad = None
        if host not in self.allowed:
            bad = f"the Host header {headers.get('host', '')!r}"
        elif origin is not None and origin != "null" and _host_name(urlsplit(origin).netloc) not in self.allowed:
            bad = f"the Origin {origin!r}"
        if bad is None:
            await self.app(scope, receive, send)
            return
        err = APIError(403, f"{bad} is not one this server answers (it accepts {', '.join(sorted(self.allowed))}); "
                            "add the name to server.allowed_hosts to serve it", code="host_not_allowed")
        await JSONResponse(err.body(), status_code=403)(scope, receive, send)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns once the client has gone away (the request body has been read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _RouteJob:
    """One admitted generation request, as the route sees it."""

    request_id: str
    kind: str  # "completion" | "chat"
    created: int
    model: str
    bridge: _EventBridge
    include_usage: bool
    timeout_s: float | None
    continuous_usage: bool = False  # usage so far in every streamed chunk
    prompt_tokens: int = 0
    generated: int = 0
    finished: bool = False


# ------------------------------------------------------------------------------------------------ the app
def create_app(runtime: Runtime, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving ``runtime``; its lifespan starts and stops the orchestrator loop."""
    state = ServerState(runtime=runtime, api_key=api_key or None)
    orch = runtime.orchestrator
    settings = runtime.config.server
    metrics = runtime.metrics
    max_body = int(settings.max_body_mb * 2**20)
    # a token is rarely longer than this many characters; a longer prompt cannot fit and is refused untokenized
    max_prompt_chars = 32 * runtime.max_prompt_len
    tokenizer_pool = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.idle = asyncio.Event()
        state.idle.set()
        if not orch.is_running:
            orch.start()
        if runtime.online is not None:
            runtime.online.start()
        try:
            yield
        finally:
            if runtime.online is not None:
                await asyncio.to_thread(runtime.online.stop)
            await asyncio.to_thread(orch.stop, False, 10.0)
            tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ltr-jax", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state

    # -------------------------------------------------------------------------------- errors
    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(format_validation_error(list(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = (f"no route {request.method} {request.url.path}; see /v1/completions, /v1/chat/completions, "
                   "/v1/models, /health, /metrics" if err.status_code in (404, 405) else str(err.detail))
        return error_response(APIError(err.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        log.exception("internal error while serving %s", request.url.path)
        return error_response(APIError(500, f"internal server error: {type(err).__name__}: {err}",
                                       code="internal_error", type="server_error"))

    app.add_middleware(_HostGuard, allowed=allowed_host_names(settings.host, settings.allowed_hosts))
    app.add_middleware(_ResponseCounter, count=metrics.count_response)

    # -------------------------------------------------------------------------------- checks
    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def accepting() -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests", code="server_shutting_down",
                           type="server_error", headers={"Connection": "close"})

    async def read_body(request: Request) -> bytes:
        """The JSON body, refused (415) unless sent as JSON, and (413) once past server.max_body_mb, before it is
        read in full."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"send the request body as JSON with the header 'Content-Type: application/json' "
                                f"(got {kind or 'none'!r})", code="unsupported_media_type")
        too_big = APIError(413, f"the request body is larger than this server's limit of {settings.max_body_mb:g} MB "
                                f"(server.max_body_mb); send a shorter prompt", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise too_big
        chunks, size = [], 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_body:
                        raise too_big
                    chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(499, "the client went away before sending its whole request body",
                           code="client_closed_request") from None
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s "
                                f"(server.body_timeout_s)", code="request_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

    async def tokenize(fn: Callable[[], list[int]]) -> list[int]:
        """Run a tokenization off the event loop, so streams and /health keep flowing during a long one."""
        return await asyncio.get_running_loop().run_in_executor(tokenizer_pool, fn)

    def check_prompt_chars(n_chars: int, param: str) -> None:
        if n_chars > max_prompt_chars:
            raise bad_request(f"the prompt has {n_chars} characters, more than this server's limit of "
                              f"{max_prompt_chars} (what its prompt limit of {runtime.max_prompt_len} tokens can "
                              f"hold); shorten it", param, "context_length_exceeded")

    def too_many_messages(count: int) -> APIError:
        return bad_request(f"the request has {count} messages, more than this server's limit of "
                           f"{settings.max_messages} (server.max_messages)", "messages")

    async def parse(request: Request, schema: type[SamplingRequest]) -> SamplingRequest:
        body = await read_body(request)
        if not body.strip():
            raise bad_request("the request body is empty; send a JSON object", None, "missing_body")
        # counted before parsing, which holds the interpreter for a while on a huge list: each message has one
        # "role" key (the pattern cannot occur inside a JSON string, whose inner quotes are escaped)
        roles = len(_ROLE_KEY.findall(body)) if schema is ChatRequest else 0
        if roles > settings.max_messages:
            raise too_many_messages(roles)
        try:  # a big body is parsed off the event loop too, so streams and /health keep flowing meanwhile
            req = (schema.model_validate_json(body) if len(body) < 2**18 else
                   await asyncio.get_running_loop().run_in_executor(tokenizer_pool, schema.model_validate_json, body))
        except ValidationError as err:
            raise format_validation_error(err.errors(include_url=False)) from None
        if req.model != runtime.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{runtime.model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        unsupported_options(req)
        return req

    def sampling_for(req: SamplingRequest, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        limit = runtime.max_seq_len - 1
        room = limit - prompt_len
        if prompt_len > runtime.max_prompt_len:
            raise bad_request(f"the prompt has {prompt_len} tokens, more than this server's limit of "
                              f"{runtime.max_prompt_len} (the context is {runtime.max_seq_len} tokens); shorten it",
                              "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
        param = "max_completion_tokens" if isinstance(req, ChatRequest) and req.max_completion_tokens else "max_tokens"
        if max_tokens is None:
            max_tokens = min(settings.default_max_tokens, room)
        elif not 1 <= max_tokens <= limit:
            raise bad_request(f"{param} = {max_tokens} is out of range: it must be between 1 and {limit}", param)
        elif max_tokens > room:
            raise bad_request(f"the prompt ({prompt_len} tokens) plus {param} ({max_tokens}) exceeds the model's "
                              f"context of {limit} tokens; lower {param} to at most {room} or shorten the prompt",
                              param, "context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise bad_request(f"temperature = {temperature} is out of range: it must be between 0 and "
                              f"{MAX_TEMPERATURE}", "temperature")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not 0.0 < top_p <= 1.0:
            raise bad_request(f"top_p = {top_p} is out of range: it must be > 0 and <= 1", "top_p")
        top_k = 0 if req.top_k is None else req.top_k
        if top_k < 0:
            raise bad_request(f"top_k = {top_k} must be >= 0 (0 = no top-k filtering)", "top_k")
        if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
            raise bad_request(f"seed = {req.seed} is out of range: it must be between 0 and {SEED_LIMIT - 1}", "seed")
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=req.seed, stop=stop_strings(req.stop), ignore_eos=bool(req.ignore_eos))

    def submit(kind: str, req: SamplingRequest, prompt_tokens: list[int], sampling: SamplingParams) -> _RouteJob:
        accepting()
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        options = req.stream_options
        job = _RouteJob(prefix + uuid.uuid4().hex, kind, int(time.time()), runtime.model_name,
                        _EventBridge(asyncio.get_running_loop()), bool(options and options.include_usage),
                        settings.request_timeout_s, bool(options and options.continuous_usage_stats),
                        len(prompt_tokens))
        try:
            orch.submit(prompt_tokens, sampling, job.bridge, request_id=job.request_id,
                        timeout_s=settings.request_timeout_s)
        except QueueFullError as err:
            raise APIError(429, f"the server is busy: {err}; retry after {settings.retry_after_s} s",
                           code="queue_full", type="server_overloaded",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        except ShuttingDownError as err:
            raise APIError(503, str(err), code="server_shutting_down", type="server_error") from None
        except ValueError as err:
            raise bad_request(str(err), "prompt") from None
        state.request_started()
        if state.idle is not None:
            state.idle.clear()
        return job

    def close(job: _RouteJob) -> None:
        """Once per job: cancel it in the orchestrator if it did not finish, and count it out."""
        if getattr(job, "_closed", False):
            return
        job._closed = True  # type: ignore[attr-defined]
        if not job.finished:
            orch.cancel(job.request_id)
        state.request_done()

    # -------------------------------------------------------------------------------- responses
    def chunk(job: _RouteJob, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if job.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        out = {"id": job.request_id, "object": obj, "created": job.created, "model": job.model, "choices": [choice]}
        if job.continuous_usage:
            out["usage"] = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.generated,
                            "total_tokens": job.prompt_tokens + job.generated}
        return out

    async def stream_body(job: _RouteJob) -> AsyncIterator[bytes]:
        if job.kind == "chat":
            yield _sse(chunk(job, "", None, first=True))
        while True:
            events = job.bridge.drain_ready(await job.bridge.queue.get())
            last = events[-1]
            job.generated = last.num_generated
            text = "".join(e.text for e in events)
            if not last.finished:
                if text:
                    yield _sse(chunk(job, text, None))
                continue
            job.finished = True
            failure = _failure(last, job.timeout_s)
            if failure is not None:
                if text:
                    yield _sse(chunk(job, text, None))
                yield _sse(failure.body())
            else:
                if job.kind == "chat" and text:
                    yield _sse(chunk(job, text, None))
                    text = None
                yield _sse(chunk(job, text if job.kind == "completion" else None, last.finish_reason))
                if job.include_usage:
                    yield _sse({"id": job.request_id, "object": chunk(job, None, None)["object"],
                                "created": job.created, "model": job.model, "choices": [], "usage": _usage(last)})
            yield _sse("[DONE]")
            return

    async def collect(request: Request, job: _RouteJob) -> dict[str, Any]:
        parts: list[str] = []
        getter = asyncio.ensure_future(job.bridge.queue.get())
        hangup = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            while True:
                await asyncio.wait({getter, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    log.info("client of %s disconnected; cancelling it", job.request_id)
                    raise APIError(499, "client disconnected", code="client_closed_request")
                event = getter.result()
                parts.append(event.text)
                if event.finished:
                    job.finished = True
                    failure = _failure(event, job.timeout_s)
                    if failure is not None:
                        raise failure
                    break
                getter = asyncio.ensure_future(job.bridge.queue.get())
        finally:
            getter.cancel()
            hangup.cancel()
        text = "".join(parts)
        if job.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": event.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
            obj = "text_completion"
        return {"id": job.request_id, "object": obj, "created": job.created, "model": job.model,
                "choices": [choice], "usage": _usage(event)}

    async def respond(request: Request, kind: str, req: SamplingRequest, prompt_tokens: list[int],
                      max_tokens: int | None) -> Response:
        sampling = sampling_for(req, len(prompt_tokens), max_tokens)
        job = submit(kind, req, prompt_tokens, sampling)
        if req.stream:
            return _GenerationStream(stream_body(job), on_close=lambda: close(job))
        try:
            return JSONResponse(await collect(request, job))
        finally:
            close(job)

    # -------------------------------------------------------------------------------- routes
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req: CompletionRequest = await parse(request, CompletionRequest)  # type: ignore[assignment]
        if isinstance(req.prompt, str):
            if not req.prompt:
                raise bad_request("prompt is empty; send at least one character or token id", "prompt")
            check_prompt_chars(len(req.prompt), "prompt")
            prompt, special = req.prompt, settings.prompt_special_tokens
            tokens = await tokenize(lambda: runtime.tokenizer.encode(prompt, special=special))
        else:
            tokens = list(req.prompt)
            vocab = runtime.engine.model_config.vocab_size
            if not tokens:
                raise bad_request("prompt is an empty list; send at least one token id", "prompt")
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"prompt contains token id {bad}, outside this model's vocabulary [0, {vocab})",
                                  "prompt")
        return await respond(request, "completion", req, tokens, req.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req: ChatRequest = await parse(request, ChatRequest)  # type: ignore[assignment]
        if len(req.messages) > settings.max_messages:
            raise too_many_messages(len(req.messages))
        messages = chat_messages(req)
        check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            tokens = await tokenize(lambda: runtime.tokenizer.encode_chat(messages, add_generation_prompt=True))
        except ValueError as err:
            raise bad_request(f"cannot format the messages with the model's chat template: {err}", "messages") \
                from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await respond(request, "chat", req, tokens, max_tokens)

    def model_card() -> dict[str, Any]:
        return {"id": runtime.model_name, "object": "model", "created": state.started_at, "owned_by": "ltr-jax",
                "max_model_len": runtime.max_seq_len}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if model_id != runtime.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {runtime.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = orch.stats()
        body = {"status": "ok", "model": runtime.model_name, "policy": runtime.effective_policy,
                "configured_policy": runtime.config.scheduler.policy, "ranker": runtime.ranker_note,
                "queue_len": stats["queue_len"], "running": stats["running"], "free_slots": stats["free_slots"],
                "num_slots": stats["num_slots"], "inflight_http": state.inflight,
                "ranker_version": int(stats.get("ranker_version", 0)), "resident_mb": resident_mb(),
                "warmup_pending": stats["idle_tasks_left"], "devices": runtime.engine.num_devices}
        if not orch.is_running:
            body["status"] = "error"
            body["detail"] = "the scheduling loop is not running"
            return JSONResponse(body, status_code=503)
        if state.draining:
            body["status"] = "draining"
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if settings.metrics_require_key:
            authorize(request)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
