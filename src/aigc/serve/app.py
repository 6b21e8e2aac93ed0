"""The FastAPI app: OpenAI-compatible completions over one loaded run, plus the playground page.

`create_app(run, config)` builds the app; its lifespan starts the batching scheduler and, on shutdown
(after uvicorn has let in-flight requests finish), drains and stops it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from aigc import __version__
from aigc.artifacts.run import Run
from aigc.chat import ChatTemplate, load_chat_template
from aigc.config import ServeConfig
from aigc.errors import AigcError
from aigc.models import context_limit, describe_run
from aigc.serve import api, chat_api
from aigc.serve.api import ApiError
from aigc.serve.guard import Guard, HostAllowList
from aigc.serve.guard import error_response as _error_response
from aigc.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from aigc.serve.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    RunSummary,
)

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("aigc.serve")
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 500, 503)}
CLOSE_TIMEOUT_S = 10  # most seconds shutdown waits for the decode thread once requests are over
# With `stream: true`: one server-sent event per token (a CompletionResponse chunk as JSON), then [DONE].
SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string", "description": "chunk JSON or [DONE]"}}}
STREAM = {
    "content": {"text/event-stream": {"schema": SSE_EVENT}},
    "description": "JSON, or with `stream: true` "
    "server-sent events: `data: {completion chunk}` per token, then `data: [DONE]`",
}
CHAT_STREAM = {
    "content": {"text/event-stream": {"schema": SSE_EVENT}},
    "description": "JSON, or with `stream: true` server-sent events: `data: {chat.completion.chunk}` per token "
    "(`delta`), one with each choice's `finish_reason`, then `data: [DONE]`",
}


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
            # By now uvicorn has finished or cancelled every request, and a cancelled request cancels its job.
            if not await asyncio.to_thread(scheduler.close, CLOSE_TIMEOUT_S):
                log.warning("the decode thread did not stop within %d s; exiting without it", CLOSE_TIMEOUT_S)

    # No /docs or /redoc: FastAPI's pages load Swagger UI / ReDoc from a CDN, dead offline. The schema
    # stays at /openapi.json for any OpenAPI viewer or client generator.
    app = FastAPI(
        title="aigc",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="OpenAI-compatible text completions from one aigc run, and a playground at `/`.",
    )
    app.state.scheduler = scheduler
    hosts = HostAllowList((*config.allowed_hosts, config.host))
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, hosts=hosts)
    _add_error_handlers(app)
    _document_model_name(app, name)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_info_routes(app, name, scheduler, run_summary(run, name, config))
    _add_completions_route(app, run, config, name, scheduler)
    _add_chat_route(app, run, config, name, scheduler)
    return app


def _add_info_routes(app: FastAPI, name: str, scheduler: Scheduler, summary: dict) -> None:
    created = int(time.time())

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        status = "shutting_down" if scheduler.closed else "ok" if scheduler.alive else "degraded"
        body = {
            "status": status,
            "model": name,
            "queued": scheduler.queued,
            "running": scheduler.running,
            "batches": scheduler.batches,
            "sequences": scheduler.sequences,
        }
        return body if status == "ok" else JSONResponse(body, status_code=503)

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
    async def completions(body: CompletionRequest, request: HttpRequest):
        _check_model(body.model, name)
        plan = api.plan_request(body, run.tokenizer, config)
        job = _submit(scheduler, plan, want_events=body.stream or plan.want_logprobs)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, plan, body.n, meta, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _collect_while_connected(request, job, len(plan.rows))
        if result is None:  # the client hung up; nobody reads a response, its rows were cancelled
            return Response(status_code=499)
        return api.completion_body(meta, plan, body.n, *result)


def _add_chat_route(app: FastAPI, run: Run, config: ServeConfig, name: str, scheduler: Scheduler) -> None:
    template = _chat_template(run)
    context = context_limit(run.model)
    token_text = functools.lru_cache(maxsize=None)(lambda i: run.tokenizer.decode([i], skip_special=False))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, 200: CHAT_STREAM})
    async def chat_completions(body: ChatCompletionRequest, request: HttpRequest):
        _check_model(body.model, name)
        if isinstance(template, AigcError):  # no template, or one that does not parse: say so, and how to fix
            raise ApiError(400, str(template), param="model", code="no_chat_template")
        # Off the event loop: rendering runs the model's template (up to its time limit) and tokenizing is
        # CPU work; /health and the other requests keep being answered meanwhile.
        plan = await run_in_threadpool(chat_api.plan_chat, body, run.tokenizer, template, config, context)
        job = _submit(scheduler, plan, want_events=body.stream or plan.want_logprobs)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        top = body.top_logprobs or 0
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat_api.stream_chat(
                job, plan, meta, top=top, include_usage=usage, token_text=token_text, failure=_decode_failure
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        result = await _collect_while_connected(request, job, len(plan.rows))
        if result is None:  # the client hung up; nobody reads a response, its rows were cancelled
            return Response(status_code=499)
        return chat_api.chat_body(meta, plan, top, *result, token_text)


def _chat_template(run: Run) -> ChatTemplate | AigcError:
    """The run's chat template, or the error every chat request answers with (the server still starts)."""
    try:
        return load_chat_template(run.path)
    except AigcError as exc:
        log.warning("chat completions are off: %s", exc)
        return exc


def _document_model_name(app: FastAPI, name: str) -> None:
    """List the one valid `model` in the OpenAPI schema, so clients and fuzzers can find it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for request in ("CompletionRequest", "ChatCompletionRequest"):
                schema["components"]["schemas"][request]["properties"]["model"]["enum"] = [name]
        return app.openapi_schema

    app.openapi = openapi


def _check_model(model: str, name: str) -> None:
    if model != name:
        raise ApiError(
            404,
            f"model {model!r} not found; this server serves {name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _submit(scheduler: Scheduler, plan: api.Plan | chat_api.ChatPlan, *, want_events: bool) -> Job:
    try:
        return scheduler.submit(plan.rows, want_events=want_events)
    except QueueFull:
        raise ApiError(
            429,
            f"the server is busy: more than {scheduler.max_queue} sequences are queued (--max-queue); retry shortly",
            type="rate_limit_error",
            code="queue_full",
        ) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None


def _decode_failure(exc: BaseException) -> ApiError:
    """The error a batch failure gives each of its requests (the scheduler has logged it)."""
    if isinstance(exc, AigcError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error while decoding: {type(exc).__name__}", type="server_error")


async def _collect_while_connected(request: HttpRequest, job: Job, n_rows: int) -> tuple[list, list] | None:
    """`_collect`, unless the client disconnects first: then the job is cancelled and None returned."""
    collect = asyncio.ensure_future(_collect(job, n_rows))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        job.cancel()  # nothing more to deliver, the client left, or the handler was cancelled
        gone.cancel()
        collect.cancel()
    if collect.done() and not collect.cancelled():
        return collect.result()
    log.info("client disconnected; its %d sequence(s) were cancelled", n_rows)
    return None


async def _disconnected(request: HttpRequest) -> None:
    """Returns once the client has gone (the body was read already, so only http.disconnect remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def _stream(job: Job, plan: api.Plan, n: int, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token, one closing chunk per choice, then `[DONE]`."""
    offsets = [len(plan.prompts[row // n]) for row in range(len(plan.rows))]  # text_offset per choice

    def token_chunk(row: int, event) -> str:
        logprobs = api.logprobs_block([event], offsets[row]) if plan.want_logprobs else None
        offsets[row] += len(event.text)
        return api.chunk(meta, row, event.text, logprobs, None)

    def closing_chunks(completions) -> list[str]:
        chunks = [
            api.chunk(meta, c.index, "", None, c.finish_reason, api.json_fields(c))
            for c in sorted(completions, key=lambda c: c.index)
        ]
        if include_usage:
            chunks.append(
                api.sse({**meta, "object": "text_completion", "choices": [], "usage": api.usage(completions, n)})
            )
        return chunks

    return api.stream_events(job, token_chunk=token_chunk, closing_chunks=closing_chunks, failure=_decode_failure)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


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
    described = describe_run(run.config, run.model)
    return {
        "model": name,
        "kind": model.kind,
        "family": described.family,
        "description": described.line(),
        "params": int(run.model.num_params()),
        "trainable": described.trainable,
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
