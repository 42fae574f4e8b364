"""Data only: sampling parameters, request state and the outputs users receive (vLLM-shaped)."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

import numpy as np

# Bounds on what one request may ask the stop checks to do on every token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# Bounds on the per-token work of the other logits processors and on the samples of one request.
MAX_N = 128
MAX_LOGIT_BIAS = 1024
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256
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


def _not_int(x: object) -> bool:
    return isinstance(x, bool) or not isinstance(x, int)


def _not_number(x: object) -> bool:
    return isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or x in (float("inf"), float("-inf"))


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

    temperature 0 is greedy; top_k 0 or -1, top_p 1.0 and min_p 0 disable those filters; `seed` makes
    one request's sampling reproducible whatever else is in the batch. `max_tokens=None` generates up
    to the model length (and what one sequence can hold in the cache); the engine resolves it when the
    request is added. Invalid values raise InvalidRequestError naming the field.

    `n` completions come back per request (`best_of` >= n are generated and the n with the highest
    cumulative log-probability returned); they share the prompt's blocks: the prompt is computed once.
    Before sampling (greedy included), logits go through, in order: `allowed_token_ids` (every other
    token banned), `bad_words` (the last token of a word banned where the output so far ends with the
    rest of it), `min_tokens` (EOS and `stop_token_ids` banned until that many tokens are out),
    `logit_bias` (token id -> added to its logit, clamped to [-100, 100]), then the penalties:
    `repetition_penalty` (> 1 discourages tokens of the prompt and the output: positive logits divided,
    negative ones multiplied), `frequency_penalty` (minus the penalty times the token's count in the
    output) and `presence_penalty` (minus the penalty once the token is in the output). Neutral values
    (the defaults) leave the logits untouched. `prompt_logprobs` returns the top log-probabilities at
    every prompt position (the prompt is then computed in full, not read from the prefix cache);
    `truncate_prompt_tokens` keeps only the prompt's last k tokens; `skip_special_tokens` and
    `spaces_between_special_tokens` shape the output text.
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
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None  # top log-probabilities per prompt token; -1 = the whole vocabulary
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None

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
        self._validate_extras()

    def _validate_extras(self) -> None:
        """n / best_of, the logits processors, prompt logprobs and the detokenizing switches."""
        if _not_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (_not_int(self.best_of) or not self.n <= self.best_of <= MAX_N):
            raise ValueError(f"best_of must be None or an integer in [n, {MAX_N}] (n={self.n}), got {self.best_of!r}")
        if self.best_of is not None and self.best_of > self.n and self.output_kind is OutputKind.DELTA:
            raise ValueError(f"best_of must be None or n ({self.n}) for DELTA outputs (streaming): the best "
                             f"completions are known only when all are done, got {self.best_of}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if _not_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if _not_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 1e4:
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if _not_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if _not_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} token ids to numbers, "
                                 f"got {self.logit_bias!r:.200}")
            bias = {}
            for t, b in self.logit_bias.items():
                if _not_int(t) or t < 0 or _not_number(b):
                    raise ValueError(f"logit_bias maps token ids (integers >= 0) to numbers, got {t!r}: {b!r}")
                bias[t] = max(-100.0, min(100.0, float(b)))
            object.__setattr__(self, "logit_bias", bias or None)
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, (list, tuple)) or len(words) > MAX_BAD_WORDS or not all(
                    isinstance(w, str) and 0 < len(w) <= MAX_BAD_WORD_CHARS for w in words):
                raise ValueError(f"bad_words must be a list of at most {MAX_BAD_WORDS} non-empty strings of at "
                                 f"most {MAX_BAD_WORD_CHARS} characters, got {self.bad_words!r:.200}")
            for w in words:
                check_unicode(w, "bad_words")
            object.__setattr__(self, "bad_words", list(words) or None)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(not _not_int(t) and t >= 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids (integers >= 0), "
                                 f"got {ids!r:.200}")
            object.__setattr__(self, "allowed_token_ids", list(ids))
        if self.prompt_logprobs is not None and (_not_int(self.prompt_logprobs) or self.prompt_logprobs < -1):
            raise ValueError(f"prompt_logprobs must be None, -1 (the whole vocabulary) or an integer >= 0, "
                             f"got {self.prompt_logprobs!r}")
        for name in ("skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.truncate_prompt_tokens is not None and (_not_int(self.truncate_prompt_tokens)
                                                        or self.truncate_prompt_tokens < 1):
            raise ValueError(f"truncate_prompt_tokens must be None or an integer >= 1 (keep the prompt's last k "
                             f"tokens), got {self.truncate_prompt_tokens!r}")

    @property
    def num_samples(self) -> int:
        """Completions generated for the request: best_of, else n."""
        return self.best_of or self.n

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes the logits before sampling (see the class docstring)."""
        return bool(self.has_penalties or self.min_tokens or self.logit_bias or self.bad_words
                    or self.allowed_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Greedy over the raw logits, with no log-probabilities to report: the next token is the
        argmax alone (what async scheduling computes ahead of the host). Cached: params are frozen."""
        return self.greedy and not self.processes_logits and self.logprobs is None and self.prompt_logprobs is None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


CHUNK_KINDS = {"system": 0, "context": 1}  # kind -> cascade level; the query and generated tokens are level 2


@dataclass(frozen=True)
class Chunk:
    """A registered document chunk: its KV was computed once, with keys stored at positions
    `stored_at .. stored_at + kv_length - 1` (always 0..n-1), into `page_indices` (arena blocks held
    until the chunk is unregistered). `model_fingerprint` names the weights that computed it,
    `kv_format` the format its KV is stored in (`LLMEngine.kv_format_name`: "float32", "int8/float32", ...)."""

    chunk_id: str
    token_ids: tuple[int, ...]
    kind: str
    page_indices: tuple[int, ...]
    kv_length: int
    model_fingerprint: str
    stored_at: int = 0
    kv_format: str = "float32"

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

    @functools.cached_property
    def chunks_end(self) -> int:
        """The position just past the last chunk key: a private token there or later sees every
        chunk whole (less its recomputed keys)."""
        return max((p.offset + p.num_tokens for p in self.placements), default=0)

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
    index: int = 0  # which of its request's completions this sequence is (SamplingParams.n)
    # With params.num_samples > 1: the request's sequences in index order, one list shared by all of
    # them; only the first exists until its prompt is computed, then the others are forked from it.
    group: list[Sequence] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # params.bad_words tokenized
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)  # with params.prompt_logprobs
    draft: list[int] = field(default_factory=list)  # speculative tokens proposed for this step (computed after the last)
    # The prompt's ids as the uint32 array (`token_array`) the engine validated them through, or None: prefix-cache
    # lookups take it instead of converting the list (one O(n) pass less for a long prompt).
    prompt_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def lookup_ids(self) -> list[int] | np.ndarray:
        """`token_ids` for a prefix-cache lookup: `prompt_array` while they are just the prompt."""
        if self.prompt_array is not None and len(self.token_ids) == len(self.prompt_array):
            return self.prompt_array
        return self.token_ids

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
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt token (None for the first)
