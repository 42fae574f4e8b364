"""EngineLoop: the one thread that owns the engine. Every engine call of the server happens here, and
this thread does nothing but engine work: tokenizing and chat templating happen before a job gets
here (the handlers' worker threads).

HTTP handlers (on uvicorn's asyncio loop) never touch the engine: they put a request's `Job`s (one
per prompt) or a `ChunkJob` in the inbox (`submit`, `register`), ask for its end (`abort`), or ask for a function to run between
two steps (`call`). The loop thread, each turn:

    1. takes the inbox: prepares new jobs (the engine's validation: all the prompts of a request
       before any of them is admitted) and admits, queues or refuses them (admission.py), aborts jobs whose client has gone (their blocks are freed at once),
       queues chunk registrations (their prefill is an ordinary prefill of the next steps), runs
       `call`s;
    2. gives up queued jobs past their deadline (503), admits queued jobs from the head while they fit;
    3. runs one `engine.step()` if anything is unfinished, so every client's request joins the same
       continuous batch, and hands the outputs back to the asyncio loops, one `call_soon_threadsafe`
       per loop per turn.

Nothing one request does stops this thread: whatever preparing, admitting or aborting a job raises
fails that job alone (a 4xx for the caller's mistakes, 500 otherwise), and a failed step fails only
the requests of that step (500), after which the engine's integrity is checked and serving goes on
(`healthy` is false while steps keep failing or the engine is not intact). It sleeps on a condition
variable while there is nothing to do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kvforge.engine import LLMEngine, NoFreeBlocksError, StepError
from kvforge.metrics import ServerMetrics
from kvforge.server import admission
from kvforge.server.admission import AdmissionQueue
from kvforge.server.config import ServerConfig
from kvforge.server.jobs import ChunkJob, Job
from kvforge.server.protocol import ApiError
from kvforge.types import Chunk, RequestOutput

log = logging.getLogger("kvforge.server")

MAX_FAILED_STEPS = 3  # consecutive failed steps after which the engine reports unhealthy


class EngineLoop:
    """Steps `engine` on its own thread for the server; see the module docstring.

    `submit`, `register`, `abort` and `call` are thread-safe and never block on the engine.
    """

    def __init__(self, engine: LLMEngine, config: ServerConfig, metrics: ServerMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvforge-engine-loop", daemon=True)
        # loop-thread state
        self._jobs: dict[str, Job | ChunkJob] = {}  # in the engine and not finished
        self._queue: AdmissionQueue[Job] = AdmissionQueue()
        self._posts: list[tuple[asyncio.AbstractEventLoop, Callable, tuple]] = []
        self._chunk_created: dict[str, int] = {}  # chunk id -> when it was registered (unix seconds)
        self._failed_steps = 0
        self._intact = True

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

    @property
    def healthy(self) -> bool:
        """The loop runs, the engine was intact after its last failure, and steps are not failing
        in a row."""
        return self.alive and self._intact and self._failed_steps < MAX_FAILED_STEPS

    def submit(self, jobs: list[Job]) -> None:
        """Admit the jobs of one request (one per prompt): each job's `admitted` gets None or an
        ApiError. When one prompt is refused by the engine's validation, every job gets that error
        and none is admitted."""
        if not self._put("submit", jobs):
            for job in jobs:
                job.aloop.call_soon_threadsafe(_resolve, job.admitted, _shutting_down())

    def register(self, job: ChunkJob) -> None:
        """Register a chunk (see `LLMEngine.add_chunk_registration`); `job.done` gets (Chunk, created)
        or an ApiError: 400 for what can never be registered as asked, 503 while the cache has no
        room for it now, 500 if its prefill failed."""
        if not self._put("register", job):
            job.aloop.call_soon_threadsafe(_resolve, job.done, _shutting_down())

    def abort(self, job: Job | ChunkJob) -> None:
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

    def unregister_chunk(self, chunk_id: str) -> concurrent.futures.Future:
        """A future of None once the chunk's pages are free, or of an ApiError: 404 for an unknown id,
        409 while a request (running, waiting or queued for room) uses it."""
        return self.call(lambda engine: self._unregister_chunk(chunk_id))

    def list_chunks(self) -> concurrent.futures.Future:
        """A future of [(Chunk, created)] in registration order."""
        return self.call(lambda engine: [(c, self._created(c.chunk_id)) for c in engine.list_chunks()])

    def take_events(self) -> concurrent.futures.Future:
        """A future of (KV events since the last call, oldest first; events dropped so far)."""
        return self.call(lambda engine: (engine.cache.take_events(), engine.cache.num_dropped_events))

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
            if any(kind == "stop" for kind, _ in inbox):
                break
            for kind, payload in inbox:
                try:
                    getattr(self, "_on_" + kind)(payload)
                except Exception as e:  # a kvforge bug met by this one item: it fails alone
                    log.exception("the engine loop failed to handle a %s", kind)
                    self._fail_item(kind, payload, e)
            self._guarded(self._expire_queued)
            self._guarded(self._admit_queued)
            if engine.has_unfinished_requests():
                self._step()
                self._guarded(self._admit_queued)  # what just finished made room: admit now, before any sleep
            elif not self._intact:
                self._check_intact()
            self._flush()
        self._shutdown()

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("the engine loop failed in %s", fn.__name__)

    def _fail_item(self, kind: str, payload: Any, e: Exception) -> None:
        err = _internal(e)
        if kind == "submit":  # every job of the request fails, those already started are aborted
            for job in payload:
                try:
                    self._on_abort(job)
                except Exception:
                    log.exception("the engine loop failed to abort %s", job.request_id)
                self._end(job, err)
        elif kind == "register":
            self._end(payload, err)
        elif kind == "call" and not payload[1].done():
            payload[1].set_exception(err)

    def _on_submit(self, jobs: list[Job]) -> None:
        engine = self.engine
        for job in jobs:
            try:
                if job.chunks:
                    job.prepared = engine.prepare_chunk_request(job.request_id, list(job.chunks), job.engine_prompt,
                                                                job.params, job.recompute_ratio, priority=job.priority)
                else:
                    job.prepared = engine.prepare_request(job.request_id, job.engine_prompt, job.params, job.priority)
            except ValueError as e:  # the engine's validation: the caller's mistake, nothing was kept
                err = _invalid(e, job.prompt_param)
                for j in jobs:
                    self._end(j, err)
                return
            job.num_prompt_tokens = job.prepared.seq.total_len
        for job in jobs:
            self._admit(job)

    def _admit(self, job: Job) -> None:
        """Start a prepared job, queue it or refuse it (503, 429), as `on_full` says."""
        engine, mode = self.engine, self.config.admission
        policy = self.config.on_full
        if policy == "wait":
            if not self._queue and admission.need(engine, job.prepared, mode) <= admission.room(engine, mode):
                return self._start(job)
            if len(self._queue) >= self.config.max_queue:
                return self._end(job, self._busy(429, f"the admission queue is full ({self.config.max_queue} "
                                                      f"requests wait for KV cache room); retry later"))
            job.state = "queued"
            self._queue.push(job, job.priority, job.received + self.config.queue_timeout)
            return None
        needed, free = admission.need(engine, job.prepared, mode), admission.room(engine, mode)
        if needed <= free:
            return self._start(job)
        if policy == "shrink" and mode == "reserve":
            seq = job.prepared.seq
            fit = admission.shrunk_max_tokens(len(seq.token_ids), free, engine.cache.block_size)
            if fit >= 1:
                seq.params = dataclasses.replace(seq.params, max_tokens=fit)
                return self._start(job)
        what = "its prompt and max_tokens" if mode == "reserve" else "its prompt"
        return self._end(job, self._busy(503, f"the KV cache is full: the request needs {needed} blocks for "
                                              f"{what}, {max(free, 0)} are free now; retry later"))

    def _on_register(self, job: ChunkJob) -> None:
        """Queue a chunk's prefill. What no retry can fix is a 400, checked (by the engine) before
        what the cache lacks now (503); a chunk takes blocks only within the admission room."""
        free = admission.room(self.engine, self.config.admission)
        try:
            registration = self.engine.add_chunk_registration(job.request_id, job.engine_prompt, job.kind,
                                                              job.chunk_id, max_blocks=free)
        except ValueError as e:
            return self._end(job, _invalid(e, job.param))
        except NoFreeBlocksError as e:
            return self._end(job, self._busy(503, f"the KV cache has no room for the chunk now: {e}; retry later"))
        if registration.chunk is not None:
            return self._end(job, None, registration.chunk)
        job.state, job.chunk_id = "running", registration.chunk_id
        self._jobs[job.request_id] = job
        return None

    def _on_abort(self, job: Job | ChunkJob) -> None:
        if job.state == "queued":
            self._queue.remove(job)
        elif job.state == "running":
            self.engine.abort_request(job.request_id)
            self._jobs.pop(job.request_id, None)
            if isinstance(job, Job):
                self.metrics.finished(job.num_prompt_tokens, job.num_tokens, "abort")
        job.state = "done"

    def _on_call(self, payload: tuple[Callable, concurrent.futures.Future]) -> None:
        fn, fut = payload
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:  # handed to the caller
                fut.set_exception(e)

    def _start(self, job: Job) -> None:
        try:
            self.engine.enqueue(job.prepared)
        except ValueError as e:  # what changed since it was prepared: nothing was kept
            return self._end(job, _invalid(e, job.prompt_param))
        job.state = "running"
        self._jobs[job.request_id] = job
        self.metrics.queue_time.observe(time.monotonic() - job.received)
        self._post(job, _resolve, job.admitted, None)
        return None

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

    def _expire_queued(self) -> None:
        for job in self._queue.pop_expired(time.monotonic()):
            self._end(job, self._busy(503, f"timed out after {self.config.queue_timeout:g} s waiting for KV "
                                           f"cache room; retry later"))

    def _admit_queued(self) -> None:
        engine, mode = self.engine, self.config.admission
        while self._queue and admission.need(engine, self._queue.head().prepared, mode) <= admission.room(engine, mode):
            self._start(self._queue.pop_head())

    # ---- stepping -----------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as e:  # the engine ended that step's requests; everything else is intact
            log.error("engine step failed: %s", e, exc_info=e.cause)
            self._step_failed(e.request_ids, e)
            return
        except Exception as e:  # failed before it had a batch: end everything it holds
            log.exception("engine step failed")
            for job in list(self._jobs.values()):
                self._guarded(lambda: self.engine.abort_request(job.request_id))
            self._step_failed(list(self._jobs), e)
            return
        self._failed_steps = 0
        self._intact = True
        now = time.monotonic()
        for out in outputs:
            job = self._jobs.get(out.request_id)
            if isinstance(job, Job):
                self._on_output(job, out, now)
            elif isinstance(job, ChunkJob):
                del self._jobs[job.request_id]
                chunk = self.engine.chunk(job.chunk_id)
                self._chunk_created[chunk.chunk_id] = int(time.time())
                self._end(job, None, chunk)

    def _step_failed(self, request_ids: list[str], e: Exception) -> None:
        """Fail the jobs of a failed step (500), then check the engine is intact."""
        self.metrics.step_failures.inc()
        self._failed_steps += 1
        err = _internal(e)
        for request_id in request_ids:
            job = self._jobs.pop(request_id, None)
            if job is not None:
                self._end(job, err)
        self._check_intact()

    def _check_intact(self) -> None:
        try:
            self.engine.check_integrity()
            self._intact = True
        except Exception:
            log.exception("the engine is not intact")
            self._intact = False

    def _on_output(self, job: Job, out: RequestOutput, now: float) -> None:
        # Steps since the last output: the most tokens one completion got (with n > 1 they decode together).
        steps = max((len(o.token_ids) for o in out.outputs), default=0)
        if steps:
            if job.last_token_time is None:
                first = out.metrics.first_token_time if out.metrics and out.metrics.first_token_time else now
                self.metrics.ttft.observe(first - job.received)
            else:
                gap = (now - job.last_token_time) / steps
                for _ in range(steps):
                    self.metrics.itl.observe(gap)
            job.num_tokens += sum(len(o.token_ids) for o in out.outputs)
            job.last_token_time = now
        if out.finished:
            del self._jobs[job.request_id]
            job.state = "done"
            reason = out.outputs[0].finish_reason if out.outputs else None
            self.metrics.finished(job.num_prompt_tokens, job.num_tokens, reason or "stop")
        self._post(job, job.outputs.put, out, job.prompt_index)

    # ---- results ------------------------------------------------------------------------------

    def _busy(self, status: int, message: str) -> ApiError:
        return ApiError(status, message, type="server_overloaded" if status == 503 else "rate_limit_exceeded",
                        code="kv_cache_full" if status == 503 else "queue_full",
                        headers={"Retry-After": str(self.config.retry_after)})

    def _end(self, job: Job | ChunkJob, err: ApiError | None, chunk: Chunk | None = None) -> None:
        """Finish `job` with `err` or its result: a job not yet admitted gets it as its admission,
        a running one in its output stream, a chunk job as its result."""
        was, job.state = job.state, "done"
        if isinstance(job, ChunkJob):
            result = err if err is not None else (chunk, self._created(chunk.chunk_id))
            self._post(job, _resolve, job.done, result)
        elif was == "running" and err is not None:
            self._post(job, job.outputs.fail, err)
        else:
            self._post(job, _resolve, job.admitted, err)

    def _post(self, job: Job | ChunkJob, fn: Callable, *args: Any) -> None:
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
            self._end(self._queue.pop_head(), err)
        for job in list(self._jobs.values()):
            self._guarded(lambda: self.engine.abort_request(job.request_id))
            self._end(job, err)
        self._jobs.clear()
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for kind, payload in inbox:
            if kind == "submit":
                for job in payload:
                    self._end(job, err)
            elif kind == "register":
                self._end(payload, err)
            elif kind == "call" and not payload[1].done():
                payload[1].set_exception(_shutting_down())
        self._flush()
        self._guarded(self.engine.close)  # cached blocks to the tiers, their threads stopped


def _invalid(e: ValueError, prompt_param: str) -> ApiError:
    """The engine's refusal as a 400 naming the field (its "prompt" is the request's `prompt_param`)."""
    param = getattr(e, "param", None)
    return ApiError(400, str(e), param=prompt_param if param == "prompt" else param, code=getattr(e, "code", None))


def _internal(e: BaseException) -> ApiError:
    return ApiError(500, f"internal server error ({type(e).__name__}: {e}); this is a kvforge bug",
                    type="internal_server_error")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_shutting_down")


def _resolve(fut: asyncio.Future, result: Any) -> None:
    """Set `fut` to `result`, or raise it there when it is an ApiError. No-op once done."""
    if not fut.done():
        if isinstance(result, ApiError):
            fut.set_exception(result)
        else:
            fut.set_result(result)


def _run_all(calls: list[tuple[Callable, tuple]]) -> None:
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:  # one handler's callback must not keep the others from theirs
            log.exception("a result callback failed")
