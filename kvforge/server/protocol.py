"""The OpenAI wire format: request bodies (validated with pydantic), errors, responses, stream chunks.

Requests accept OpenAI's fields, vLLM's extras (`top_k`, `ignore_eos`, `stop_token_ids`) and
kvforge's (`cache_salt`, `priority`, `chunks`, `recompute_ratio`). Unknown fields are refused (400)
so that a typo is not silently ignored; OpenAI fields kvforge does not implement are accepted at
their neutral value only. Nothing here touches the engine.

Chunks (kvforge's extension): `POST /v1/chunks` registers a document chunk (`ChunkCreateRequest`),
whose KV is computed once and reused by every request that names it. A completion or chat
completion with `chunks: [id, ...]` has the prompt "the chunks in order, then the query", where the
query is `prompt` for /v1/completions and, for /v1/chat/completions, the messages rendered with the
chat template exactly as without chunks (so the template's own system prompt, if any, follows the
chunks). `recompute_ratio` (default 0.15) is the fraction of each chunk after the first that the
request recomputes in context (see `LLMEngine.add_chunk_request`).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from kvforge.engine import KVEvent
from kvforge.types import CHUNK_KINDS, Chunk, InvalidRequestError, OutputKind, SamplingParams


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field (`messages.0.content`)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    return ApiError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None)


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union in the error location (`prompt.list[int].0`)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "TextPart"))


# ---- requests -----------------------------------------------------------------------------------

DEFAULT_RECOMPUTE_RATIO = 0.15


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Neutral(_Strict):
    """OpenAI fields kvforge does not implement: accepted only at the value that changes nothing."""

    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to a value other than its neutral one, else None."""
        for name in ("presence_penalty", "frequency_penalty", "top_logprobs"):
            if getattr(self, name):
                return name
        if self.logit_bias:
            return "logit_bias"
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        return None


class BaseRequest(_Neutral):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # vLLM extras
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # kvforge extras
    cache_salt: str | None = None
    priority: int = 0
    chunks: list[str] | None = None  # registered chunk ids, composed in order before the query
    recompute_ratio: float | None = None  # with chunks; None: DEFAULT_RECOMPUTE_RATIO

    @field_validator("recompute_ratio", mode="before")
    @classmethod
    def _not_a_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("recompute_ratio must be a number in [0, 1], not a boolean")
        return v

    def check(self) -> None:
        """Refusals that are not about types: n > 1, unsupported fields, chunk fields out of range."""
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: kvforge returns one choice per request; "
                                f"send n requests", param="n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        name = self.unsupported()
        if name is not None:
            raise ApiError(400, f"{name} is not supported by kvforge; leave it unset", param=name)
        if self.chunks is not None and not self.chunks:
            raise ApiError(400, "chunks is empty: list the ids of registered chunks (POST /v1/chunks), or "
                                "leave it unset", param="chunks")
        if self.recompute_ratio is not None:
            if self.chunks is None:
                raise ApiError(400, "recompute_ratio only applies to a request with chunks", param="recompute_ratio")
            if not 0 <= self.recompute_ratio <= 1:
                raise ApiError(400, f"recompute_ratio must be a number in [0, 1], got {self.recompute_ratio!r}",
                               param="recompute_ratio")

    @property
    def chunk_ids(self) -> tuple[str, ...]:
        return tuple(self.chunks or ())

    @property
    def ratio(self) -> float:
        return DEFAULT_RECOMPUTE_RATIO if self.recompute_ratio is None else self.recompute_ratio

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """SamplingParams for this request (max_tokens None: up to the model length, resolved by the
        engine; outputs are DELTAs, so each step hands the server only what is new). Raises
        ApiError(400) naming the bad field."""
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed,
                cache_salt=self.cache_salt, output_kind=OutputKind.DELTA)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None


class CompletionRequest(BaseRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise ApiError(400, "echo is not supported by kvforge; leave it unset", param="echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported by kvforge; leave it unset", param="best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by kvforge; leave it unset", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or a list of token ids. Several prompts in one request: 400."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"got {len(p)} prompts; kvforge takes one prompt per request: send "
                                    f"one request per prompt", param="prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt is empty; give at least one character or token", param="prompt")
        return p


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools are not supported by kvforge; leave them unset", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "response_format other than text is not supported by kvforge",
                           param="response_format")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_CHUNK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class ChunkCreateRequest(_Strict):
    """POST /v1/chunks: a document chunk as `text` or as `token_ids` (exactly one), its `kind`
    ("system": placed first, at most one per request; "context": anywhere after it) and an optional
    `id` (default: one derived from the content, so registering the same content again returns the
    same chunk)."""

    text: str | None = None
    token_ids: list[StrictInt] | None = None
    kind: str = "context"
    id: str | None = None
    model: str | None = None

    def check(self) -> None:
        if (self.text is None) == (self.token_ids is None):
            raise ApiError(400, "give the chunk's content as exactly one of text or token_ids", param="text")
        if self.text is not None and not self.text:
            raise ApiError(400, "text is empty: a chunk needs at least one character", param="text")
        if self.token_ids is not None and not self.token_ids:
            raise ApiError(400, "token_ids is empty: a chunk needs at least one token", param="token_ids")
        if self.kind not in CHUNK_KINDS:
            raise ApiError(400, f"kind must be one of {', '.join(CHUNK_KINDS)}, got {self.kind!r}", param="kind")
        if self.id is not None and not _CHUNK_ID.fullmatch(self.id):
            raise ApiError(400, f"id {self.id!r} is not a valid chunk id: 1 to 128 letters, digits, '.', '_', "
                                f"':' or '-', starting with a letter or digit", param="id")

    @property
    def param(self) -> str:
        """The field that holds the content."""
        return "text" if self.text is not None else "token_ids"

    def prompt(self) -> str | dict[str, list[int]]:
        """The content as an engine prompt."""
        return self.text if self.text is not None else {"prompt_token_ids": list(self.token_ids or ())}


# ---- responses ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def kv_event(event: KVEvent) -> dict:
    """A KV event as GET /v1/kv_events shows it: its type and fields, hashes as hex."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for name in getattr(event, "__slots__", ()):
        value = getattr(event, name)
        if name == "block_hashes":
            value = [h.hex() for h in value]
        elif name == "parent_hash":
            value = value.hex() if value is not None else None
        elif name == "token_ids":
            value = list(value)
        out[name] = value
    return out


def chunk_object(chunk: Chunk, created: int, model: str) -> dict:
    """A registered chunk as /v1/chunks shows it."""
    return {"id": chunk.chunk_id, "object": "chunk", "created": created, "model": model, "kind": chunk.kind,
            "num_tokens": chunk.num_tokens, "num_pages": len(chunk.page_indices)}


def completion(rid: str, model: str, text: str, finish_reason: str | None, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_completion(rid: str, model: str, text: str, finish_reason: str | None, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, text: str | None, finish_reason: str | None,
                     with_usage: bool, use: dict | None = None) -> dict:
    """A stream chunk; text None means the usage-only chunk (no choices)."""
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = use
    return chunk


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish_reason: str | None,
               with_usage: bool, use: dict | None = None) -> dict:
    """A stream chunk; delta None means the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = use
    return chunk
