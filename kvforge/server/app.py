"""The FastAPI app: OpenAI's routes over the engine loop, /health, /metrics, and /v1/chunks.

Handlers parse and validate the body (400 in OpenAI's error shape), hand a `Job` to the engine loop
and wait for its admission (an ApiError such as 503/429 comes back here, before any byte is sent),
then answer with one JSON body or with server-sent events ending in `data: [DONE]`. A client that
goes away, while its request waits or while it streams, gets its request aborted: the loop frees
its blocks at once.

/v1/chunks (kvforge's extension, shaped like OpenAI's resources):

    POST   /v1/chunks       {"text" | "token_ids", "kind": "system" | "context", "id"?}
                            -> 200 {"id", "object": "chunk", "created", "model", "kind", "num_tokens",
                            "num_pages"}; 400 for a bad body, an id taken by other content or a chunk
                            over the chunk budget (no retry helps), 503 + Retry-After while the cache
                            has no room for it now (requests hold or are owed the blocks)
    GET    /v1/chunks       -> 200 {"object": "list", "data": [chunk, ...]} in registration order
    DELETE /v1/chunks/{id}  -> 200 {"id", "object": "chunk", "deleted": true}; 404 unknown id; 409
                            while a request (running, waiting or queued for room) uses the chunk

Completions and chat completions take `chunks` (ids) and `recompute_ratio`: see protocol.py. An
unknown chunk id there is a 400 with param "chunks".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from kvforge.server import protocol as P
from kvforge.server.engine_loop import Job
from kvforge.server.protocol import ApiError
from kvforge.types import RequestOutput

if TYPE_CHECKING:
    from kvforge.server.serve import Server

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/chunks", "/health", "/metrics")


def build_app(server: Server) -> FastAPI:
    """The app for `server` (which holds the engine loop, the metrics and the served model name)."""
    app = FastAPI(title="kvforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, metrics=server.metrics)
    loop, names = server.loop, {server.model_name, server.engine.model_name}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        err = ApiError(500, f"internal server error ({type(e).__name__}); this is a kvforge bug",
                       type="internal_server_error")
        return JSONResponse(err.body(), status_code=500)

    async def parse(request: Request, model: type[BaseModel]):
        body = await request.body()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise P.validation_error(e) from None
        req.check()
        if req.model is not None and req.model not in names:
            raise ApiError(400, f"model {req.model!r} is not served here; available: {server.model_name!r}",
                           param="model", code="model_not_found")
        return req

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: P.CompletionRequest = await parse(request, P.CompletionRequest)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        job = Job.create(f"cmpl-{uuid.uuid4().hex}", req.single_prompt(), chat=False,
                         params=req.sampling_params(max_tokens), max_tokens=max_tokens,
                         priority=req.priority, stream=bool(req.stream), chunks=req.chunk_ids,
                         recompute_ratio=req.ratio)
        return await _respond(request, job, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: P.ChatCompletionRequest = await parse(request, P.ChatCompletionRequest)
        max_tokens = req.requested_max_tokens
        job = Job.create(f"chatcmpl-{uuid.uuid4().hex}", [m.as_template_input() for m in req.messages],
                         chat=True, params=req.sampling_params(max_tokens), max_tokens=max_tokens,
                         priority=req.priority, stream=bool(req.stream), chunks=req.chunk_ids,
                         recompute_ratio=req.ratio)
        return await _respond(request, job, req, chat=True)

    async def _respond(request: Request, job: Job, req: P.BaseRequest, chat: bool) -> Response:
        loop.submit(job)
        try:
            await _unless_disconnected(request, job.admitted)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                events = _events(job, chat, server.model_name, include_usage)
                return StreamingResponse(_aborting(events, loop, job), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            out = await _unless_disconnected(request, job.outputs.get())
        except BaseException:
            loop.abort(job)
            raise
        if isinstance(out, ApiError):
            raise out
        o = out.outputs[0]
        use = P.usage(len(out.prompt_token_ids), len(o.token_ids), out.num_cached_tokens)
        build = P.chat_completion if chat else P.completion
        return JSONResponse(build(job.request_id, server.model_name, o.text, o.finish_reason, use))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "kvforge", "max_model_len": server.engine.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if loop.alive and loop.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(ApiError(503, "the engine loop is not running or has failed",
                                     type="server_unhealthy").body(), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats, queued = await asyncio.wrap_future(loop.snapshot())
        server.metrics.update(stats, queued)
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.post("/v1/chunks")
    async def create_chunk(request: Request) -> dict:
        req: P.ChunkCreateRequest = await parse(request, P.ChunkCreateRequest)
        chunk, created = await asyncio.wrap_future(loop.register_chunk(req.prompt(), req.kind, req.id, req.param))
        return P.chunk_object(chunk, created, server.model_name)

    @app.get("/v1/chunks")
    async def list_chunks() -> dict:
        chunks = await asyncio.wrap_future(loop.list_chunks())
        return {"object": "list", "data": [P.chunk_object(c, created, server.model_name) for c, created in chunks]}

    @app.delete("/v1/chunks/{chunk_id}")
    async def delete_chunk(chunk_id: str) -> dict:
        await asyncio.wrap_future(loop.unregister_chunk(chunk_id))
        return {"id": chunk_id, "object": "chunk", "deleted": True}

    return app


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, or raise ApiError(499) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(499, "the client closed the connection", type="client_closed_request")
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _aborting(events: AsyncIterator[str], loop, job: Job) -> AsyncIterator[str]:
    """Pass `events` on; however the stream ends (finished, client gone, cancelled), abort the job,
    which is a no-op for a finished one and frees the blocks of an unfinished one."""
    try:
        async for event in events:
            yield event
    finally:
        loop.abort(job)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _events(job: Job, chat: bool, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events for one admitted job. Text that could still turn out to be the start of a
    stop string is held back until the next token shows it is not (the engine cuts a matched stop
    string out of the text)."""
    created, rid = int(time.time()), job.request_id
    hold = max((len(s) for s in job.params.stop), default=1) - 1

    def chunk(text: str | None, finish: str | None, use: dict | None = None) -> str:
        if chat:
            delta = None if text is None else ({} if finish and not text else {"content": text})
            return _sse(P.chat_chunk(rid, created, model, delta, finish, include_usage, use))
        return _sse(P.completion_chunk(rid, created, model, text, finish, include_usage, use))

    if chat:
        yield _sse(P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None, include_usage))
    sent = 0
    while True:
        out: RequestOutput | ApiError = await job.outputs.get()
        if isinstance(out, ApiError):
            yield _sse(out.body())
            break
        o = out.outputs[0]
        upto = len(o.text) if out.finished else max(sent, len(o.text) - hold)
        if upto > sent or out.finished:
            yield chunk(o.text[sent:upto], o.finish_reason if out.finished else None)
            sent = upto
        if out.finished:
            if include_usage:
                yield chunk(None, None, P.usage(len(out.prompt_token_ids), len(o.token_ids), out.num_cached_tokens))
            break
    yield "data: [DONE]\n\n"


class _CountRequests:
    """ASGI middleware: count every HTTP response by endpoint and status code."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
