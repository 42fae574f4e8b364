"""The OpenAI wire format, requests side: request bodies (validated with pydantic) and errors.
Response bodies and stream chunks: responses.py. Nothing here touches the engine.

Requests accept OpenAI's fields, vLLM's extras (`top_k`, `ignore_eos`, `stop_token_ids`, `best_of`,
`repetition_penalty`, `min_p`, `min_tokens`, `bad_words`, `allowed_token_ids`, `prompt_logprobs`,
`skip_special_tokens`, `spaces_between_special_tokens`, `truncate_prompt_tokens`) and kvforge's
(`cache_salt`, `priority`, `chunks`, `recompute_ratio`). Unknown fields are refused (400) so that a
typo is not silently ignored; so are the OpenAI fields kvforge does not implement (`suffix`, tools,
a `response_format` other than text), unless at their neutral value. `metadata`, `store`,
`service_tier` and `user` are accepted and ignored. Every value the engine cannot take is a 400
naming its field (`param`), before anything is created.

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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from kvforge.types import CHUNK_KINDS, InvalidRequestError, OutputKind, SamplingParams

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
MAX_LOGPROBS = 20  # top log-probabilities per token a request may ask for (OpenAI's bound, vLLM's default)
MAX_PROMPTS = 128  # prompts in one /v1/completions request
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


def _check_logprobs(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value}", param=name)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class BaseRequest(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, as OpenAI) -> bias in [-100, 100]
    user: str | None = None  # accepted and ignored
    metadata: dict[str, Any] | None = None  # accepted and ignored
    store: bool | None = None  # accepted and ignored
    service_tier: str | None = None  # accepted and ignored
    # vLLM extras
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    best_of: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
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
        """Refusals that are not about types and that SamplingParams does not make: stream options
        without a stream, logprob counts out of range, chunk fields out of range."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise ApiError(400, "prompt_logprobs is not available when stream is true", param="prompt_logprobs")
        _check_logprobs("prompt_logprobs", self.prompt_logprobs)
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

    @property
    def num_logprobs(self) -> int | None:
        """Top log-probabilities per output token (SamplingParams.logprobs), None when not asked for."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top log-probabilities per prompt token (SamplingParams.prompt_logprobs)."""
        return self.prompt_logprobs

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """SamplingParams for this request (max_tokens None: up to the model length, resolved by the
        engine). Outputs are DELTAs, so each step hands the server only what is new; but a single
        body with best_of > n is FINAL_ONLY (the best n are known only at the end). Raises
        ApiError(400) naming the bad field."""
        n = _or(self.n, 1)
        kind = OutputKind.FINAL_ONLY if not self.stream and _or(self.best_of, n) > n else OutputKind.DELTA
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0),
                top_k=self.top_k or 0, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                seed=self.seed, cache_salt=self.cache_salt, output_kind=kind, n=n, best_of=self.best_of,
                presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
                repetition_penalty=_or(self.repetition_penalty, 1.0), min_p=_or(self.min_p, 0.0),
                min_tokens=self.min_tokens, logit_bias=self._logit_bias(), bad_words=self.bad_words,
                allowed_token_ids=self.allowed_token_ids, logprobs=self.num_logprobs,
                prompt_logprobs=self.num_prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                truncate_prompt_tokens=self.truncate_prompt_tokens)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias (token ids as strings) with integer keys."""
        if self.logit_bias is None:
            return None
        for key in self.logit_bias:
            if not _TOKEN_ID.fullmatch(key):
                raise ApiError(400, f"logit_bias maps token ids (integers written as strings, as \"42\") to "
                                    f"numbers, got the key {key[:40]!r}", param="logit_bias")
        return {int(k): v for k, v in self.logit_bias.items()}


class CompletionRequest(BaseRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        _check_logprobs("logprobs", self.logprobs)
        if self.echo and self.logprobs is not None and self.chunks:
            raise ApiError(400, "echo with logprobs does not apply to a prompt composed from chunks (their reused "
                                "tokens get no logprobs); leave one of them unset", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by kvforge; leave it unset", param="suffix")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        """With echo and logprobs, the echoed prompt's tokens get logprobs too."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or list of token ids, or a list of them (at most MAX_PROMPTS). An
        empty one: 400."""
        p = self.prompt
        prompts = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"got {len(prompts)} prompts; one request takes at most {MAX_PROMPTS}", param="prompt")
        if not all(prompts):
            raise ApiError(400, "prompt is empty; give at least one character or token", param="prompt")
        return prompts


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
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        _check_logprobs("top_logprobs", self.top_logprobs)
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools are not supported by kvforge; leave them unset", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "response_format other than text is not supported by kvforge",
                           param="response_format")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    """POST /tokenize, as vLLM's: a `prompt` (`add_special_tokens` default true: BOS where the model
    adds one), or `messages` rendered with the chat template (`add_generation_prompt` default true,
    `add_special_tokens` default false)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", param="prompt")
        if self.messages is not None and not self.messages:
            raise ApiError(400, "messages is empty: give at least one message", param="messages")
        if self.prompt is not None and "add_generation_prompt" in self.model_fields_set:
            raise ApiError(400, "add_generation_prompt only applies to messages", param="add_generation_prompt")

    @property
    def special_tokens(self) -> bool:
        """add_special_tokens, or its default: true for a prompt, false for messages (whose template
        writes its own)."""
        return self.prompt is not None if self.add_special_tokens is None else self.add_special_tokens


class DetokenizeRequest(_Strict):
    """POST /detokenize, as vLLM's: `tokens` (ids) -> their text, special tokens included."""

    model: str | None = None
    tokens: list[StrictInt]

    def check(self) -> None:
        pass


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
