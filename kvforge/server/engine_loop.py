"""EngineLoop: the one thread that owns the engine. Every engine call of the server happens here.

HTTP handlers (on uvicorn's asyncio loop) never touch the engine: they put a `Job` in the inbox
(`submit`), ask for its end (`abort`), or ask for a function to run between two steps (`call`).
The loop thread, each turn:

    1. takes the inbox: tokenizes new jobs and admits, queues or refuses them (admission.py),
       aborts jobs whose client has gone (their blocks are freed at once), runs `call`s;
    2. gives up queued jobs past their deadline (503), admits queued jobs from the head while they fit;
    3. runs one `engine.step()` if anything is unfinished, so every client's request joins the same
       continuous batch, and hands the outputs back to the asyncio loop, all in one
       `call_soon_threadsafe` per turn.

It sleeps on a condition variable while there is nothing to do.

Chunks: `register_chunk`, `unregister_chunk` and `list_chunks` are `call`s too, so a chunk is
registered (its KV computed) between two steps, on this thread. A job with `chunks` is composed
from them by `engine.add_chunk_request`; it is sized, admitted, queued, streamed and aborted like
any other job. A chunk named by a queued job counts as in use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvforge.engine import LLMEngine
from kvforge.metrics import ServerMetrics
from kvforge.server.admission import AdmissionQueue, blocks_needed, headroom, shrunk_max_tokens
from kvforge.server.config import ServerConfig
from kvforge.server.protocol import DEFAULT_RECOMPUTE_RATIO, ApiError
from kvforge.types import Chunk, RequestOutput, SamplingParams

log = logging.getLogger("kvforge.server")

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages


@dataclass(eq=False)
class Job:
    """One request between its HTTP handler and the loop.

    The handler creates it (on the asyncio loop), submits it, awaits `admitted` (None, or an
    ApiError raised) and then reads `outputs`: RequestOutputs until one is `finished` (only that one
    when `stream` is false), or an ApiError if the engine failed. Fields below `outputs` belong to
    the loop thread.
    """

    request_id: str
    prompt: Prompt
    chat: bool
    params: SamplingParams
    max_tokens: int | None  # None: as many as the model length and the whole cache allow
    priority: int
    stream: bool
    aloop: asyncio.AbstractEventLoop
    admitted: asyncio.Future
    chunks: tuple[str, ...] = ()  # registered chunk ids composed before the prompt (the query)
    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    received: float = field(default_factory=time.monotonic)
    state: str = "new"  # new -> queued -> running -> done (or new/queued -> done)
    num_prompt_tokens: int = 0  # the whole prompt (with chunks: the chunks' tokens and the query's)
    num_private_tokens: int = 0  # prompt tokens that take blocks: all, or the query and recomputed chunk tokens
    need: int = 0  # blocks the request may ever hold (admission.blocks_needed)
    engine_prompt: dict[str, Any] = field(default_factory=dict)
    last_token_time: float | None = None
    num_tokens: int = 0

    @classmethod
    def create(cls, request_id: str, prompt: Prompt, *, chat: bool, params: SamplingParams,
               max_tokens: int | None, priority: int, stream: bool, chunks: tuple[str, ...] = (),
               recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO) -> Job:
        """Call on the asyncio loop that will await the job."""
        aloop = asyncio.get_running_loop()
        return cls(request_id, prompt, chat, params, max_tokens, priority, stream, aloop, aloop.create_future(),
                   tuple(chunks), recompute_ratio)


class EngineLoop:
    """Steps `engine` on its own thread for the server; see the module docstring.

    `submit`, `abort` and `call` are thread-safe and never block on the engine.
    """

    def __init__(self, engine: LLMEngine, config: ServerConfig, metrics: ServerMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvforge-engine-loop", daemon=True)
        # loop-thread state
        self._jobs: dict[str, Job] = {}  # admitted and not finished
        self._queue: AdmissionQueue[Job] = AdmissionQueue()
        self._posts: list[tuple[asyncio.AbstractEventLoop, Callable, tuple]] = []
        self._chunk_created: dict[str, int] = {}  # chunk id -> when it was registered (unix seconds)
        self.healthy = True

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping: unfinished jobs get an error (503), their blocks are freed; later
        submissions are refused at once. Idempotent."""
        self._put("stop", None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        if not self._put("submit", job):
            job.aloop.call_soon_threadsafe(_resolve, job.admitted, _shutting_down())

    def abort(self, job: Job) -> None:
        """End `job` wherever it is (queued or running) and free its blocks. No-op once done."""
        self._put("abort", job)

    def call(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the loop thread between two steps; the future holds its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._put("call", (fn, fut)):
            fut.set_exception(_shutting_down())
        return fut

    def snapshot(self) -> concurrent.futures.Future:
        """A future of (engine.stats(), requests queued for cache room), taken between two steps."""
        return self.call(lambda engine: (engine.stats(), len(self._queue)))

    def register_chunk(self, prompt: str | dict[str, list[int]], kind: str, chunk_id: str | None,
                       param: str = "text") -> concurrent.futures.Future:
        """A future of (Chunk, created) for the chunk `prompt` (see `LLMEngine.register_chunk`), or of
        an ApiError: 400 for what can never be registered as asked (`param` names the content's
        field), 503 while the cache has no room for it now."""
        return self.call(lambda engine: self._register_chunk(prompt, kind, chunk_id, param))

    def unregister_chunk(self, chunk_id: str) -> concurrent.futures.Future:
        """A future of None once the chunk's pages are free, or of an ApiError: 404 for an unknown id,
        409 while a request (running, waiting or queued for room) uses it."""
        return self.call(lambda engine: self._unregister_chunk(chunk_id))

    def list_chunks(self) -> concurrent.futures.Future:
        """A future of [(Chunk, created)] in registration order."""
        return self.call(lambda engine: [(c, self._created(c.chunk_id)) for c in engine.list_chunks()])

    def _put(self, kind: str, payload: Any) -> bool:
        with self._cv:
            if self._stopping:
                return False
            self._inbox.append((kind, payload))
            if kind == "stop":
                self._stopping = True
            self._cv.notify()
            return True

    # ---- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                if not self._inbox and not engine.has_unfinished_requests():
                    deadline = self._queue.next_deadline()
                    self._cv.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                inbox, self._inbox = self._inbox, []
            stop = False
            for kind, payload in inbox:
                if kind == "stop":
                    stop = True
                else:
                    getattr(self, "_on_" + kind)(payload)
            if stop:
                break
            self._expire_queued(time.monotonic())
            self._admit_queued()
            if engine.has_unfinished_requests():
                self._step()
                self._admit_queued()  # what just finished made room: admit now, before any sleep
            self._flush()
        self._shutdown()

    def _on_submit(self, job: Job) -> None:
        try:
            self._prepare(job)
        except ApiError as e:
            return self._fail(job, e)
        policy, bs = self.config.on_full, self.engine.cache.block_size
        if policy == "wait":
            if not self._queue and job.need <= headroom(self.engine):
                return self._start(job)
            if len(self._queue) >= self.config.max_queue:
                return self._fail(job, self._busy(429, f"the admission queue is full ({self.config.max_queue} "
                                                       f"requests wait for KV cache room); retry later"))
            job.state = "queued"
            self._queue.push(job, job.priority, job.received + self.config.queue_timeout)
            return None
        room = headroom(self.engine)
        if job.need <= room:
            return self._start(job)
        if policy == "shrink":
            fit = shrunk_max_tokens(job.num_private_tokens, room, bs)
            if fit >= 1:
                job.params = dataclasses.replace(job.params, max_tokens=fit)
                return self._start(job)
        return self._fail(job, self._busy(503, f"the KV cache is full: the request needs {job.need} blocks "
                                               f"for its prompt and max_tokens, {max(room, 0)} are free "
                                               f"now; retry later"))

    def _on_abort(self, job: Job) -> None:
        if job.state == "queued":
            self._queue.remove(job)
        elif job.state == "running":
            self.engine.abort_request(job.request_id)
            self._jobs.pop(job.request_id, None)
            self.metrics.finished(job.num_prompt_tokens, job.num_tokens, "abort")
        job.state = "done"

    def _on_call(self, payload: tuple[Callable, concurrent.futures.Future]) -> None:
        fn, fut = payload
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

    def _prepare(self, job: Job) -> None:
        """Tokenize and size `job`; refuse (ApiError 400) what could never run."""
        engine, tok = self.engine, self.engine.tokenizer
        chunks = self._resolve_chunks(job.chunks)
        try:
            if job.chat:
                text = tok.apply_chat_template(job.prompt, add_generation_prompt=True)
                ids = tok.encode(text, add_special_tokens=False)
                job.engine_prompt = {"prompt": text, "prompt_token_ids": ids}
            elif isinstance(job.prompt, str):
                if not job.prompt:
                    raise ValueError("prompt is empty; give at least one character or token")
                # A query after chunks continues the prompt: no BOS (as LLMEngine.add_chunk_request).
                ids = tok.encode(job.prompt, add_special_tokens=not job.chunks)
                job.engine_prompt = {"prompt": job.prompt, "prompt_token_ids": ids}
            else:
                ids = job.prompt
                vocab = engine.model_config.vocab_size
                bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ValueError(f"prompt[{bad}] = {ids[bad]} is not a token id; allowed: integers in "
                                     f"[0, {vocab - 1}]")
                job.engine_prompt = {"prompt_token_ids": list(ids)}
        except ValueError as e:
            raise ApiError(400, str(e), param="messages" if job.chat else "prompt") from None
        n, bs, limit = len(ids) + sum(c.num_tokens for c in chunks), engine.cache.block_size, engine.max_model_len
        # A chunk request holds blocks only for its private tokens: the query and, of every chunk
        # after the first, the ceil(recompute_ratio * its length) tokens it recomputes (either rule).
        private = len(ids) + sum(math.ceil(job.recompute_ratio * c.num_tokens) for c in chunks[1:])
        cache_tokens = engine.cache.num_blocks * bs + 1  # the last sampled token is never stored
        max_tokens = job.max_tokens
        if max_tokens is None:
            # As many as the model length and the cache allow, counting only the blocks that
            # registered chunks do not hold: more could never be admitted while they are registered.
            usable = (engine.cache.num_blocks - engine.cache.stats().num_chunk_blocks) * bs + 1
            max_tokens = min(limit - n, cache_tokens - n, usable - private)
            if max_tokens < 1:
                raise ApiError(400, f"prompt of {n} tokens leaves no room for a reply within the model's length "
                                    f"({limit} tokens) and the cache ({usable - 1} tokens not held by registered "
                                    f"chunks); shorten it", param="messages" if job.chat else "prompt",
                               code="context_length_exceeded")
        if n + max_tokens > limit:
            raise ApiError(400, f"prompt of {n} tokens plus max_tokens={max_tokens} is over the model's "
                                f"length of {limit} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens" if n < limit else "prompt", code="context_length_exceeded")
        if n + max_tokens > cache_tokens:
            raise ApiError(400, f"prompt of {n} tokens plus max_tokens={max_tokens} needs more KV blocks than "
                                f"the whole cache holds ({engine.cache.num_blocks} of {bs} tokens); shorten "
                                f"the prompt or lower max_tokens", param="max_tokens")
        job.params = dataclasses.replace(job.params, max_tokens=max_tokens)
        job.num_prompt_tokens, job.num_private_tokens = n, private
        job.need = blocks_needed(private, max_tokens, bs)

    def _resolve_chunks(self, chunk_ids: tuple[str, ...]) -> list[Chunk]:
        """The registered chunks a job names, in its order; ApiError 400 (param "chunks") for an
        unknown id or a system chunk anywhere but first."""
        if not chunk_ids:
            return []
        registered = {c.chunk_id: c for c in self.engine.list_chunks()}
        unknown = [c for c in chunk_ids if c not in registered]
        if unknown:
            known = ", ".join(list(registered)[:10]) or "none"
            raise ApiError(400, f"unknown chunk id {unknown[0]!r}: register it first (POST /v1/chunks); "
                                f"registered chunks: {known}", param="chunks", code="chunk_not_found")
        chunks = [registered[c] for c in chunk_ids]
        if any(c.kind == "system" for c in chunks[1:]):
            raise ApiError(400, "a system chunk must come first in chunks, and at most one per request",
                           param="chunks")
        return chunks

    def _start(self, job: Job) -> None:
        try:
            if job.chunks:
                self.engine.add_chunk_request(job.request_id, list(job.chunks), job.engine_prompt, job.params,
                                              job.recompute_ratio, priority=job.priority)
            else:
                self.engine.add_request(job.request_id, job.engine_prompt, job.params, priority=job.priority)
        except ValueError as e:  # the engine's own validation: the caller's mistake, nothing was kept
            return self._fail(job, ApiError(400, str(e)))
        job.state = "running"
        self._jobs[job.request_id] = job
        self.metrics.queue_time.observe(time.monotonic() - job.received)
        self._post(job, _resolve, job.admitted, None)
        return None

    def _register_chunk(self, prompt: str | dict[str, list[int]], kind: str, chunk_id: str | None,
                        param: str) -> tuple[Chunk, int]:
        """On the loop thread. Checks in the order that gives the right status: what no retry can
        fix (400) before what the cache lacks now (503). A chunk takes blocks only within the
        admission headroom, so registering never forces a preemption of an admitted request."""
        engine = self.engine
        try:
            text, ids = engine.tokenize_chunk(prompt, kind)
        except ValueError as e:  # the engine names the field prompt_token_ids
            raise ApiError(400, str(e).replace("prompt_token_ids", "token_ids"), param=param) from None
        if len(ids) > engine.max_model_len:
            raise ApiError(400, f"a chunk of {len(ids)} tokens is over the model's length of "
                                f"{engine.max_model_len} tokens; split it", param=param,
                           code="context_length_exceeded")
        before = {c.chunk_id: c for c in engine.list_chunks()}
        key = chunk_id if chunk_id is not None else engine.default_chunk_id(ids, kind)
        old = before.get(key)
        if old is not None and (old.token_ids != tuple(ids) or old.kind != kind):
            raise ApiError(400, f"chunk id {key!r} is already registered with other content; delete it "
                                f"first (DELETE /v1/chunks/{key}) or use another id", param="id",
                           code="chunk_id_taken")
        # Registering content under an id that holds it already returns that chunk and takes nothing.
        if old is None:
            cache = engine.cache
            need = math.ceil(len(ids) / cache.block_size)
            taken, budget = cache.stats().num_chunk_blocks, cache.chunk_budget
            if taken + need > budget:
                raise ApiError(400, f"the chunk needs {need} KV blocks but the chunk budget is {budget} blocks "
                                    f"(max_chunk_fraction of the cache) and registered chunks hold {taken}: "
                                    f"delete a chunk (DELETE /v1/chunks/{{id}}) or shorten this one", param=param,
                               code="chunk_budget_exceeded")
            room = headroom(engine)
            if need > room:
                raise self._busy(503, f"the KV cache has no room for the chunk now: it needs {need} blocks, "
                                      f"{max(room, 0)} are free of running requests; retry later")
        try:
            chunk = engine.register_chunk({"prompt": text, "prompt_token_ids": ids}, kind, chunk_id)
        except ValueError as e:  # what the checks above did not foresee: nothing was kept
            raise ApiError(400, str(e), param=param) from None
        if before.get(chunk.chunk_id) is not chunk:
            self._chunk_created[chunk.chunk_id] = int(time.time())
        return chunk, self._created(chunk.chunk_id)

    def _unregister_chunk(self, chunk_id: str) -> None:
        if chunk_id not in {c.chunk_id for c in self.engine.list_chunks()}:
            raise ApiError(404, f"no chunk {chunk_id!r} is registered", type="not_found_error", param="id",
                           code="chunk_not_found")
        queued = sum(chunk_id in job.chunks for job in self._queue)
        if queued:
            raise ApiError(409, f"chunk {chunk_id!r} is in use by {queued} request(s) waiting for cache room; "
                                f"delete it once they finish", param="id", code="chunk_in_use")
        try:
            self.engine.unregister_chunk(chunk_id)
        except ValueError as e:  # the chunk is known: it is in use
            raise ApiError(409, str(e), param="id", code="chunk_in_use") from None
        self._chunk_created.pop(chunk_id, None)

    def _created(self, chunk_id: str) -> int:
        """When a chunk was registered; for one registered on the engine before the server saw it,
        when the server first saw it."""
        return self._chunk_created.setdefault(chunk_id, int(time.time()))

    def _expire_queued(self, now: float) -> None:
        for job in self._queue.pop_expired(now):
            job.state = "done"
            self._fail(job, self._busy(503, f"timed out after {self.config.queue_timeout:g} s waiting for KV "
                                            f"cache room; retry later"))

    def _admit_queued(self) -> None:
        if not self._queue:
            return
        room = headroom(self.engine)
        while self._queue and self._queue.head().need <= room:
            job = self._queue.pop_head()
            room -= job.need
            self._start(job)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # our bug, not the caller's: fail what runs, keep serving if we can
            log.exception("engine step failed")
            self.healthy = False
            err = ApiError(500, f"the engine failed: {type(e).__name__}: {e}", type="internal_server_error")
            for job in list(self._jobs.values()):
                try:
                    self.engine.abort_request(job.request_id)
                except Exception:
                    log.exception("could not abort %s after the failed step", job.request_id)
                self._jobs.pop(job.request_id)
                job.state = "done"
                self._post(job, job.outputs.put_nowait, err)
            return
        now = time.monotonic()
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if job is not None:
                self._on_output(job, out, now)

    def _on_output(self, job: Job, out: RequestOutput, now: float) -> None:
        n = len(out.outputs[0].token_ids)
        if n > job.num_tokens:
            if job.last_token_time is None:
                self.metrics.ttft.observe(now - job.received)
            else:
                gap = (now - job.last_token_time) / (n - job.num_tokens)
                for _ in range(n - job.num_tokens):
                    self.metrics.itl.observe(gap)
            job.num_tokens, job.last_token_time = n, now
        if out.finished:
            del self._jobs[job.request_id]
            job.state = "done"
            self.metrics.finished(job.num_prompt_tokens, n, out.outputs[0].finish_reason or "stop")
        if job.stream or out.finished:
            self._post(job, job.outputs.put_nowait, out)

    def _busy(self, status: int, message: str) -> ApiError:
        return ApiError(status, message, type="server_overloaded" if status == 503 else "rate_limit_exceeded",
                        code="kv_cache_full" if status == 503 else "queue_full",
                        headers={"Retry-After": str(self.config.retry_after)})

    def _fail(self, job: Job, err: ApiError) -> None:
        job.state = "done"
        self._post(job, _resolve, job.admitted, err)

    def _post(self, job: Job, fn: Callable, *args: Any) -> None:
        self._posts.append((job.aloop, fn, args))

    def _flush(self) -> None:
        """Hand this turn's results to their asyncio loops, one wake-up per loop."""
        if not self._posts:
            return
        posts, self._posts = self._posts, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for aloop, fn, args in posts:
            by_loop.setdefault(aloop, []).append((fn, args))
        for aloop, calls in by_loop.items():
            try:
                aloop.call_soon_threadsafe(_run_all, calls)
            except RuntimeError:  # that loop is closed: its handlers are gone
                pass

    def _shutdown(self) -> None:
        err = _shutting_down()
        while self._queue:
            self._fail(self._queue.pop_head(), err)
        for job in list(self._jobs.values()):
            self.engine.abort_request(job.request_id)
            job.state = "done"
            self._post(job, job.outputs.put_nowait, err)
        self._jobs.clear()
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind == "submit":
                self._fail(payload, err)
            elif kind == "call":
                payload[1].set_exception(_shutting_down())
        self._flush()


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_shutting_down")


def _resolve(fut: asyncio.Future, err: ApiError | None) -> None:
    if not fut.done():
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


def _run_all(calls: list[tuple[Callable, tuple]]) -> None:
    for fn, args in calls:
        fn(*args)
