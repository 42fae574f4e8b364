"""Jobs: what an HTTP handler hands the engine loop, and the stream of results it gets back.

A handler (on uvicorn's asyncio loop) tokenizes the request in a worker thread, creates a `Job`
(a completion) or a `ChunkJob` (a chunk registration) and submits it; the loop thread posts results
back with `call_soon_threadsafe`, so everything that touches the asyncio objects below runs on the
asyncio loop.

`OutputStream` is a job's mailbox. The engine hands it only what is new each step
(OutputKind.DELTA), and it coalesces what the handler has not read yet into one pending delta:
however slowly a client reads, the server holds one pending delta (at most the request's output
text) per request, never a backlog of outputs. A single-body request's handler is woken once, by
the final output.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from kvforge.engine import PreparedRequest
from kvforge.server.protocol import DEFAULT_RECOMPUTE_RATIO, ApiError
from kvforge.types import RequestOutput, SamplingParams


@dataclass
class Delta:
    """What a job produced since the handler last read: `text` (kept as pieces, joined once when
    read) and `num_tokens` new tokens; at the end `finished` with its `finish_reason` and the usage
    counts."""

    pieces: list[str] = field(default_factory=list)
    num_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class OutputStream:
    """A job's results, coalesced (see the module docstring). `put`/`fail` on the asyncio loop.
    With `wake_each_step` False (a single JSON body), the reader is woken only by the final output
    or an error, once, instead of on every step."""

    def __init__(self, wake_each_step: bool = True) -> None:
        self._wake_each_step = wake_each_step
        self._pending: Delta | None = None
        self._error: ApiError | None = None
        self._ready = asyncio.Event()
        self.num_output_tokens = 0

    def put(self, out: RequestOutput) -> None:
        """Merge a DELTA (or final) RequestOutput into the pending delta."""
        o = out.outputs[0]
        self.num_output_tokens += len(o.token_ids)
        d = self._pending or Delta()
        d.pieces.append(o.text)
        d.num_tokens += len(o.token_ids)
        if out.finished:
            d.finished, d.finish_reason = True, o.finish_reason
            d.num_prompt_tokens, d.num_cached_tokens = len(out.prompt_token_ids), out.num_cached_tokens
            d.num_output_tokens = self.num_output_tokens
        self._pending = d
        if self._wake_each_step or out.finished:
            self._ready.set()

    def fail(self, err: ApiError) -> None:
        self._error = err
        self._ready.set()

    async def get(self) -> Delta:
        """The next delta (everything since the last get); raises the job's ApiError if it failed."""
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        d, self._pending = self._pending, None
        self._ready.clear()
        assert d is not None
        return d


@dataclass(eq=False)
class Job:
    """One completion request between its handler and the loop.

    The handler creates it with the prompt already tokenized (`engine_prompt`), submits it, awaits
    `admitted` (None, or an ApiError raised) and then reads `outputs`. Fields below `outputs`
    belong to the loop thread.
    """

    request_id: str
    engine_prompt: dict[str, Any]  # {"prompt"?: text, "prompt_token_ids": ids}
    chat: bool
    params: SamplingParams  # max_tokens None: up to the model length (the engine resolves it)
    priority: int
    stream: bool
    aloop: asyncio.AbstractEventLoop
    admitted: asyncio.Future
    chunks: tuple[str, ...] = ()  # registered chunk ids composed before the prompt (the query)
    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    outputs: OutputStream = field(default_factory=OutputStream)
    received: float = field(default_factory=time.monotonic)
    state: str = "new"  # new -> queued -> running -> done (or new/queued -> done)
    prepared: PreparedRequest | None = None
    num_prompt_tokens: int = 0  # the whole prompt (with chunks: the chunks' tokens and the query's)
    last_token_time: float | None = None
    num_tokens: int = 0

    @property
    def prompt_param(self) -> str:
        """The request field that holds the prompt."""
        return "messages" if self.chat else "prompt"


@dataclass(eq=False)
class ChunkJob:
    """One chunk registration (POST /v1/chunks): `done` gets (Chunk, created) or an ApiError.
    `param` names the field that holds the content (text or token_ids)."""

    request_id: str
    engine_prompt: dict[str, Any]
    kind: str
    chunk_id: str | None
    param: str
    aloop: asyncio.AbstractEventLoop
    done: asyncio.Future
    state: str = "new"  # new -> running -> done


def create_future() -> tuple[asyncio.AbstractEventLoop, asyncio.Future]:
    """The running asyncio loop and a future on it (call from a handler)."""
    aloop = asyncio.get_running_loop()
    return aloop, aloop.create_future()
