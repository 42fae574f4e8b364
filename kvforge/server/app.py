"""The FastAPI app: OpenAI's routes over the engine loop, vLLM's /tokenize, /detokenize and
/version, /health, /metrics, and /v1/chunks; the middleware (request counting, X-Request-Id, the API
key) is in middleware.py.

Handlers parse and validate the body (400 in OpenAI's error shape), hand the engine loop one `Job`
per prompt and wait for their admission (an ApiError such as 503/429 comes back here, before any
byte is sent), then answer with one JSON body or with server-sent events ending in `data: [DONE]`.
A completion request with several prompts runs them as separate engine requests (`<id>-<i>`), each
with `n` completions: choice i is completion i % n of prompt i // n. A client that goes away, while
its request waits or while it streams, gets its request aborted: the loop frees its blocks at once.
The request id (X-Request-Id, or a fresh one) names the response (`cmpl-<id>`, `chatcmpl-<id>`) and
the engine request.

    POST /tokenize    {"prompt", "add_special_tokens"?} or {"messages", "add_generation_prompt"?,
                      "add_special_tokens"?} -> {"count", "max_model_len", "tokens"}
    POST /detokenize  {"tokens"} -> {"prompt"}
    GET  /version     -> {"version"}

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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

import kvforge
from kvforge.server import protocol as P
from kvforge.server import responses as R
from kvforge.server.engine_loop import EngineLoop
from kvforge.server.jobs import ChunkJob, Job, OutputStream, create_future
from kvforge.server.middleware import ApiKey, CountRequests, RequestIds
from kvforge.server.protocol import ApiError

if TYPE_CHECKING:
    from kvforge.server.serve import Server

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def build_app(server: Server) -> FastAPI:
    """The app for `server` (which holds the engine loop, the metrics, the tokenizing workers and
    the served model name)."""
    # No redirects for a trailing slash: an unknown path is a 404 in OpenAI's shape.
    app = FastAPI(title="kvforge", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    if server.config.api_key is not None:  # the last added runs first
        app.add_middleware(ApiKey, api_key=server.config.api_key)
    app.add_middleware(RequestIds)
    app.add_middleware(CountRequests, metrics=server.metrics)
    loop, engine, names = server.loop, server.engine, {server.model_name, server.engine.model_name}
    config, texts = server.config, R.TokenTexts(engine.tokenizer)

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
        data = _json_object(await _read_body(request, config.max_body_bytes))
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise P.validation_error(e) from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        req.check()
        if req.model is not None and req.model not in names:
            raise ApiError(400, f"model {req.model!r} is not served here; available: {server.model_name!r}",
                           param="model", code="model_not_found")
        return req

    async def tokenized(fn: Callable[[], Any], param: str) -> Any:
        """Run `fn` (tokenizing, chat templating) on the server's worker threads, never on the event
        loop or the engine loop; a ValueError is the caller's mistake (400 naming `param`)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(server.workers, fn)
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: P.CompletionRequest = await parse(request, P.CompletionRequest)
        params = req.sampling_params(COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens)
        prompts = req.prompts()

        def engine_prompt(prompt: str | list[int]) -> dict:
            # A query after chunks continues the prompt: no BOS (as LLMEngine.prepare_chunk_request).
            text, ids = engine.tokenize(prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt},
                                        add_special_tokens=not req.chunk_ids)
            if text is None and req.echo:
                text = engine.tokenizer.decode(ids, skip_special_tokens=False)
            return {"prompt": text, "prompt_token_ids": ids}

        engine_prompts = await tokenized(lambda: [engine_prompt(p) for p in prompts], "prompt")
        echo = [p["prompt"] for p in engine_prompts] if req.echo else None
        answer = _answer(request, "cmpl", req, params.n, len(prompts), chat=False, echo=echo)
        return await _respond(request, answer, req, params, engine_prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: P.ChatCompletionRequest = await parse(request, P.ChatCompletionRequest)
        params = req.sampling_params(req.requested_max_tokens)
        messages = [m.as_template_input() for m in req.messages]
        engine_prompt = await tokenized(lambda: engine.tokenize_chat(messages, chat_template=config.chat_template),
                                        "messages")
        answer = _answer(request, "chatcmpl", req, params.n, 1, chat=True)
        return await _respond(request, answer, req, params, [engine_prompt], chat=True)

    def _answer(request: Request, prefix: str, req: P.BaseRequest, n: int, num_prompts: int, chat: bool,
                echo: list[str] | None = None) -> R.Answer:
        return R.Answer(f"{prefix}-{request.state.request_id}", server.model_name, chat, n, num_prompts, texts,
                        logprobs=req.num_logprobs, prompt_logprobs=req.prompt_logprobs, echo=echo,
                        include_usage=bool(req.stream_options and req.stream_options.include_usage))

    async def _respond(request: Request, answer: R.Answer, req: P.BaseRequest, params, engine_prompts: list[dict],
                       chat: bool) -> Response:
        aloop, stream = asyncio.get_running_loop(), bool(req.stream)
        outputs = OutputStream(params.n, len(engine_prompts), wake_each_step=stream)
        ids = [answer.rid] if len(engine_prompts) == 1 else [f"{answer.rid}-{i}" for i in range(len(engine_prompts))]
        jobs = [Job(rid, prompt, chat, params, req.priority, aloop, aloop.create_future(), req.chunk_ids, req.ratio,
                    outputs, i) for i, (rid, prompt) in enumerate(zip(ids, engine_prompts))]

        def abort() -> None:
            for job in jobs:
                loop.abort(job)

        loop.submit(jobs)
        try:
            for job in jobs:
                await _from_loop(loop, job.admitted, request)
            if stream:
                return _AbortingStream(_events(outputs, loop, answer), abort, media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache"})
            out = await _from_loop(loop, outputs.get(), request)  # woken once, when every prompt is done
        except BaseException:
            abort()
            raise
        return JSONResponse(answer.body(out))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req: P.TokenizeRequest = await parse(request, P.TokenizeRequest)
        tokenizer = engine.tokenizer
        if req.prompt is not None:
            ids = await tokenized(lambda: tokenizer.encode(req.prompt, req.special_tokens), "prompt")
        else:
            messages = [m.as_template_input() for m in req.messages]
            ids = await tokenized(lambda: tokenizer.encode(tokenizer.apply_chat_template(
                messages, req.add_generation_prompt, config.chat_template), req.special_tokens), "messages")
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req: P.DetokenizeRequest = await parse(request, P.DetokenizeRequest)
        text = await tokenized(lambda: engine.tokenizer.decode(req.tokens, skip_special_tokens=False), "tokens")
        return {"prompt": text}

    @app.get("/version")
    async def version() -> dict:
        return {"version": kvforge.__version__}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "kvforge", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if loop.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse(ApiError(503, "the engine loop is not running, or its steps are failing",
                                     type="server_unhealthy").body(), status_code=503)

    async def call(fut) -> Any:
        return await _from_loop(loop, asyncio.wrap_future(fut), timeout=config.engine_timeout)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats, queued = await call(loop.snapshot())
        server.metrics.update(stats, queued)
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/kv_events")
    async def kv_events() -> dict:
        """Drain the KV events (BlockStored / BlockRemoved / AllBlocksCleared) recorded since the last
        call: for a router mirroring the prefix cache. The engine keeps a bounded buffer; `dropped`
        counts the events lost because nobody drained them in time (resynchronise when it grows)."""
        events, dropped = await call(loop.take_events())
        return {"object": "list", "data": [R.kv_event(e) for e in events], "dropped": dropped}

    @app.post("/v1/chunks")
    async def create_chunk(request: Request) -> dict:
        req: P.ChunkCreateRequest = await parse(request, P.ChunkCreateRequest)
        text, ids = await tokenized(lambda: engine.tokenize_chunk(req.prompt(), req.kind), req.param)
        aloop, done = create_future()
        job = ChunkJob(f"chunk-{request.state.request_id}", {"prompt": text, "prompt_token_ids": ids}, req.kind,
                       req.id, req.param, aloop, done)
        loop.register(job)
        try:
            chunk, created = await _from_loop(loop, done, request)
        except BaseException:
            loop.abort(job)
            raise
        return R.chunk_object(chunk, created, server.model_name)

    @app.get("/v1/chunks")
    async def list_chunks() -> dict:
        chunks = await call(loop.list_chunks())
        return {"object": "list", "data": [R.chunk_object(c, created, server.model_name) for c, created in chunks]}

    @app.delete("/v1/chunks/{chunk_id}")
    async def delete_chunk(chunk_id: str) -> dict:
        await call(loop.unregister_chunk(chunk_id))
        return {"id": chunk_id, "object": "chunk", "deleted": True}

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or ApiError(413) once it is over `limit` bytes (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body of {declared} bytes is over the limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _json_object(body: bytes) -> dict:
    """The body as a JSON object; ApiError(400) for anything else (NaN and Infinity included)."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


async def _from_loop(loop: EngineLoop, awaitable: Awaitable, request: Request | None = None,
                     timeout: float | None = None) -> Any:
    """Await something the engine loop provides, with a bound: ApiError 503 if the loop stops first
    or `timeout` seconds pass, 499 if the client of `request` disconnects first."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            await asyncio.wait({task} | ({gone} if gone else set()), timeout=0.5,
                               return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            if gone is not None and gone.done():
                raise ApiError(499, "the client closed the connection", type="client_closed_request")
            if not loop.alive:
                raise ApiError(503, "the engine loop has stopped", type="server_unhealthy")
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(503, f"the engine did not answer within {timeout:g} s; retry later",
                               type="server_overloaded")
    finally:
        for t in (task, gone):
            if t is not None and not t.done():
                t.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _AbortingStream(StreamingResponse):
    """A streaming response that calls `on_exit` however it ends: finished, client gone (even
    before the first byte), or cancelled. Aborting a finished job is a no-op."""

    def __init__(self, content: AsyncIterator[str], on_exit: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_exit = on_exit

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_exit()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _events(outputs: OutputStream, loop: EngineLoop, answer: R.Answer) -> AsyncIterator[str]:
    """Server-sent events for one admitted request: each event carries what is new since the last one
    for one choice (the engine holds back text that may still be the start of a stop string)."""
    for chunk in answer.opening():
        yield _sse(chunk)
    while True:
        try:
            d = await _from_loop(loop, outputs.get())
        except ApiError as e:
            yield _sse(e.body())
            break
        for chunk in answer.chunks(d):
            yield _sse(chunk)
        if d.finished:
            break
    yield "data: [DONE]\n\n"
