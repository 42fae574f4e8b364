"""Data only: sampling parameters, request state and the outputs users receive (vLLM-shaped)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Bounds on what one request may ask the stop checks to do on every token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# torch.Generator.manual_seed takes exactly this range.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


class InvalidRequestError(ValueError):
    """A request the caller must change: `param` names the offending field when there is one
    (`prompt`, `max_tokens`, `seed`, ...), and `code` a machine-readable kind when a client may act
    on it (`context_length_exceeded`, `chunk_not_found`, ...), so a server can pass both on."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_unicode(text: str, field: str) -> None:
    """Raise InvalidRequestError naming `field` when `text` is not valid Unicode: a lone surrogate
    such as "\\ud800", which JSON and Python strings can carry but UTF-8 cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{field} holds a lone surrogate ({text[e.start]!r} at index {e.start}), which "
                                  f"is not valid Unicode text; send valid UTF-8", field) from None


class OutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's RequestOutputKind).

    CUMULATIVE: the whole text and token ids so far; DELTA: only what is new since the previous
    output of the request (O(1) per token, for streams); FINAL_ONLY: one output, when it finishes.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (the same names and defaults as vLLM's SamplingParams).

    temperature 0 is greedy; top_k 0 or -1 and top_p 1.0 disable those filters; `seed` makes one
    request's sampling reproducible whatever else is in the batch. `max_tokens=None` generates up to
    the model length (and what one sequence can hold in the cache); the engine resolves it when the
    request is added. Invalid values raise InvalidRequestError naming the field.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    cache_salt: str | None = None
    logprobs: int | None = None  # top log-probabilities to return per output token; -1 = the whole vocabulary
    output_kind: OutputKind = OutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        try:
            self._validate()
        except InvalidRequestError:
            raise
        except ValueError as e:  # every message starts with the field's name
            raise InvalidRequestError(str(e), str(e).split(" ", 1)[0]) from None

    def _validate(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None (up to the model length), "
                             f"got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] or None, got {self.seed!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < -1):
            raise ValueError(f"logprobs must be None, -1 (the whole vocabulary) or an integer >= 0, "
                             f"got {self.logprobs!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string or None, got {self.cache_salt!r}")
        if self.cache_salt is not None:
            check_unicode(self.cache_salt, "cache_salt")
        if not isinstance(self.output_kind, OutputKind):
            raise ValueError(f"output_kind must be an OutputKind, got {self.output_kind!r}")
        if not isinstance(self.stop, (str, list, tuple, type(None))):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {type(self.stop).__name__}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        for s in stop:
            check_unicode(s, "stop")
        if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} "
                             f"characters each, got {len(stop)} of up to {max(map(len, stop))} characters")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got "
                             f"{type(self.stop_token_ids).__name__}")
        ids = tuple(self.stop_token_ids or ())
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


CHUNK_KINDS = {"system": 0, "context": 1}  # kind -> cascade level; the query and generated tokens are level 2


@dataclass(frozen=True)
class Chunk:
    """A registered document chunk: its KV was computed once, with keys stored at positions
    `stored_at .. stored_at + kv_length - 1` (always 0..n-1), into `page_indices` (arena blocks held
    until the chunk is unregistered). `model_fingerprint` names the weights that computed it."""

    chunk_id: str
    token_ids: tuple[int, ...]
    kind: str
    page_indices: tuple[int, ...]
    kv_length: int
    model_fingerprint: str
    stored_at: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def level(self) -> int:
        return CHUNK_KINDS[self.kind]


@dataclass(frozen=True)
class ChunkPlacement:
    """A chunk placed in a composed prompt at `offset`: its keys are read re-rotated by `offset`.
    `recomputed` are the chunk-local indices whose KV this request computes itself (selective
    recompute); the chunk's own KV for them is hidden from this request."""

    chunk_id: str
    level: int
    offset: int
    num_tokens: int
    page_indices: tuple[int, ...]
    recomputed: tuple[int, ...] = ()


@dataclass(frozen=True)
class Composition:
    """A prompt composed from chunks and a query. `prompt_token_ids` is the whole prompt (chunks in
    order, then the query); the sequence itself computes only its private tokens: the recomputed
    chunk tokens and the query, at `private_positions` (ascending), then the generated tokens."""

    placements: tuple[ChunkPlacement, ...]
    prompt_token_ids: tuple[int, ...]
    private_positions: tuple[int, ...]

    def position(self, i: int) -> int:
        """The absolute position of the sequence's i-th private token."""
        n = len(self.private_positions)
        return self.private_positions[i] if i < n else len(self.prompt_token_ids) + i - n

    @property
    def num_reused(self) -> int:
        """Prompt tokens whose KV comes from chunk pages."""
        return len(self.prompt_token_ids) - len(self.private_positions)


@dataclass
class Sequence:
    """One request's state, owned by the scheduler.

    `token_ids` = prompt + generated. `num_computed` counts tokens whose K/V is in the cache;
    the tokens from `num_computed` on are computed next (a prompt, the rest of a prompt prefilled in
    pieces, a whole recompute after preemption, or the one newest token while decoding).
    A sequence with `fills_chunk` is a chunk registration: it computes its tokens' K/V into that
    chunk's pages (keys at 0..n-1), samples nothing, and registers the chunk when done.
    """

    seq_id: int
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    cache_extra: bytes = b""  # what besides the tokens identifies this request's cached blocks
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache at admission
    composition: Composition | None = None  # set for a prompt composed from chunks
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # per output token, when asked for
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    fills_chunk: str | None = None  # the chunk id whose pages this sequence computes
    chunk_kind: str = "context"  # with fills_chunk
    num_sent_tokens: int = 0  # output tokens already handed out (OutputKind.DELTA)
    num_sent_chars: int = 0  # characters of `text` already handed out

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """A copy (O(n)): for outputs, never on the per-token path (see `num_output_tokens`)."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def total_len(self) -> int:
        """Positions the sequence spans: its tokens plus, when composed, the reused chunk tokens."""
        return len(self.token_ids) + (self.composition.num_reused if self.composition else 0)

    @property
    def max_len(self) -> int:
        """Tokens this sequence may hold in the cache at most (its capacity)."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request that holds no engine state yet (`LLMEngine.prepare_request` /
    `prepare_chunk_request`); `LLMEngine.enqueue` adds it. `seq.params.max_tokens` is resolved."""

    seq: Sequence
    priority: int

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def chunk_ids(self) -> list[str]:
        return [p.chunk_id for p in self.seq.composition.placements] if self.seq.composition else []


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the model (before sampling settings) and its 1-based rank."""

    logprob: float
    rank: int


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per output token, with SamplingParams.logprobs


@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_preemptions: int


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
