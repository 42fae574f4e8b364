"""The OpenAI wire format: request bodies (validated with pydantic), errors, responses, stream chunks.

Requests accept OpenAI's fields, vLLM's extras (`top_k`, `ignore_eos`, `stop_token_ids`) and
kvforge's (`cache_salt`, `priority`, `chunks`). Unknown fields are refused (400) so that a typo is
not silently ignored; OpenAI fields kvforge does not implement are accepted at their neutral value
only. Nothing here touches the engine.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvforge.types import SamplingParams


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


CHUNKS_UNAVAILABLE = ("chunk KV reuse is not available in this build of kvforge: /v1/chunks and the "
                      "`chunks` field will work once document-chunk caching lands")


def chunks_unavailable(param: str | None = None) -> ApiError:
    return ApiError(501, CHUNKS_UNAVAILABLE, type="not_implemented_error", param=param, code="chunks_unavailable")


def validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field (`messages.0.content`)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    return ApiError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None)


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union in the error location (`prompt.list[int].0`)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "TextPart"))


# ---- requests -----------------------------------------------------------------------------------

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
    chunks: list[Any] | None = None

    def check(self) -> None:
        """Refusals that are not about types: n > 1, unsupported fields, chunks (501)."""
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: kvforge returns one choice per request; "
                                f"send n requests", param="n")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        name = self.unsupported()
        if name is not None:
            raise ApiError(400, f"{name} is not supported by kvforge; leave it unset", param=name)
        if self.chunks is not None:
            raise chunks_unavailable("chunks")

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """SamplingParams for this request; a None max_tokens becomes 1 here and is resolved by the
        engine loop once the prompt is tokenized. Raises ApiError(400) naming the bad field."""
        kw = dict(max_tokens=1 if max_tokens is None else max_tokens,
                  temperature=1.0 if self.temperature is None else self.temperature,
                  top_p=1.0 if self.top_p is None else self.top_p,
                  top_k=self.top_k or 0, stop=self.stop, stop_token_ids=self.stop_token_ids,
                  ignore_eos=self.ignore_eos, seed=self.seed, cache_salt=self.cache_salt)
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise ApiError(400, str(e), param=field if field in kw else None) from None


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


# ---- responses ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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
