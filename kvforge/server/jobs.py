"""Jobs: what an HTTP handler hands the engine loop, and the stream of results it gets back.

A handler (on uvicorn's asyncio loop) tokenizes the request in a worker thread, creates its `Job`s
(one per prompt of a completion request) or a `ChunkJob` (a chunk registration) and submits them;
the loop thread posts results back with `call_soon_threadsafe`, so everything that touches the
asyncio objects below runs on the asyncio loop.

`OutputStream` is a request's mailbox, shared by the jobs of its prompts. The engine hands it only
what is new each step (OutputKind.DELTA; FINAL_ONLY hands everything at once), and it coalesces
what the handler has not read yet into one pending delta: however slowly a client reads, the server
holds one pending delta (at most the request's output) per request, never a backlog of outputs. A
single-body request's handler is woken once, when every prompt is done.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from kvforge.engine import PreparedRequest
from kvforge.server.protocol import DEFAULT_RECOMPUTE_RATIO, ApiError
from kvforge.types import Logprob, RequestOutput, SamplingParams


@dataclass
class ChoiceDelta:
    """What one choice (one completion of one prompt) produced since the handler last read: its
    text (kept as pieces, joined once when read), its new token ids with, when asked for, their
    logprobs (per token: {token id: Logprob}, the top k and the token itself), and its
    finish_reason once it is done."""

    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class PromptResult:
    """What the engine says of one prompt, with its first output: its token ids (with chunks: the
    whole composed prompt) and, with SamplingParams.prompt_logprobs, one entry per token (None for
    the first)."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None] | None


@dataclass
class Delta:
    """What a request produced since the handler last read: per choice (index = prompt index * n +
    completion index) what is new, the prompts whose first output came, and at the end `finished`
    with the usage counts (all prompts and completions together)."""

    choices: dict[int, ChoiceDelta] = field(default_factory=dict)
    prompts: dict[int, PromptResult] = field(default_factory=dict)
    finished: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


class OutputStream:
    """A request's results, coalesced (see the module docstring): `n` completions for each of
    `num_prompts` prompts. `put`/`fail` on the asyncio loop. With `wake_each_step` False (a single
    JSON body), the reader is woken only when every prompt is done, or by an error, once, instead of
    on every step."""

    def __init__(self, n: int = 1, num_prompts: int = 1, wake_each_step: bool = True) -> None:
        self._n, self._num_prompts, self._wake_each_step = n, num_prompts, wake_each_step
        self._pending: Delta | None = None
        self._error: ApiError | None = None
        self._ready = asyncio.Event()
        self._seen: set[int] = set()  # prompts whose first output came
        self._usage = [0, 0, 0]  # prompt, output and cached tokens of the finished prompts
        self._num_finished = 0

    def put(self, out: RequestOutput, prompt: int = 0) -> None:
        """Merge a DELTA (or final) RequestOutput of prompt number `prompt` into the pending delta."""
        d = self._pending or Delta()
        for o in out.outputs:
            c = d.choices.setdefault(prompt * self._n + o.index, ChoiceDelta())
            c.pieces.append(o.text)
            c.token_ids += o.token_ids
            c.logprobs += o.logprobs or ()
            c.finish_reason = o.finish_reason or c.finish_reason
            self._usage[1] += len(o.token_ids)
        if prompt not in self._seen:
            self._seen.add(prompt)
            d.prompts[prompt] = PromptResult(out.prompt_token_ids, out.prompt_logprobs)
        if out.finished:
            self._num_finished += 1
            self._usage[0] += len(out.prompt_token_ids)
            self._usage[2] += out.num_cached_tokens
            if self._num_finished == self._num_prompts:
                d.finished = True
                d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens = self._usage
        self._pending = d
        if self._wake_each_step or d.finished:
            self._ready.set()

    def fail(self, err: ApiError) -> None:
        self._error = err
        self._ready.set()

    async def get(self) -> Delta:
        """The next delta (everything since the last get); raises the request's ApiError if one of
        its jobs failed."""
        await self._ready.wait()
        if self._error is not None:
            raise self._error
        d, self._pending = self._pending, None
        self._ready.clear()
        assert d is not None
        return d


@dataclass(eq=False)
class Job:
    """One prompt of a completion request between its handler and the loop.

    The handler creates it with the prompt already tokenized (`engine_prompt`), submits it (with
    the request's other prompts), awaits `admitted` (None, or an ApiError raised) and then reads
    `outputs`, which the request's jobs share (`prompt_index` says which prompt this is). Fields
    below `prompt_index` belong to the loop thread.
    """

    request_id: str
    engine_prompt: dict[str, Any]  # {"prompt"?: text, "prompt_token_ids": ids}
    chat: bool
    params: SamplingParams  # max_tokens None: up to the model length (the engine resolves it)
    priority: int
    aloop: asyncio.AbstractEventLoop
    admitted: asyncio.Future
    chunks: tuple[str, ...] = ()  # registered chunk ids composed before the prompt (the query)
    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    outputs: OutputStream = field(default_factory=OutputStream)
    prompt_index: int = 0
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
