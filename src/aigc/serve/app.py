"""The FastAPI app: OpenAI-compatible completions over one loaded run, plus the playground page.

`create_app(run, config)` builds the app; its lifespan starts the batching scheduler and, on shutdown
(after uvicorn has let in-flight requests finish), drains and stops it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aigc import __version__
from aigc.config import ServeConfig
from aigc.errors import AigcError
from aigc.serve import api
from aigc.serve.api import ApiError
from aigc.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from aigc.serve.schemas import CompletionRequest, CompletionResponse, ErrorResponse, Health, ModelCard, ModelList
from aigc.serve.schemas import RunSummary
from aigc.artifacts.run import Run

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("aigc.serve")
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
# With `stream: true`: one server-sent event per token (a CompletionResponse chunk as JSON), then [DONE].
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string", "description": "chunk JSON or [DONE]"}}}
STREAM = {"content": {"text/event-stream": {"schema": SSE_EVENT}}, "description": "JSON, or with `stream: true` "
          "server-sent events: `data: {completion chunk}` per token, then `data: [DONE]`"}


def create_app(run: Run, config: ServeConfig | None = None) -> FastAPI:
    """The app over a loaded run; uvicorn runs it (its lifespan starts and stops the scheduler)."""
    config = config or ServeConfig()
    name = config.model_name or run.path.name
    scheduler = Scheduler(run.model, run.tokenizer, max_batch=config.max_batch, max_queue=config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(
        title="aigc", version=__version__, lifespan=lifespan,
        description="OpenAI-compatible text completions from one aigc run, and a playground at `/`.",
    )
    app.state.scheduler = scheduler
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    _add_error_handlers(app)
    _document_model_name(app, name)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_info_routes(app, name, scheduler, run_summary(run, name, config))
    _add_completions_route(app, run, config, name, scheduler)
    return app


def _add_info_routes(app: FastAPI, name: str, scheduler: Scheduler, summary: dict) -> None:
    created = int(time.time())

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        status = "shutting_down" if scheduler.closed else "ok"
        return {"status": status, "model": name, "queued": scheduler.queued, "running": scheduler.running,
                "batches": scheduler.batches, "sequences": scheduler.sequences}

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [ModelCard(id=name, created=created)]}

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
    async def model_card(model: str) -> ModelCard:
        _check_model(model, name)
        return ModelCard(id=name, created=created)

    @app.get("/v1/run", response_model=RunSummary, responses=ERRORS)
    async def run_info() -> dict:
        return summary


def _add_completions_route(app: FastAPI, run: Run, config: ServeConfig, name: str, scheduler: Scheduler) -> None:
    @app.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, 200: STREAM})
    async def completions(body: CompletionRequest):
        _check_model(body.model, name)
        plan = api.plan_request(body, run.tokenizer, config)
        job = _submit(scheduler, plan, want_events=body.stream or plan.want_logprobs)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, plan, body.n, meta, usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            done, events = await _collect(job, len(plan.rows))
        finally:
            job.cancel()  # nothing more to deliver (or the handler was cancelled)
        return api.completion_body(meta, plan, body.n, done, events)


def _document_model_name(app: FastAPI, name: str) -> None:
    """List the one valid `model` in the OpenAPI schema, so clients and fuzzers can find it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] = [name]
        return app.openapi_schema

    app.openapi = openapi


def _check_model(model: str, name: str) -> None:
    if model != name:
        raise ApiError(
            404, f"model {model!r} not found; this server serves {name!r} (see GET /v1/models)",
            param="model", code="model_not_found",
        )


def _submit(scheduler: Scheduler, plan: api.Plan, *, want_events: bool) -> Job:
    try:
        return scheduler.submit(plan.rows, want_events=want_events)
    except QueueFull:
        raise ApiError(
            429, f"the server is busy: more than {scheduler.max_queue} sequences are queued (--max-queue); "
            "retry shortly", type="rate_limit_error", code="queue_full",
        ) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None


def _decode_failure(exc: BaseException) -> ApiError:
    if isinstance(exc, AigcError):
        return ApiError(400, str(exc))
    log.error("decoding failed", exc_info=exc)
    return ApiError(500, f"internal error while decoding: {type(exc).__name__}", type="server_error")


async def _collect(job: Job, n_rows: int) -> tuple[list, list[list]]:
    """Wait for a job's completions; keep its token events (for logprobs) per row."""
    events: list[list] = [[] for _ in range(n_rows)]
    while True:
        kind, row, payload = await job.next()
        if kind == "event":
            events[row].append(payload)
        elif kind == "done":
            return payload, events
        else:
            raise _decode_failure(payload)


async def _stream(job: Job, plan: api.Plan, n: int, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token, one closing chunk per choice, then `[DONE]`."""
    offsets = [len(plan.prompts[row // n]) for row in range(len(plan.rows))]  # text_offset per choice
    try:
        while True:
            kind, row, payload = await job.next()
            if kind == "event":
                logprobs = api.logprobs_block([payload], offsets[row]) if plan.want_logprobs else None
                offsets[row] += len(payload.text)
                yield api.chunk(meta, row, payload.text, logprobs, None)
            elif kind == "done":
                for completion in sorted(payload, key=lambda c: c.index):
                    yield api.chunk(meta, completion.index, "", None, completion.finish_reason)
                if include_usage:
                    yield api.sse({**meta, "object": "text_completion", "choices": [], "usage": api.usage(payload, n)})
                break
            else:
                yield api.sse(_decode_failure(payload).body())
                break
        yield api.sse("[DONE]")
    finally:
        job.cancel()  # finished, or the client went away: the worker stops sending to this job


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """Pydantic's first complaint, as `field: message`; for unions, every alternative's message."""
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    loc = [str(part) for part in first["loc"] if part != "body"]
    if not loc:
        return ApiError(400, f"request body: {first['msg']}")
    field = loc[0]
    messages = dict.fromkeys(e["msg"] for e in errors if [str(p) for p in e["loc"] if p != "body"][:1] == [field])
    return ApiError(400, f"{'.'.join(loc) if len(messages) == 1 else field}: {' or '.join(messages)}", param=field)


def _add_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    async def on_validation(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    async def on_http(request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; the API is under /v1 (see /docs)"
        else:
            message = str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = _error_response(ApiError(exc.status_code, message, code=code))
        response.headers.update(exc.headers or {})  # e.g. `Allow` on 405
        return response

    async def on_aigc(request: HttpRequest, exc: AigcError) -> JSONResponse:
        return _error_response(ApiError(400, str(exc)))

    async def on_bug(request: HttpRequest, exc: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the usual error shape, not plain text.
        return _error_response(ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(Exception, on_bug)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(AigcError, on_aigc)


class Guard:
    """ASGI middleware run before routing: the API key on /v1 routes, and the request body size cap
    (checked on the declared length and on the bytes actually received, so chunked bodies count too)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1") and not self._authorised(headers):
            error = ApiError(401, "missing or invalid API key; send `Authorization: Bearer KEY`", code="invalid_api_key")
            await _error_response(error)(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        body, complete = b"", False
        if not (declared.isdigit() and int(declared) > self.max_body_bytes):
            body, complete = await _read_body(receive, self.max_body_bytes)
        if not complete:
            error = ApiError(413, f"request body is over {self.max_body_bytes} bytes (--max-body-bytes)",
                             code="request_too_large")
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The whole request body, or (partial, False) once it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True  # client left; the app will notice on its own receive
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", False
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that first hands out the already-read body, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---------------------------------------------------------------------------------------------
# Run summary
# ---------------------------------------------------------------------------------------------


def run_summary(run: Run, name: str, config: ServeConfig) -> dict:
    """Size, data and latest validation figures of the run, for `/v1/run` and the playground."""
    model = run.config.model
    try:
        evaluated = [m for m in run.metrics() if m.get("val_bpb") is not None]
    except ValueError as exc:  # a damaged metrics log must not stop the server; the figures are optional
        log.warning("cannot read %s/metrics.jsonl (%s); serving without training figures", run.path, exc)
        evaluated = []
    last = evaluated[-1] if evaluated else {}
    return {
        "model": name,
        "kind": model.kind,
        "params": int(run.model.num_params()),
        "n_layer": model.n_layer,
        "n_embd": model.n_embd,
        "block_size": model.block_size,
        "vocab_size": run.tokenizer.vocab_size,
        "labels": list(run.labels),
        "data": run.config.data,
        "step": last.get("step"),
        "tokens": last.get("tokens"),
        "val_bpb": last.get("val_bpb"),
        "best_val_bpb": min((m["val_bpb"] for m in evaluated), default=None),
        "max_tokens_limit": config.max_tokens_limit,
        "auth": bool(config.api_key),
    }
