"""LLMEngine: add_request / step / abort over the scheduler, the paged cache and the model runner."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from kvforge.cache import CacheStats, KVCache, KVCacheManager, NoFreeBlocksError, PinHandle, PrefixMatch, extra_keys
from kvforge.config import EngineConfig, ceil_div, kv_bytes_per_token
from kvforge.engine.scheduler import Scheduler
from kvforge.model.llama import LlamaForCausalLM
from kvforge.model.loader import load_model
from kvforge.model.runner import ModelRunner, SequenceChunk
from kvforge.model.sampler import sample, top_logprobs
from kvforge.model.tokenizer import IncrementalDetokenizer, Tokenizer
from kvforge.types import (
    CHUNK_KINDS,
    Chunk,
    ChunkPlacement,
    CompletionOutput,
    Composition,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    Sequence,
)

PromptType = str | Mapping[str, object]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    cache: CacheStats


def model_info(config: EngineConfig) -> dict:
    """What `kvforge info` shows: the model's config, KV bytes per token and the cache's capacity.
    Loads the model's metadata and weights but allocates no cache."""
    loaded = load_model(config.model)
    cfg = loaded.config
    dtype = _TORCH_DTYPES[config.dtype]
    per_block = KVCache.block_bytes(cfg.num_layers, config.cache.block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
    blocks = config.cache.resolve_num_blocks(per_block)
    return {
        "model": loaded.name,
        "path": str(loaded.path),
        "fingerprint": loaded.fingerprint,
        "config": dataclasses.asdict(cfg),
        "kv_dtype": config.dtype,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, dtype.itemsize),
        "block_size": config.cache.block_size,
        "kv_bytes_per_block": per_block,
        "num_blocks": blocks,
        "kv_cache_bytes": blocks * per_block,
        "capacity_tokens": blocks * config.cache.block_size,
    }


class LLMEngine:
    """Owns the model, the KV arena, the cache manager and the scheduler for one model.

    Requests are validated in `add_request`: a request that can never run is refused there with a
    ValueError and leaves no trace. `step()` runs one batch and returns the outputs it moved.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        torch.manual_seed(config.seed)
        loaded = load_model(config.model)
        self.model_config = cfg = loaded.config
        self.model_name, self.fingerprint = loaded.name, loaded.fingerprint
        self.tokenizer: Tokenizer = loaded.tokenizer
        dtype = _TORCH_DTYPES[config.dtype]
        model = LlamaForCausalLM(cfg)
        model.load_weights(loaded.weights)
        self.model = model.to(dtype).eval()
        limit = config.scheduler.max_model_len
        if limit is not None and limit > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={limit} exceeds the model's context length "
                             f"{cfg.max_position_embeddings}")
        self.max_model_len = limit or cfg.max_position_embeddings
        block_size = config.cache.block_size
        bytes_per_block = KVCache.block_bytes(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        num_blocks = config.cache.resolve_num_blocks(bytes_per_block)
        self.kv_cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)
        self.cache = KVCacheManager(num_blocks, block_size, bytes_per_block,
                                    enable_prefix_caching=config.cache.enable_prefix_caching,
                                    max_pinned_fraction=config.cache.max_pinned_fraction,
                                    max_chunk_fraction=config.cache.max_chunk_fraction)
        self.runner = ModelRunner(self.model, self.kv_cache.k, self.kv_cache.v, block_size)
        self.scheduler = Scheduler(config.scheduler, self.cache)
        self._requests: dict[str, Sequence] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._seq_ids = itertools.count()
        self._chunks: dict[str, Chunk] = {}
        self._steps = self._prompt_tokens = self._generation_tokens = 0

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request (lower `priority` runs first; equal priorities in arrival order).

        A dict prompt may carry `cache_salt` (overriding `params.cache_salt`): requests with
        different salts never share cached KV. Raises ValueError (and changes nothing) for a
        duplicate id, an empty or out-of-vocabulary prompt, a bad salt or priority, or a request
        that can never fit the model length or the cache."""
        params = self._check_request(request_id, params, priority)
        text, ids = self.tokenize(prompt)
        salt = self._salt(prompt, params)
        self._check_fits(len(ids), params, len(ids), lambda: self.cached_prefix(ids, salt))
        seq = Sequence(next(self._seq_ids), request_id, text, ids, params, time.monotonic(),
                       cache_extra=self.cache_extra(salt))
        self._add(seq, priority)

    def _check_request(self, request_id: str, params: SamplingParams | None, priority: int) -> SamplingParams:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer (lower runs first), got {priority!r}")
        return params

    def _add(self, seq: Sequence, priority: int) -> None:
        params = seq.params
        self._requests[seq.request_id] = seq
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
        self._generators[seq.seq_id] = (torch.Generator().manual_seed(params.seed)
                                        if params.seed is not None else None)
        self.scheduler.add(seq, priority)

    def cache_extra(self, cache_salt: str | None) -> bytes:
        """The extra keys of this engine's cached blocks: what besides the tokens determines their KV
        (the model's weights, the KV dtype, the tenant's salt)."""
        return extra_keys(self.fingerprint, self.config.dtype, cache_salt)

    def pin_cached_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> PinHandle:
        """Pin the cached full blocks that prefix `token_ids` under `cache_salt` (see
        `KVCacheManager.pin`); computes nothing: `LLM.pin_prefix` prefills first when needed.
        Raises ValueError when prefix caching is off, no full block is cached, or over the budget."""
        return self.cache.pin(self.cached_prefix(token_ids, cache_salt))

    def cached_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> PrefixMatch:
        """The cached full blocks of `token_ids` (all of them may match: a dummy token stands for
        the next one, whose logits a lookup always leaves to be computed). Changes nothing."""
        return self.cache.match_prefix([*token_ids, 0], self.cache_extra(cache_salt))

    # ---- chunks ---------------------------------------------------------------------------------

    def register_chunk(self, prompt: PromptType, kind: str = "context", chunk_id: str | None = None) -> Chunk:
        """Compute a document chunk's KV once, at positions 0..n-1, into chunk pages kept until
        `unregister_chunk`. The default id names the content (the same text and kind give the same
        id, and registering it again returns the registered chunk). Runs the model now, between
        steps. Raises ValueError, keeping nothing: a bad kind, an empty or invalid prompt, a chunk
        over max_model_len, an id taken by other content, or no room (chunk budget or free blocks)."""
        if kind not in CHUNK_KINDS:
            raise ValueError(f"chunk kind must be one of {', '.join(CHUNK_KINDS)}, got {kind!r}")
        _, ids = self.tokenize_chunk(prompt, kind)
        if len(ids) > self.max_model_len:
            raise ValueError(f"a chunk of {len(ids)} tokens is over max_model_len={self.max_model_len}")
        if chunk_id is None:
            chunk_id = self.default_chunk_id(ids, kind)
        old = self._chunks.get(chunk_id)
        if old is not None:
            if old.token_ids == tuple(ids) and old.kind == kind:
                return old
            raise ValueError(f"chunk id {chunk_id!r} is already registered with other content; unregister it first")
        try:
            pages = self.cache.allocate_chunk(chunk_id, len(ids))
        except NoFreeBlocksError as e:
            raise ValueError(f"no room for chunk {chunk_id!r}: {e}") from None
        try:
            step = self.config.scheduler.max_num_batched_tokens
            for start in range(0, len(ids), step):
                end = min(start + step, len(ids))
                self.runner.run([SequenceChunk(ids[start:end], start, self.cache.chunk_slot_mapping(chunk_id, start, end),
                                               pages.block_ids, needs_logits=False)])
        except BaseException:
            self.cache.free_chunk(chunk_id)
            raise
        chunk = Chunk(chunk_id, tuple(ids), kind, pages.block_ids, len(ids), self.fingerprint)
        self._chunks[chunk_id] = chunk
        return chunk

    def tokenize_chunk(self, prompt: PromptType, kind: str) -> tuple[str | None, list[int]]:
        """`tokenize` for a chunk's content. A text chunk reads as a piece of a longer prompt: only
        a system chunk, always first, starts with BOS (for tokenizers that add one)."""
        return self.tokenize(prompt, add_special_tokens=kind == "system")

    def default_chunk_id(self, token_ids: list[int], kind: str) -> str:
        """The id `register_chunk` gives content registered without one: it names the model, the
        KV dtype, the kind and the tokens. Pure."""
        digest = hashlib.sha256(f"{self.fingerprint}|{self.config.dtype}|{kind}|{token_ids}".encode()).hexdigest()
        return "chunk-" + digest[:16]

    def unregister_chunk(self, chunk_id: str) -> None:
        """Free a chunk's pages. Raises ValueError, changing nothing, if unknown or in use."""
        self.cache.free_chunk(chunk_id)
        del self._chunks[chunk_id]

    def list_chunks(self) -> list[Chunk]:
        """The registered chunks, in registration order."""
        return list(self._chunks.values())

    def add_chunk_request(self, request_id: str, chunks: list[str | Chunk], query: PromptType,
                          params: SamplingParams | None = None, recompute_ratio: float = 0.15,
                          recompute_rule: str = "first", priority: int = 0) -> None:
        """Queue a request whose prompt is `chunks` (ids or Chunk objects; at most one system chunk,
        first) followed by `query`, reusing the chunks' KV: chunk i sits at the sum of the lengths
        before it and its keys are re-rotated there as they are read. A fraction `recompute_ratio`
        of each chunk not at position 0 is recomputed for this request with full attention to
        everything before it, chosen by `recompute_rule`: "first" (the chunk's first tokens, which
        otherwise act as extra attention sinks) or "deviation" (the tokens whose K/V at layer 1
        deviates most from their K/V in context, measured by running the first two layers over the
        whole prompt). Raises ValueError, changing nothing, for an unknown or foreign chunk, a bad
        order, ratio or rule, an empty query, or a prompt that can never fit."""
        params = self._check_request(request_id, params, priority)
        if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)) \
                or not 0 <= recompute_ratio <= 1:
            raise ValueError(f"recompute_ratio must be a number in [0, 1], got {recompute_ratio!r}")
        if recompute_rule not in ("first", "deviation"):
            raise ValueError(f"recompute_rule must be 'first' or 'deviation', got {recompute_rule!r}")
        resolved = [self._resolve_chunk(c) for c in chunks]
        if not resolved:
            raise ValueError("generate_from_chunks needs at least one chunk id")
        if any(c.kind == "system" for c in resolved[1:]):
            raise ValueError("a system chunk must come first, and at most one per request")
        text, query_ids = self.tokenize(query, add_special_tokens=False)
        full = [t for c in resolved for t in c.token_ids] + query_ids
        offsets = list(itertools.accumulate([0] + [c.num_tokens for c in resolved]))[:-1]
        later = [i for i, off in enumerate(offsets) if off > 0]
        counts = {i: math.ceil(recompute_ratio * resolved[i].num_tokens) for i in later}
        self._check_fits(len(full), params, len(query_ids) + sum(counts.values()))
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
        self.cache.acquire_chunks([c.chunk_id for c in resolved])
        seq = Sequence(next(self._seq_ids), request_id, text, private, params, time.monotonic(),
                       num_cached_tokens=composition.num_reused, composition=composition)
        self._add(seq, priority)

    def _resolve_chunk(self, chunk: str | Chunk) -> Chunk:
        if isinstance(chunk, Chunk):
            if chunk.model_fingerprint != self.fingerprint:
                raise ValueError(f"chunk {chunk.chunk_id!r} was computed by another model "
                                 f"({chunk.model_fingerprint[:12]}), not this engine's ({self.fingerprint[:12]})")
            chunk = chunk.chunk_id
        found = self._chunks.get(chunk) if isinstance(chunk, str) else None
        if found is None:
            known = ", ".join(list(self._chunks)[:10]) or "none"
            raise ValueError(f"unknown chunk id {chunk!r}; registered chunks: {known}")
        return found

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks now. Unknown or finished ids are ignored."""
        seq = self._requests.get(request_id)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            self._forget(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt; ValueError naming what is wrong with a bad one.
        `add_special_tokens` applies to text only (token ids are taken as given): BOS where the
        model's tokenizer adds one."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character or token")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens)
        if isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError("prompt_token_ids must be a non-empty list of token ids")
            vocab = self.model_config.vocab_size
            for i, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not a token id; "
                                     f"allowed: integers in [0, {vocab - 1}]")
            return prompt.get("prompt"), list(ids)  # type: ignore[return-value]
        raise ValueError(f"a prompt is a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    @staticmethod
    def _salt(prompt: PromptType, params: SamplingParams) -> str | None:
        if isinstance(prompt, Mapping) and prompt.get("cache_salt") is not None:
            salt = prompt["cache_salt"]
            if not isinstance(salt, str) or not salt:
                raise ValueError(f"cache_salt must be a non-empty string or None, got {salt!r}")
            return salt
        return params.cache_salt

    def _check_fits(self, num_prompt: int, params: SamplingParams, num_private: int,
                    cached_prefix: Callable[[], PrefixMatch] | None = None) -> None:
        """Refuse a request that could never run: `num_prompt` tokens (the whole prompt) plus
        max_tokens over the model length, or its `num_private` prompt tokens (those with KV of its
        own: chunk tokens reused from chunk pages are not) plus max_tokens needing more blocks than
        one sequence can ever hold beside the chunk pages and pins (`sequence_block_limit`; pinned
        blocks of the prompt's `cached_prefix` count as its own, looked up only when needed)."""
        total = num_prompt + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt of {num_prompt} tokens plus max_tokens={params.max_tokens} is {total} "
                             f"tokens, over max_model_len={self.max_model_len}; shorten the prompt or lower "
                             f"max_tokens")
        # The last sampled token is never written to the cache.
        blocks = ceil_div(num_private + params.max_tokens - 1, self.cache.block_size)
        limit = self.cache.sequence_block_limit()
        if blocks > limit and cached_prefix is not None and self.cache.enable_prefix_caching:
            limit = self.cache.sequence_block_limit(cached_prefix())
        if blocks > limit:
            held = self.cache.num_blocks - limit
            raise ValueError(f"prompt of {num_prompt} tokens plus max_tokens={params.max_tokens} needs {blocks} "
                             f"KV blocks, and one request can hold at most {limit} of the cache's "
                             f"{self.cache.num_blocks} ({held} are kept by registered chunks and pinned prefixes); "
                             f"lower max_tokens, unregister chunks or unpin prefixes, or give the cache more memory")

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that got a token or finished."""
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        self._steps += 1
        items = []
        for c in sched.chunks:
            seq, start = c.seq, c.seq.num_computed
            items.append(SequenceChunk(seq.token_ids[start:start + c.num_tokens], start, c.slots,
                                       self.cache.block_table(seq.seq_id),
                                       start + c.num_tokens == len(seq.token_ids), seq.composition))
        logits = self.runner.run(items)
        sampling = [c.seq for c, item in zip(sched.chunks, items) if item.needs_logits]
        tokens = sample(logits, [s.params for s in sampling], [self._generators[s.seq_id] for s in sampling])
        bs = self.cache.block_size
        for c in sched.chunks:
            seq = c.seq
            seq.num_computed += c.num_tokens
            if seq.num_computed <= seq.num_prompt_tokens:
                self._prompt_tokens += c.num_tokens
            if seq.composition is None and seq.num_computed // bs > (seq.num_computed - c.num_tokens) // bs:
                # a block was filled: cache it
                self.cache.commit(seq.seq_id, seq.token_ids[:seq.num_computed])
        outputs = []
        now = time.monotonic()
        for row, (seq, token) in enumerate(zip(sampling, tokens)):
            if seq.params.logprobs is not None:
                entries = top_logprobs(logits[row], token, seq.params.logprobs)
                seq.logprobs.append(entries)
                seq.cumulative_logprob += entries[token].logprob
            self._append_token(seq, token, now)
            outputs.append(self._output(seq))
            if seq.finished:
                self._forget(seq)
        return outputs

    def _append_token(self, seq: Sequence, token: int, now: float) -> None:
        seq.token_ids.append(token)
        self._generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        if token in self.tokenizer.eos_token_ids and not p.ignore_eos:
            return self.scheduler.finish(seq, "stop")
        if token in p.stop_token_ids:
            return self.scheduler.finish(seq, "stop", token)
        new = self._detok[seq.seq_id].add(token)
        seq.text += new
        if p.stop and new:
            # A stop string can only end in the new text; look back far enough to catch it whole.
            window = len(new) + max(len(s) for s in p.stop)
            base = max(0, len(seq.text) - window)
            hits = [(seq.text.find(s, base), s) for s in p.stop]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, s = min(hits)
                seq.text = seq.text[:at + len(s)] if p.include_stop_str_in_output else seq.text[:at]
                return self.scheduler.finish(seq, "stop", s)
        if len(seq.output_token_ids) >= p.max_tokens or seq.total_len >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=list(seq.composition.prompt_token_ids) if seq.composition else seq.prompt_token_ids,
            outputs=[CompletionOutput(0, seq.text, list(seq.output_token_ids), seq.finish_reason, seq.stop_reason,
                                      *((seq.cumulative_logprob, list(seq.logprobs))
                                        if seq.params.logprobs is not None else ()))],
            finished=seq.finished,
            num_cached_tokens=seq.num_cached_tokens or 0,
            metrics=RequestMetrics(seq.arrival, seq.first_token_time,
                                   time.monotonic() if seq.finished else None, seq.num_preemptions),
        )

    def _forget(self, seq: Sequence) -> None:
        if seq.composition is not None and self._requests.get(seq.request_id) is seq:
            self.cache.release_chunks([p.chunk_id for p in seq.composition.placements])
        self._requests.pop(seq.request_id, None)
        self._detok.pop(seq.seq_id, None)
        self._generators.pop(seq.seq_id, None)

    # ---- visibility -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._steps,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            cache=self.cache.stats(),
        )

    def check_integrity(self) -> None:
        """Every block accounted for, and the cache agrees with the scheduler's queues."""
        self.cache.check_integrity()
        running = {s.seq_id for s in self.scheduler.running}
        for seq in self.scheduler.running:
            if self.cache.length(seq.seq_id) < seq.num_computed:
                raise RuntimeError(f"sequence {seq.seq_id} computed {seq.num_computed} tokens but the cache "
                                   f"holds {self.cache.length(seq.seq_id)}")
        if self.cache.num_sequences != len(running):
            raise RuntimeError(f"the cache holds {self.cache.num_sequences} sequences, "
                               f"{len(running)} are running")
