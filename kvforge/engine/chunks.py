"""The chunk half of LLMEngine's API: registering document chunks and composing requests from them.

`ChunkRequests` is a base class of `LLMEngine` (one object, one API), kept in its own file so each
half stays readable; it uses the engine's state declared below. A chunk registration is a sequence
with `fills_chunk`: its pages are taken when it is queued, its prefill is scheduled with the batch
like any other, and the chunk is registered when that prefill is done. A composed request is an
ordinary sequence whose private tokens are the recomputed chunk tokens and the query.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvforge.cache import ChunkBudgetError, KVCacheManager, NoFreeBlocksError, extra_keys
from kvforge.types import (
    CHUNK_KINDS,
    Chunk,
    ChunkPlacement,
    Composition,
    InvalidRequestError,
    PreparedRequest,
    RequestOutput,
    SamplingParams,
    Sequence,
)

if TYPE_CHECKING:
    from kvforge.engine.scheduler import Scheduler
    from kvforge.model.runner import ModelRunner

PromptType = str | Mapping[str, object]


@dataclass(frozen=True)
class ChunkRegistration:
    """What `add_chunk_registration` did: `chunk` is the registered chunk when that content was
    registered under `chunk_id` already (nothing queued), else None (its prefill is queued)."""

    chunk_id: str
    chunk: Chunk | None


class ChunkRequests:
    """Chunk registration, lookup and composed requests over the engine's state."""

    cache: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    fingerprint: str
    kv_format_name: str
    max_model_len: int
    _requests: dict[str, Sequence]
    _chunks: dict[str, Chunk]
    _filling: dict[str, Sequence]
    _unreturned: list[RequestOutput]
    _seq_ids: itertools.count

    def register_chunk(self, prompt: PromptType, kind: str = "context", chunk_id: str | None = None) -> Chunk:
        """Compute a document chunk's KV once, at positions 0..n-1, into chunk pages kept until
        `unregister_chunk`, and return it: `add_chunk_registration`, then steps until its prefill is
        done (other requests progress in those steps; their outputs are returned by the next `step()`).
        Raises ValueError, keeping nothing: see `add_chunk_registration`; no room is a ValueError here."""
        request_id = f"register-chunk-{next(self._seq_ids)}"
        try:
            registration = self.add_chunk_registration(request_id, prompt, kind, chunk_id)
        except NoFreeBlocksError as e:
            raise ValueError(f"no room for chunk {chunk_id or '(default id)'}: {e}") from None
        try:
            while request_id in self._requests:
                self._unreturned += [out for out in self._step() if out.request_id != request_id]
        except BaseException:
            self.abort_request(request_id)
            raise
        return self._chunks[registration.chunk_id]

    def add_chunk_registration(self, request_id: str, prompt: PromptType, kind: str = "context",
                               chunk_id: str | None = None, priority: int = 0,
                               max_blocks: int | None = None) -> ChunkRegistration:
        """Queue the prefill of a document chunk (keys at positions 0..n-1) into chunk pages taken
        now; it is scheduled like any prefill, and the chunk is registered when it is done: `step()`
        then returns a finished RequestOutput for `request_id` with no completions. When the same
        content is registered under that id already, queues nothing (the result holds the chunk).
        The default id names the content. Raises, changing nothing: InvalidRequestError for a
        bad kind, an empty or invalid prompt, a chunk over max_model_len, an id taken by other
        content or being registered, or over the chunk budget; NoFreeBlocksError when the cache has
        no room for it now, or it needs more than `max_blocks` (the caller's admission room)."""
        self._check_request(request_id, None, priority)
        if kind not in CHUNK_KINDS:
            raise InvalidRequestError(f"chunk kind must be one of {', '.join(CHUNK_KINDS)}, got {kind!r}", "kind")
        text, ids = self.tokenize_chunk(prompt, kind)
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(f"a chunk of {len(ids)} tokens is over max_model_len={self.max_model_len}; "
                                      f"split it", "prompt", "context_length_exceeded")
        if chunk_id is None:
            chunk_id = self.default_chunk_id(ids, kind)
        old = self._chunks.get(chunk_id)
        if old is not None:
            if old.token_ids == tuple(ids) and old.kind == kind:
                return ChunkRegistration(chunk_id, old)
            raise InvalidRequestError(f"chunk id {chunk_id!r} is already registered with other content; "
                                      f"unregister it first", "id", "chunk_id_taken")
        if chunk_id in self._filling:
            raise InvalidRequestError(f"chunk id {chunk_id!r} is being registered by another request; "
                                      f"retry once it is registered", "id")
        try:
            pages = self.cache.restore_chunk(chunk_id, ids, self.chunk_extra(kind), max_blocks)
            if pages is not None:  # computed before, by this process or another: no prefill
                chunk = self._chunks[chunk_id] = self._chunk(chunk_id, ids, kind, pages.block_ids)
                return ChunkRegistration(chunk_id, chunk)
            self.cache.allocate_chunk(chunk_id, len(ids), max_blocks)
        except ChunkBudgetError as e:
            raise InvalidRequestError(str(e), "prompt", "chunk_budget_exceeded") from None
        except ValueError as e:  # a bad id
            raise InvalidRequestError(str(e), "id") from None
        seq = Sequence(next(self._seq_ids), request_id, text, ids, SamplingParams(max_tokens=1), time.monotonic(),
                       fills_chunk=chunk_id, chunk_kind=kind)
        self._filling[chunk_id] = seq
        self._requests[request_id] = seq
        self.scheduler.add(seq, priority)
        return ChunkRegistration(chunk_id, None)

    def chunk(self, chunk_id: str) -> Chunk:
        """A registered chunk; InvalidRequestError (param "chunks") naming the registered ones if unknown."""
        return self._resolve_chunk(chunk_id)

    def tokenize_chunk(self, prompt: PromptType, kind: str) -> tuple[str | None, list[int]]:
        """`tokenize` for a chunk's content. A text chunk reads as a piece of a longer prompt: only
        a system chunk, always first, starts with BOS (for tokenizers that add one)."""
        return self.tokenize(prompt, add_special_tokens=kind == "system")

    def chunk_extra(self, kind: str) -> bytes:
        """The extra keys a chunk's blocks are stored under in the tiers: the model, the KV format and
        the kind (its tokens and their order are in the chained hashes; its id is not: the same content
        registered under another id, by this process or another, finds them)."""
        return extra_keys(self.fingerprint, self.kv_format_name, "chunk", kind)

    def _chunk(self, chunk_id: str, token_ids, kind: str, block_ids: tuple[int, ...]) -> Chunk:
        return Chunk(chunk_id, tuple(token_ids), kind, block_ids, len(token_ids), self.fingerprint,
                     kv_format=self.kv_format_name)

    def default_chunk_id(self, token_ids: list[int], kind: str) -> str:
        """The id `register_chunk` gives content registered without one: it names the model, the
        KV dtype, the kind and the tokens. Pure."""
        digest = hashlib.sha256(f"{self.fingerprint}|{self.kv_format_name}|{kind}|{token_ids}".encode()).hexdigest()
        return "chunk-" + digest[:16]

    def unregister_chunk(self, chunk_id: str) -> None:
        """Free a chunk's pages. Raises ValueError, changing nothing, if unknown or in use."""
        if chunk_id not in self._chunks:
            self._resolve_chunk(chunk_id)  # raises, naming the registered chunks
        self.cache.free_chunk(chunk_id)
        del self._chunks[chunk_id]

    def list_chunks(self) -> list[Chunk]:
        """The registered chunks, in registration order (not those still being prefilled)."""
        return list(self._chunks.values())

    def add_chunk_request(self, request_id: str, chunks: list[str | Chunk], query: PromptType,
                          params: SamplingParams | None = None, recompute_ratio: float = 0.15,
                          recompute_rule: str = "first", priority: int = 0) -> None:
        """`enqueue` of `prepare_chunk_request`."""
        self.enqueue(self.prepare_chunk_request(request_id, chunks, query, params, recompute_ratio, recompute_rule,
                                                priority))

    def prepare_chunk_request(self, request_id: str, chunks: list[str | Chunk], query: PromptType,
                              params: SamplingParams | None = None, recompute_ratio: float = 0.15,
                              recompute_rule: str = "first", priority: int = 0) -> PreparedRequest:
        """Validate a request whose prompt is `chunks` (ids or Chunk objects; at most one system chunk,
        first) followed by `query`, reusing the chunks' KV: chunk i sits at the sum of the lengths
        before it and its keys are re-rotated there as they are read. A fraction `recompute_ratio`
        of each chunk not at position 0 is recomputed for this request with full attention to
        everything before it, chosen by `recompute_rule`: "first" (the chunk's first tokens, which
        otherwise act as extra attention sinks) or "deviation" (the tokens whose K/V at layer 1
        deviates most from their K/V in context, measured by running the first two layers over the
        whole prompt now). Raises InvalidRequestError, creating nothing, for an unknown or foreign
        chunk, a bad order, ratio or rule, an empty query, or a prompt that can never fit."""
        params = self._check_request(request_id, params, priority)
        for name in ("prompt_logprobs", "truncate_prompt_tokens"):
            if getattr(params, name) is not None:
                raise InvalidRequestError(f"{name} does not apply to a prompt composed from chunks (their reused "
                                          f"tokens are not computed for it); leave it unset", name)
        if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)) \
                or not 0 <= recompute_ratio <= 1:
            raise InvalidRequestError(f"recompute_ratio must be a number in [0, 1], got {recompute_ratio!r}",
                                      "recompute_ratio")
        if recompute_rule not in ("first", "deviation"):
            raise InvalidRequestError(f"recompute_rule must be 'first' or 'deviation', got {recompute_rule!r}",
                                      "recompute_rule")
        if not isinstance(chunks, (list, tuple)):
            raise InvalidRequestError(f"chunks must be a list of chunk ids, got {type(chunks).__name__}", "chunks")
        resolved = [self._resolve_chunk(c) for c in chunks]
        if not resolved:
            raise InvalidRequestError("generate_from_chunks needs at least one chunk id", "chunks")
        if any(c.kind == "system" for c in resolved[1:]):
            raise InvalidRequestError("a system chunk must come first, and at most one per request", "chunks")
        text, query_ids = self.tokenize(query, add_special_tokens=False)
        full = [t for c in resolved for t in c.token_ids] + query_ids
        offsets = list(itertools.accumulate([0] + [c.num_tokens for c in resolved]))[:-1]
        later = [i for i, off in enumerate(offsets) if off > 0]
        counts = {i: math.ceil(recompute_ratio * resolved[i].num_tokens) for i in later}
        num_private = len(query_ids) + sum(counts.values())
        params = self._resolve_max_tokens(params, len(full), num_private)
        self._check_fits(len(full), params, num_private)
        if recompute_rule == "deviation" and any(counts.values()):
            deviations = self.runner.kv_deviation(
                full[:offsets[-1] + resolved[-1].num_tokens],
                [(resolved[i].page_indices, offsets[i], resolved[i].num_tokens) for i in later], layer=1)
            picks = {i: sorted(dev.topk(counts[i]).indices.tolist()) for i, dev in zip(later, deviations)}
        else:
            picks = {i: list(range(counts[i])) for i in later}
        placements, private_positions = [], []
        for i, (c, off) in enumerate(zip(resolved, offsets)):
            recomputed = tuple(picks.get(i, ()))
            placements.append(ChunkPlacement(c.chunk_id, c.level, off, c.num_tokens, c.page_indices, recomputed))
            private_positions += [off + j for j in recomputed]
        private_positions += range(len(full) - len(query_ids), len(full))
        composition = Composition(tuple(placements), tuple(full), tuple(private_positions))
        private = [full[p] for p in private_positions]
        seq = Sequence(next(self._seq_ids), request_id, text, private, params, time.monotonic(),
                       num_cached_tokens=composition.num_reused, composition=composition)
        self._prepare_sampling(seq)
        return PreparedRequest(seq, priority)

    def _resolve_chunk(self, chunk: str | Chunk) -> Chunk:
        if isinstance(chunk, Chunk):
            if chunk.model_fingerprint != self.fingerprint:
                raise InvalidRequestError(f"chunk {chunk.chunk_id!r} was computed by another model "
                                          f"({chunk.model_fingerprint[:12]}), not this engine's "
                                          f"({self.fingerprint[:12]})", "chunks")
            if chunk.kv_format != self.kv_format_name:
                raise InvalidRequestError(f"chunk {chunk.chunk_id!r} holds {chunk.kv_format} KV but this engine's cache "
                                          f"stores {self.kv_format_name} (kv_cache_dtype): register it with this "
                                          f"engine", "chunks")
            chunk = chunk.chunk_id
        found = self._chunks.get(chunk) if isinstance(chunk, str) else None
        if found is None:
            if isinstance(chunk, str) and chunk in self._filling:
                raise InvalidRequestError(f"chunk {chunk!r} is still being registered; use it once it is", "chunks")
            known = ", ".join(list(self._chunks)[:10]) or "none"
            raise InvalidRequestError(f"unknown chunk id {chunk!r}; registered chunks: {known}", "chunks",
                                      "chunk_not_found")
        return found

    def _register_filled(self, seq: Sequence) -> RequestOutput:
        """A chunk registration's prefill is done: the chunk is registered (its pages stay held)."""
        chunk_id = seq.fills_chunk
        pages = self.cache.chunk_pages(chunk_id)
        self._chunks[chunk_id] = self._chunk(chunk_id, seq.token_ids, seq.chunk_kind, pages.block_ids)
        self.cache.store_chunk(chunk_id, seq.token_ids, self.chunk_extra(seq.chunk_kind))
        del self._filling[chunk_id]
        self.scheduler.finish(seq, "stop")
        self._forget(seq)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [], True)
