"""LLMEngine: add_request / step / abort over the scheduler, the paged cache and the model runner."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvforge.cache import (CacheStats, KVCache, KVCacheManager, NoFreeBlocksError, PinHandle, PrefixMatch, extra_keys,
                           token_array)
from kvforge.cache.snapshot import LoadedCache, SavedCache, SnapshotChunk
from kvforge.cache.tiers import BlockFormat, StoreStats, TieredStore, open_tier, validate_tier_spec
from kvforge.config import CacheConfig, EngineConfig, ceil_div
from kvforge.engine.chunks import ChunkRequests
from kvforge.engine.draft import DraftProposer, load_draft_checkpoint, load_draft_model
from kvforge.engine.output import OutputProcessor
from kvforge.engine.overlap import OverlappedDecode
from kvforge.engine.scheduler import ScheduledRun, Scheduler, computes_whole_prompt
from kvforge.engine.spec import propose_ngram
from kvforge.metrics import KL_BUCKETS, HistogramCounter, HistogramSnapshot
from kvforge.model.llama import LlamaForCausalLM
from kvforge.model.loader import build_model, load_model
from kvforge.model.cpu import tune_allocator
from kvforge.model.memory import MemoryProfile, plan_kv_cache
from kvforge.model.runner import ModelRunner, TokenRun
from kvforge.model.sampler import SamplingRow, sample, token_logprobs, verify_draft
from kvforge.model.tokenizer import Tokenizer
from kvforge.types import (
    Chunk,
    CompletionOutput,
    InvalidRequestError,
    Logprob,
    OutputKind,
    PreparedRequest,
    RequestOutput,
    SamplingParams,
    Sequence,
    check_unicode,
)

PromptType = str | Mapping[str, object]
log = logging.getLogger("kvforge")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def blocks_for(num_prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """The most blocks a sequence of this many (private) prompt tokens and max_tokens can ever hold:
    its last sampled token is never written to the cache."""
    return ceil_div(num_prompt_tokens + max_tokens - 1, block_size)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    cache: CacheStats
    kv_cache_dtype: str = "auto"  # the KV format
    kv_bytes_per_token: float = 0.0  # K and V of one token over all layers, scales included
    capacity_tokens: int = 0  # token slots of the arena
    kv_quality_kl: HistogramSnapshot | None = None  # with kv_quality_sample: KL to full-precision K/V (nats)
    tiers: StoreStats | None = None  # with kv_tiers: the store's and each tier's counters
    restored_tokens: int = 0  # prompt tokens whose K/V was loaded from the tiers instead of computed
    spec_draft_tokens: int = 0  # speculative decoding: tokens drafted and verified
    spec_accepted_tokens: int = 0  # of which accepted


def resolve_device(name: str) -> torch.device:
    """The device `EngineConfig.device` names: "auto" is the GPU when torch sees one, else the CPU.
    ValueError for "cuda" when torch sees no GPU (or not that one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but torch sees no GPU (torch.cuda.is_available() is False; torch "
                             f"{torch.__version__}); use device='auto' or device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype `EngineConfig.dtype` names; None: bfloat16 on a GPU, float32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", "float16": the name configs, cache keys and `info` use."""
    return str(dtype).removeprefix("torch.")


def model_info(config: EngineConfig) -> dict:
    """What `kvforge info` shows: the model's config, device and dtype, KV bytes per token and the
    cache's capacity (with a draft model, the target's arena as the engine sizes it beside the draft's,
    and the draft's under "draft"). On the CPU (or when num_blocks / kv_cache_memory fix the arena) it
    loads the models' metadata and weights but builds no model and allocates no cache. On a GPU with
    the arena left to profiling it builds the models on the device and runs the profiling forward
    (see `kvforge.model.memory`), then reports the measured `memory_profile`; still no arena."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    loaded = load_model(config.model, config.load_format, seed=config.seed, device=device)
    cfg = loaded.config
    per_block = KVCache.block_bytes(cfg.num_layers, config.cache.block_size, cfg.num_kv_heads, cfg.head_dim, dtype,
                                    config.cache.kv_cache_dtype)
    spec = config.speculative
    draft = None
    if spec is not None and spec.method == "draft":  # its arena shares the budget (see plan_arenas)
        draft = load_draft_checkpoint(spec, cfg, device, config.seed)
    draft_per_block = 0 if draft is None else KVCache.block_bytes(
        draft.config.num_layers, config.cache.block_size, draft.config.num_kv_heads, draft.config.head_dim, dtype,
        config.cache.kv_cache_dtype)
    if device.type == "cuda" and not config.cache.sized_explicitly:
        models = [build_model(m, device, dtype, config.seed) for m in (loaded, draft) if m is not None]
        plan = plan_arenas(models[0], config, per_block, draft_per_block)
        del models
        torch.cuda.empty_cache()
    else:
        plan = plan_arenas(None, config, per_block, draft_per_block)
    blocks, profile = plan.num_blocks, plan.profile
    return {
        "model": loaded.name,
        "path": str(loaded.path),
        "load_format": config.load_format,
        "fingerprint": loaded.fingerprint,
        "config": dataclasses.asdict(cfg),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "kv_cache_dtype": config.cache.kv_cache_dtype,
        "kv_bytes_per_token": per_block / config.cache.block_size,
        "block_size": config.cache.block_size,
        "kv_bytes_per_block": per_block,
        "num_blocks": blocks,
        "kv_cache_bytes": blocks * per_block,
        "capacity_tokens": blocks * config.cache.block_size,
        "gpu_memory_utilization": config.cache.gpu_memory_utilization,
        "memory_profile": None if profile is None else dataclasses.asdict(profile),
        "draft": None if draft is None else {
            "model": draft.name, "kv_bytes_per_block": draft_per_block, "num_blocks": plan.draft_blocks,
            "kv_cache_bytes": plan.draft_blocks * draft_per_block},
    }


def _logprobs_to_record(p: SamplingParams) -> int | None:
    """How many top log-probabilities to compute for each token a request emits: its `logprobs`, 0
    when it reports none but ranks samples by them (best_of > n), None when it needs none."""
    if p.logprobs is not None:
        return p.logprobs
    return 0 if p.num_samples > p.n else None


def _record_logprob(seq: Sequence, entry: dict[int, Logprob], token: int) -> None:
    """Keep `token`'s log-probabilities `entry` on `seq`: reported when asked, always summed."""
    if seq.params.logprobs is not None:
        seq.logprobs.append(entry)
    seq.cumulative_logprob += entry[token].logprob


@dataclass(frozen=True)
class ArenaPlan:
    """How the KV budget splits between the target's arena and a draft model's (speculative method
    "draft"): block for block from one budget, or the draft sized on its own by
    `draft_kv_cache_memory` (reserved beside the target's budget on a GPU)."""

    num_blocks: int
    draft_blocks: int  # 0 without a draft model
    profile: MemoryProfile | None


def plan_arenas(model: LlamaForCausalLM | None, config: EngineConfig, bytes_per_block: int,
                draft_bytes_per_block: int) -> ArenaPlan:
    """The arenas' sizes for `model` (the target, built, weights and any draft's already loaded; None
    when no model is built, off the GPU); `draft_bytes_per_block` 0 without a draft. ValueError when
    a budget holds no block."""
    spec = config.speculative
    draft_memory = spec.draft_kv_cache_memory if draft_bytes_per_block else None
    if draft_memory is not None and draft_memory < draft_bytes_per_block:
        raise ValueError(f"speculative draft_kv_cache_memory={draft_memory} bytes holds no block of the draft "
                         f"model's KV ({draft_bytes_per_block} bytes); raise it to at least {draft_bytes_per_block}")
    shared = draft_bytes_per_block if draft_memory is None else 0
    num_blocks, profile = plan_kv_cache(model, config.cache, config.scheduler, bytes_per_block + shared,
                                        reserved_bytes=draft_memory or 0)
    if not draft_bytes_per_block:
        return ArenaPlan(num_blocks, 0, profile)
    return ArenaPlan(num_blocks, num_blocks if draft_memory is None else draft_memory // draft_bytes_per_block,
                     profile)


@dataclass(frozen=True)
class KVRoom:
    """The cache as admission control sees it (`LLMEngine.kv_room`), in blocks.

    available: free plus evictable blocks: what allocations may take now.
    watermark: blocks the scheduler keeps available for running requests to grow into (0 while
        none runs).
    waiting_prompts: blocks the prompts of requests waiting in the engine take when admitted
        (without credit for cached prefixes).
    owed_worst_case: over every request in the engine, the blocks it may still take at most
        (prompt + max_tokens) beyond those it holds.
    """

    available: int
    watermark: int
    waiting_prompts: int
    owed_worst_case: int


class StepError(RuntimeError):
    """`LLMEngine.step()` failed: the requests of that step (`request_ids`) were ended and their
    blocks freed; every other request is intact and the engine can go on stepping."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"the engine step failed ({type(cause).__name__}: {cause}); "
                         f"{len(request_ids)} request(s) of that step were ended")
        self.request_ids, self.cause = request_ids, cause


class LLMEngine(ChunkRequests, OverlappedDecode):
    """Owns the model, the KV arena, the cache manager and the scheduler for one model.

    Requests are validated before any state is created (`prepare_request`, or `add_request`, which
    also enqueues): a request that can never run is refused with an InvalidRequestError (a
    ValueError naming the field) and leaves no trace. `step()` runs one batch and returns the
    outputs it moved.

    The weights, the KV arena, the logits and the seeded requests' generators live on `device`
    (`EngineConfig.device` resolved), in `dtype` (`EngineConfig.dtype` resolved; `dtype_name` is what
    cache keys use). `memory_profile` says what sizing the arena on a GPU measured (None when nothing
    was profiled: on the CPU, or with num_blocks / kv_cache_memory given).
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        for spec in config.cache.kv_tiers:
            validate_tier_spec(spec)
        if config.cache.kv_tiers and not config.cache.enable_prefix_caching:
            raise ValueError("kv_tiers keep cached prefix blocks below the arena: they need enable_prefix_caching")
        if config.cache.load_cache is not None and not Path(config.cache.load_cache, "manifest.json").is_file():
            raise ValueError(f"load_cache={config.cache.load_cache!r} holds no saved cache (no manifest.json): pass "
                             f"a directory written by LLM.save_cache")
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            tune_allocator()
        torch.manual_seed(config.seed)
        loaded = load_model(config.model, config.load_format, seed=config.seed, device=self.device)
        self.model_config = cfg = loaded.config
        self.model_name, self.fingerprint = loaded.name, loaded.fingerprint
        self.tokenizer: Tokenizer = loaded.tokenizer
        limit = config.scheduler.max_model_len
        if limit is not None and limit > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={limit} exceeds the model's context length "
                             f"{cfg.max_position_embeddings}")
        self.max_model_len = limit or cfg.max_position_embeddings
        dtype = self.dtype
        spec = config.speculative
        draft = None if spec is None or spec.method != "draft" else load_draft_model(spec, cfg, self.device, dtype,
                                                                                     config.seed)
        self.model = build_model(loaded, self.device, dtype, config.seed)
        del loaded  # the checkpoint's CPU tensors: the model holds its own copies
        block_size = config.cache.block_size
        kv_format = config.cache.kv_cache_dtype
        bytes_per_block = KVCache.block_bytes(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, dtype,
                                              kv_format)
        draft_bytes = 0 if draft is None else KVCache.block_bytes(draft.cfg.num_layers, block_size,
                                                                  draft.cfg.num_kv_heads, draft.cfg.head_dim, dtype,
                                                                  kv_format)
        plan = plan_arenas(self.model, config, bytes_per_block, draft_bytes)
        num_blocks = plan.num_blocks
        self.memory_profile: MemoryProfile | None = plan.profile
        self.kv_cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype,
                                self.device, kv_format)
        self.cache = KVCacheManager(num_blocks, block_size, bytes_per_block,
                                    enable_prefix_caching=config.cache.enable_prefix_caching,
                                    max_pinned_fraction=config.cache.max_pinned_fraction,
                                    max_chunk_fraction=config.cache.max_chunk_fraction,
                                    store=self._open_store(config.cache),
                                    write_policy=config.cache.kv_tier_policy)
        cuda_graphs = self.device.type == "cuda" and not config.enforce_eager
        # with speculation, steps that verify k drafts per sequence (and the draft's catch-ups) replay graphs too
        query_lens = (1,) if spec is None else (1, spec.num_speculative_tokens + 1)
        self.runner = ModelRunner(self.model, self.kv_cache.k, self.kv_cache.v, block_size,
                                  k_scales=self.kv_cache.k_scale, v_scales=self.kv_cache.v_scale,
                                  cuda_graphs=cuda_graphs, max_graph_batch=config.scheduler.max_num_seqs,
                                  max_model_len=self.max_model_len, graph_query_lens=query_lens)
        self.drafter: DraftProposer | None = None  # with speculative method "draft"
        if draft is not None:
            self.drafter = DraftProposer(draft, plan.draft_blocks, block_size, kv_format, self.max_model_len,
                                         config.scheduler.max_num_batched_tokens, cuda_graphs,
                                         config.scheduler.max_num_seqs, query_lens,
                                         config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.cache)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler.finish)
        self._quality_sample = config.cache.kv_quality_sample
        self._quality_rng = random.Random(config.seed)
        self._quality_kl = HistogramCounter(KL_BUCKETS) if self._quality_sample else None
        self._requests: dict[str, Sequence] = {}  # request id -> its (first) sequence
        self._finals: dict[str, dict[int, CompletionOutput]] = {}  # several samples: the finished ones' outputs
        self._generators: dict[int, torch.Generator | None] = {}
        self._seq_ids = itertools.count()
        self._chunks: dict[str, Chunk] = {}
        self._filling: dict[str, Sequence] = {}  # chunk id -> its registration, until its prefill is done
        self._unreturned: list[RequestOutput] = []  # outputs of steps run inside register_chunk
        self._steps = self._prompt_tokens = self._generation_tokens = 0
        self.speculative = config.speculative
        self._spec_drafted = self._spec_accepted = 0
        overlap = cuda_graphs if config.async_scheduling is None else config.async_scheduling
        # speculation and the KV quality monitor need each step's logits on the host: never ahead
        self._init_overlap(overlap and spec is None and not self._quality_sample, config.scheduler.max_num_seqs,
                           self.device)
        self.loaded_cache: LoadedCache | None = None  # what load_cache restored
        if config.cache.load_cache is not None:
            self.loaded_cache = self._load_cache(config.cache.load_cache)

    @property
    def block_format(self) -> BlockFormat:
        """What this engine's blocks are, as the tiers and saved caches record them."""
        kv = self.kv_cache
        return BlockFormat(self.fingerprint, self.kv_format_name, kv.block_size, kv.num_layers, kv.bytes_per_block)

    def _open_store(self, cache: CacheConfig) -> TieredStore | None:
        """The tiers of `cache.kv_tiers` over this engine's arena (None without any)."""
        if not cache.kv_tiers:
            return None
        return TieredStore(self.kv_cache, [open_tier(spec) for spec in cache.kv_tiers], self.block_format)

    def save_cache(self, path: str) -> SavedCache:
        """Write the cached prefixes, the pins and the registered chunks to the directory `path`
        (`KVCacheManager.save_snapshot`: incremental, atomic manifest). Changes nothing here."""
        chunks = [SnapshotChunk(c.chunk_id, c.kind, c.token_ids, self.chunk_extra(c.kind), c.page_indices)
                  for c in self._chunks.values()]
        return self.cache.save_snapshot(self.kv_cache, self.block_format, path, chunks)

    def _load_cache(self, path: str) -> LoadedCache:
        """Restore a saved cache: its blocks and pins (`KVCacheManager.load_snapshot`), then its chunks,
        each from its saved pages or, when they are missing or rejected, recomputed."""
        loaded = self.cache.load_snapshot(self.kv_cache, self.block_format, path)
        for c in loaded.chunks:
            try:
                pages = self.cache.load_snapshot_chunk(self.kv_cache, self.block_format, path, c)
                if pages is not None:
                    self._chunks[c.chunk_id] = self._chunk(c.chunk_id, c.token_ids, c.kind, pages.block_ids)
                else:
                    self.register_chunk({"prompt_token_ids": list(c.token_ids)}, c.kind, c.chunk_id)
            except (ValueError, NoFreeBlocksError) as e:  # no room in this (smaller) cache
                log.warning("kvforge: chunk %r of the saved cache %s is not restored: %s", c.chunk_id, path, e)
        log.info("kvforge: restored %d blocks, %d pins and %d chunks from %s (%d blocks skipped: %s)",
                 loaded.blocks_loaded, loaded.pins_restored, len(self._chunks), path, loaded.blocks_skipped,
                 loaded.rejected_by_reason or "none rejected")
        return loaded

    def close(self) -> None:
        """Write the cached blocks back to the tiers (under write_back: every resident one, so a later
        process finds them), wait for the writes, and stop the tiers' threads. Idempotent; the engine
        serves on without tiers afterwards."""
        store = self.cache.store
        if store is not None:
            self.cache.flush_to_tiers(timeout=120)
            store.close()

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request (lower `priority` runs first; equal priorities in arrival order): `enqueue`
        of `prepare_request`. Raises InvalidRequestError (a ValueError) and changes nothing for a bad
        one."""
        self.enqueue(self.prepare_request(request_id, prompt, params, priority))

    def prepare_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                        priority: int = 0) -> PreparedRequest:
        """Validate a request and resolve its max_tokens (None: up to the model length and what one
        sequence can hold). A dict prompt may carry `cache_salt` (overriding `params.cache_salt`):
        requests with different salts never share cached KV. Raises InvalidRequestError naming the
        field: a duplicate id, an empty, invalid or out-of-vocabulary prompt, a bad salt or priority,
        or a request that can never fit the model length or the cache. Creates no state."""
        params = self._check_request(request_id, params, priority)
        text, ids, array = self._prompt_ids(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
            array = None if array is None else array[-params.truncate_prompt_tokens:]
        salt = self._salt(prompt, params)
        lookup = lambda: self.cached_prefix(ids, salt)  # noqa: E731 (looked up only when needed)
        params = self._resolve_max_tokens(params, len(ids), len(ids), lookup)
        self._check_fits(len(ids), params, len(ids), lookup)
        seq = Sequence(next(self._seq_ids), request_id, text, ids, params, time.monotonic(),
                       cache_extra=self.cache_extra(salt), prompt_array=array)
        self._prepare_sampling(seq)
        return PreparedRequest(seq, priority)

    def _prepare_sampling(self, seq: Sequence) -> None:
        """Check the sampling fields that depend on the model (token ids within the vocabulary),
        tokenize `bad_words` onto `seq`, and start its group when it asks for several samples.
        InvalidRequestError naming the field."""
        p, vocab = seq.params, self.model_config.vocab_size
        for name, ids in (("logit_bias", p.logit_bias or ()), ("allowed_token_ids", p.allowed_token_ids or ())):
            outside = next((t for t in ids if t >= vocab), None)
            if outside is not None:
                raise InvalidRequestError(f"{name} names token id {outside}, outside the vocabulary "
                                          f"[0, {vocab - 1}]", name)
        if p.bad_words:
            seq.bad_words_ids = self._bad_words_ids(p.bad_words)
        if p.num_samples > 1:
            seq.group = [seq]

    def _bad_words_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's token ids as it reads at the start of a text and after a space (vLLM's two
        spellings), duplicates dropped."""
        out: dict[tuple[int, ...], None] = {}
        for word in words:
            for text in (word, " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    out[ids] = None
        return tuple(out)

    def enqueue(self, prepared: PreparedRequest) -> None:
        """Add a prepared request to the waiting queue. Checks again what may have changed since it
        was prepared (its id, its chunks, what one sequence can hold) and raises
        InvalidRequestError, changing nothing, when that no longer holds."""
        seq = prepared.seq
        if seq.request_id in self._requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use", "request_id")
        for chunk_id in prepared.chunk_ids:
            self._resolve_chunk(chunk_id)
        lookup = None if seq.composition else (lambda: self.cache.match_prefix([*seq.token_ids, 0], seq.cache_extra))
        self._check_fits(seq.total_len, seq.params, len(seq.token_ids), lookup)
        generator = self._generator(seq.params.seed, 0)
        if not seq.composition and not computes_whole_prompt(seq):
            self.cache.prefetch(seq.token_ids, seq.cache_extra)  # from the tiers, while it waits
        # Nothing below can fail.
        self.cache.acquire_chunks(prepared.chunk_ids)
        self._requests[seq.request_id] = seq
        self._generators[seq.seq_id] = generator
        self.outputs.add(seq)
        self.scheduler.add(seq, prepared.priority)

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        """The generator of a seeded request's sample `index` (None without a seed): sample 0 draws
        from `seed` itself, the others from seeds derived from it, all reproducible and distinct."""
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed((seed + index * 0x9E3779B97F4A7C15) % (1 << 64))

    def _check_request(self, request_id: str, params: SamplingParams | None, priority: int) -> SamplingParams:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request id must be a non-empty string, got {request_id!r}", "request_id")
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority must be an integer (lower runs first), got {priority!r}", "priority")
        return params

    @property
    def dtype_name(self) -> str:
        """The resolved dtype's name ("float32", "bfloat16", ...), as `info` uses it."""
        return dtype_name(self.dtype)

    @property
    def kv_format_name(self) -> str:
        """What the KV blocks hold, as cache keys and chunk ids use it: the dtype's name for "auto"
        ("float32", ...), else the pages' format with it ("int8/float32": codes dequantized to that
        dtype; "int4+prerope+firstkey+hadamard+lloydmax/float32", see `KVLayout.page_name`). Blocks
        of different formats never share a key."""
        layout = self.kv_cache.layout
        return self.dtype_name if not layout.quantized else f"{layout.page_name}/{self.dtype_name}"

    def cache_extra(self, cache_salt: str | None) -> bytes:
        """The extra keys of this engine's cached blocks: what besides the tokens determines their KV
        (the model's weights, the KV format, the tenant's salt)."""
        return extra_keys(self.fingerprint, self.kv_format_name, cache_salt)

    def pin_cached_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> PinHandle:
        """Pin the cached full blocks that prefix `token_ids` under `cache_salt` (see
        `KVCacheManager.pin`); computes nothing: `LLM.pin_prefix` prefills first when needed.
        Raises ValueError when prefix caching is off, no full block is cached, or over the budget."""
        return self.cache.pin(self.cached_prefix(token_ids, cache_salt))

    def cached_prefix(self, token_ids: list[int], cache_salt: str | None = None) -> PrefixMatch:
        """The cached full blocks of `token_ids` (all of them may match: a dummy token stands for
        the next one, whose logits a lookup always leaves to be computed). Changes nothing."""
        return self.cache.match_prefix([*token_ids, 0], self.cache_extra(cache_salt))

    # ---- admission --------------------------------------------------------------------------------

    def kv_room(self) -> KVRoom:
        """The cache's room as admission control reads it (see KVRoom). O(requests); changes nothing."""
        cache, bs = self.cache, self.cache.block_size
        waiting = owed = 0
        for s in self.scheduler.waiting:
            if s.fills_chunk is None:
                waiting += ceil_div(len(s.token_ids), bs)
                owed += self._owed_blocks(s)
        for s in self.scheduler.running:
            if s.fills_chunk is None:
                owed += max(0, blocks_for(s.num_prompt_tokens, s.params.max_tokens, bs)
                            - len(cache.block_table(s.seq_id)))
        # The scheduler keeps the watermark only while something runs (else nothing could grow into it).
        watermark = self.scheduler.watermark_blocks if self.scheduler.running else 0
        return KVRoom(cache.num_available_blocks, watermark, waiting, owed)

    def prompt_blocks(self, prepared: PreparedRequest) -> int:
        """Blocks the request's prompt takes when admitted now: its private tokens less the full
        blocks of its cached prefix. Changes nothing."""
        seq, bs = prepared.seq, self.cache.block_size
        cached = 0 if seq.composition else len(self.cache.match_prefix(seq.token_ids, seq.cache_extra).block_ids)
        return ceil_div(len(seq.token_ids), bs) - cached

    def worst_case_blocks(self, prepared: PreparedRequest) -> int:
        """The most blocks the request can ever hold: its private prompt tokens and max_tokens, and
        each further sample's own blocks (they share the prompt's full blocks)."""
        return self._owed_blocks(prepared.seq)

    def _owed_blocks(self, seq: Sequence) -> int:
        """The most blocks a sequence not yet admitted may take (see `worst_case_blocks`)."""
        bs = self.cache.block_size
        one = blocks_for(seq.num_prompt_tokens, seq.params.max_tokens, bs)
        forks = seq.params.num_samples - 1 if seq.group is not None and len(seq.group) == 1 else 0
        return one + forks * (one - seq.num_prompt_tokens // bs)

    def abort_request(self, request_id: str) -> None:
        """Stop a request (or a chunk registration) and free its blocks now. Unknown or finished ids
        are ignored."""
        seq = self._requests.get(request_id)
        if seq is not None:
            for member in list(seq.group or [seq]):
                if not member.finished:
                    self.scheduler.finish(member, "abort")
                self._forget(member)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._unreturned)

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt; InvalidRequestError (param "prompt") naming what is
        wrong with a bad one. `add_special_tokens` applies to text only (token ids are taken as
        given, numpy integers too): BOS where the model's tokenizer adds one. Thread-safe: changes
        nothing."""
        text, ids, _ = self._prompt_ids(prompt, add_special_tokens)
        return text, ids

    def _prompt_ids(self, prompt: PromptType, add_special_tokens: bool = True
                    ) -> tuple[str | None, list[int], np.ndarray | None]:
        """`tokenize`, plus the token ids as the uint32 array they were validated through (None for
        text), which prefix-cache lookups take without converting the list again."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty; give at least one character or token", "prompt")
            try:
                return prompt, self.tokenizer.encode(prompt, add_special_tokens), None
            except ValueError as e:
                raise InvalidRequestError(str(e).replace("text", "prompt", 1), "prompt") from None
        if isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not ids:
                raise InvalidRequestError("prompt_token_ids must be a non-empty list of token ids", "prompt")
            vocab = self.model_config.vocab_size
            # The common case in numpy passes (a 32k-token prompt in well under a millisecond); the
            # loop names the culprit. Bools pass the conversion as 0 and 1: only those places are checked.
            try:
                arr = token_array(ids)
            except ValueError:
                arr = None
            if arr is None or arr.max() >= vocab or any(type(ids[i]) is bool for i in np.flatnonzero(arr <= 1).tolist()):
                for i, t in enumerate(ids):
                    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                        raise InvalidRequestError(f"prompt_token_ids[{i}] = {t!r} is not a token id; "
                                                  f"allowed: integers in [0, {vocab - 1}]", "prompt")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise InvalidRequestError(f"prompt must be a str next to prompt_token_ids, got {type(text).__name__}",
                                          "prompt")
            return text, list(ids), arr
        raise InvalidRequestError(f"a prompt is a string or a dict with 'prompt_token_ids', got "
                                  f"{type(prompt).__name__}", "prompt")

    def tokenize_chat(self, messages: list[Mapping[str, str]], add_generation_prompt: bool = True,
                      chat_template: str | None = None, continue_final_message: bool = False) -> dict:
        """A conversation rendered with the model's chat template (or `chat_template`), as a prompt
        ({"prompt": text, "prompt_token_ids": ids}); see `Tokenizer.apply_chat_template`. ValueError
        for messages the template or the tokenizer cannot take. Thread-safe: changes nothing."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt, chat_template,
                                                  continue_final_message)
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    @staticmethod
    def _salt(prompt: PromptType, params: SamplingParams) -> str | None:
        if isinstance(prompt, Mapping) and prompt.get("cache_salt") is not None:
            salt = prompt["cache_salt"]
            if not isinstance(salt, str) or not salt:
                raise InvalidRequestError(f"cache_salt must be a non-empty string or None, got {salt!r}", "cache_salt")
            check_unicode(salt, "cache_salt")
            return salt
        return params.cache_salt

    def _resolve_max_tokens(self, params: SamplingParams, num_prompt: int, num_private: int,
                            cached_prefix: Callable[[], PrefixMatch] | None = None) -> SamplingParams:
        """`params` with max_tokens None replaced by as many tokens as the model length and one
        sequence's share of the cache allow (see `_check_fits`); InvalidRequestError if none fits."""
        if params.max_tokens is not None:
            return params
        limit = self._sequence_block_limit(cached_prefix)
        by_cache = limit * self.cache.block_size + 1 - num_private  # the last sampled token is never stored
        max_tokens = min(self.max_model_len - num_prompt, by_cache)
        if max_tokens < 1:
            raise InvalidRequestError(
                f"prompt of {num_prompt} tokens leaves no room for a reply within the model's length "
                f"({self.max_model_len} tokens) and the cache ({limit} blocks of {self.cache.block_size} tokens "
                f"for one request); shorten it", "prompt", "context_length_exceeded")
        return dataclasses.replace(params, max_tokens=max_tokens)

    def _sequence_block_limit(self, cached_prefix: Callable[[], PrefixMatch] | None) -> int:
        limit = self.cache.sequence_block_limit()
        if cached_prefix is not None and self.cache.enable_prefix_caching and self.cache.pins():
            limit = self.cache.sequence_block_limit(cached_prefix())
        return limit

    def _check_fits(self, num_prompt: int, params: SamplingParams, num_private: int,
                    cached_prefix: Callable[[], PrefixMatch] | None = None) -> None:
        """Refuse a request that could never run: `num_prompt` tokens (the whole prompt) plus
        max_tokens over the model length, or its `num_private` prompt tokens (those with KV of its
        own: chunk tokens reused from chunk pages are not) plus max_tokens needing more blocks than
        one sequence can ever hold beside the chunk pages and pins (`sequence_block_limit`; pinned
        blocks of the prompt's `cached_prefix` count as its own, looked up only when needed)."""
        total = num_prompt + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt of {num_prompt} tokens plus max_tokens={params.max_tokens} is {total} tokens, over "
                f"max_model_len={self.max_model_len} (the model's length); shorten the prompt or lower max_tokens",
                "max_tokens" if num_prompt < self.max_model_len else "prompt", "context_length_exceeded")
        blocks = blocks_for(num_private, params.max_tokens, self.cache.block_size)
        limit = self.cache.sequence_block_limit()
        if blocks > limit:
            limit = self._sequence_block_limit(cached_prefix)
        if blocks > limit:
            held = self.cache.num_blocks - limit
            raise InvalidRequestError(
                f"prompt of {num_prompt} tokens plus max_tokens={params.max_tokens} needs {blocks} KV blocks, "
                f"more than one request can hold: at most {limit} of the cache's {self.cache.num_blocks} "
                f"({held} are kept by registered chunks and pinned prefixes); lower max_tokens, unregister "
                f"chunks or unpin prefixes, or give the cache more memory", "max_tokens")

    # ---- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that got a token or finished (shaped
        by its `output_kind`), and a finished output with no completions for every chunk
        registration that completed. Raises StepError when the batch fails: the requests of that
        step are ended and their blocks freed, everything else is left intact."""
        new = self._step()  # if it raises, outputs held back so far stay for the next step
        outputs, self._unreturned = self._unreturned + new, []
        return outputs

    def _step(self) -> list[RequestOutput]:
        if self._overlap:
            landed = self._overlapped_step()  # None: this step runs synchronously
            if landed is not None:
                return landed
        if self.speculative is not None:
            self._propose_drafts()
        try:
            sched = self.scheduler.schedule()
            if self.drafter is not None:
                for seq in sched.preempted:
                    self.drafter.free(seq.seq_id)
            if not sched.runs:
                return []
            self._steps += 1
            try:
                return self._run(sched.runs)
            except Exception as e:
                raise self._fail([r.seq for r in sched.runs], e) from e
        finally:
            if self.drafter is not None:
                self.drafter.settle()

    def _token_run(self, seq: Sequence, num_tokens: int, slots: list[int]) -> TokenRun:
        """The TokenRun of `seq`'s next `num_tokens` tokens (from its first uncomputed one) into its
        blocks, or a chunk's pages when it fills one; the last token's logits when they end its
        tokens (a chunk fill's: none), every token's while its prompt log-probabilities are owed."""
        start = seq.num_computed
        if seq.fills_chunk is None:
            table, logits = self.cache.block_table(seq.seq_id), start + num_tokens == len(seq.token_ids)
        else:
            table, logits = self.cache.chunk_pages(seq.fills_chunk).block_ids, False
        return TokenRun(seq.token_ids[start:start + num_tokens], start, slots, table, logits, seq.composition,
                        all_logits=computes_whole_prompt(seq))

    def _computed(self, seq: Sequence, num_tokens: int) -> bool:
        """Advance `seq` past `num_tokens` computed tokens (counted as prompt tokens while within its
        prompt) and cache the blocks they filled (a plain sequence's; never a composed one's or a
        chunk fill's). Returns whether the commit swapped in a cached twin (its block table changed)."""
        seq.num_computed += num_tokens
        if seq.num_computed <= seq.num_prompt_tokens:
            self._prompt_tokens += num_tokens
        bs = self.cache.block_size
        return (seq.fills_chunk is None and seq.composition is None
                and seq.num_computed // bs > (seq.num_computed - num_tokens) // bs
                and self.cache.commit(seq.seq_id, seq.token_ids, seq.num_computed))

    def _fail(self, seqs: list[Sequence], cause: Exception) -> StepError:
        """End the requests of `seqs`, whose computation failed in this step (their blocks are freed),
        and return the StepError naming them, for the caller to raise."""
        failed = list(dict.fromkeys(seq.request_id for seq in seqs))
        for request_id in failed:
            self.abort_request(request_id)
        return StepError(failed, cause)

    def _run(self, runs: list[ScheduledRun]) -> list[RequestOutput]:
        items = []
        for r in runs:
            seq = r.seq
            if seq.draft:  # its last token and the drafted ones, each one's logits verifying the next
                items.append(TokenRun([seq.token_ids[-1], *seq.draft], seq.num_computed, r.slots,
                                      self.cache.block_table(seq.seq_id), True, seq.composition, all_logits=True))
            else:
                items.append(self._token_run(seq, r.num_tokens, r.slots))
        logits = self.runner.run(items)
        outputs = []
        sampling: list[Sequence] = []
        rows: list[int] = []  # the logits row each sampled sequence draws from
        speculated: list[tuple[Sequence, int, int]] = []  # with the logits rows verifying its draft: [at, end)
        at = 0
        for r, item in zip(runs, items):
            seq = r.seq
            if seq.draft:
                speculated.append((seq, at, at + item.num_logits))
                at += item.num_logits
                continue
            if item.all_logits:
                self._add_prompt_logprobs(seq, item.start_pos, logits[at:at + item.num_logits])
            at += item.num_logits
            if item.needs_logits:
                sampling.append(seq)
                rows.append(at - 1)
            self._computed(seq, r.num_tokens)
            if seq.fills_chunk is not None and seq.num_computed == len(seq.token_ids):
                outputs.append(self._register_filled(seq))
        for seq, row in list(zip(sampling, rows)):
            if seq.group is not None and len(seq.group) == 1:  # its prompt is done: the other samples start
                for child in self._fork(seq):
                    sampling.append(child)
                    rows.append(row)
        # the greedy speculating sequences' verifying argmax, read from the device once for all of them
        verifying = logits
        argmax = verifying.argmax(dim=-1).tolist() if any(s.params.greedy for s, _, _ in speculated) else None
        tokens: list[int] = []
        if sampling:  # a step of verify runs only samples nothing here
            if rows != list(range(logits.shape[0])):
                logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
            if self._quality_kl is not None:
                self._sample_kv_quality(sampling, logits)
            tokens = sample(logits, [self._sampling_row(s) for s in sampling])
            self._add_logprobs(logits, sampling, tokens)
        now = time.monotonic()
        for seq, token in zip(sampling, tokens):
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._generation_tokens += 1
            self.outputs.append_token(seq, token, self.max_model_len)
        for seq, start, end in speculated:
            if seq.first_token_time is None:  # its prompt's last token was verified with a draft
                seq.first_token_time = now
            self._accept_draft(seq, verifying[start:end], None if argmax is None else argmax[start:end])
        groups: dict[str, list[Sequence]] = {}  # request -> its samples that got tokens now
        for seq in [*sampling, *(seq for seq, _, _ in speculated)]:
            if seq.group is not None:
                groups.setdefault(seq.request_id, []).append(seq)
                continue
            out = self.outputs.output(seq)
            if out is not None:
                outputs.append(out)
            if seq.finished:
                self._forget(seq)
        for members in groups.values():
            out = self._group_output(members)
            if out is not None:
                outputs.append(out)
        return outputs

    # ---- speculative decoding -------------------------------------------------------------------

    def _propose_drafts(self) -> None:
        """Give each running sequence that decodes (one uncomputed token; not a request's first sample
        before its siblings start) a draft that fits its max_tokens and capacity (prompt lookup, or the
        draft model's; the draft model drafts only for sequences not composed from chunks, whose
        positions its own cache does not follow); clear every other sequence's. When the draft model's
        forward fails, the requests of the sequences it was drafting for are ended (StepError)."""
        spec = self.speculative
        eligible: list[tuple[Sequence, int]] = []  # with the most tokens each may draft
        for seq in self.scheduler.running:
            seq.draft = []
            p = seq.params
            if (seq.num_uncomputed != 1 or seq.fills_chunk is not None
                    or (seq.composition is not None and self.drafter is not None)
                    or (seq.group is not None and len(seq.group) == 1)):
                continue
            room = min(spec.num_speculative_tokens, p.max_tokens - seq.num_output_tokens - 1,
                       self.cache.remaining(seq.seq_id) - 1, self.max_model_len - seq.total_len - 1)
            if room > 0:
                eligible.append((seq, room))
        if self.drafter is None:
            for seq, room in eligible:
                seq.draft = propose_ngram(seq.token_ids, room, spec.prompt_lookup_min, spec.prompt_lookup_max)
            return
        try:
            drafts = self.drafter.propose(eligible)
        except Exception as e:
            raise self._fail([seq for seq, _ in eligible], e) from e
        for (seq, _), draft in zip(eligible, drafts):
            seq.draft = draft

    def _accept_draft(self, seq: Sequence, verifying: torch.Tensor, argmax: list[int] | None) -> None:
        """The verifying forward of `seq`'s draft ran: keep the accepted tokens' K/V (roll the cache back
        past them), cache the blocks they filled (not for a composed sequence, whose blocks are private),
        append the accepted tokens and the one the sampler adds (stopping where the sequence finishes)
        with their log-probabilities when asked or ranked (from the verifying logits, as plain decoding
        takes them from its own). The caller makes the output. `argmax`: the verifying rows' argmax when
        the step read it for every greedy sequence at once, else None."""
        draft, seq.draft = seq.draft, []
        tokens = verify_draft(verifying, draft, self._sampling_row(seq), argmax)
        accepted = len(tokens) - 1
        self._spec_drafted += len(draft)
        self._spec_accepted += accepted
        before = seq.num_computed
        self._prompt_tokens += max(0, seq.num_prompt_tokens - before)  # a prompt's last token verified a draft
        seq.num_computed += 1 + accepted
        if accepted < len(draft):
            copy = self.cache.rollback(seq.seq_id, len(draft) - accepted)
            if copy is not None:
                self.kv_cache.copy_block(*copy)
        bs = self.cache.block_size
        if seq.composition is None and seq.num_computed // bs > before // bs:
            self.cache.commit(seq.seq_id, [*seq.token_ids, *tokens[:accepted]], seq.num_computed)
        k = _logprobs_to_record(seq.params)
        entries = [] if k is None else token_logprobs(verifying[:len(tokens)], tokens, k)  # row i emitted token i
        for i, token in enumerate(tokens):
            if entries:
                _record_logprob(seq, entries[i], token)
            self._generation_tokens += 1
            self.outputs.append_token(seq, token, self.max_model_len)
            if seq.finished:
                break

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Start the other samples of `parent`'s request (its prompt is computed, its first token not
        yet sampled): each a new sequence holding `parent`'s tokens, on `parent`'s blocks when the
        scheduler can run it now (see `Scheduler.fork`), registered like `parent` (generator,
        detokenizer, chunk users, group)."""
        children = []
        for index in range(1, parent.params.num_samples):
            child = Sequence(next(self._seq_ids), parent.request_id, parent.prompt, parent.prompt_token_ids,
                             parent.params, parent.arrival, cache_extra=parent.cache_extra,
                             token_ids=list(parent.token_ids), num_cached_tokens=parent.num_cached_tokens,
                             composition=parent.composition, first_token_time=parent.first_token_time,
                             index=index, group=parent.group, bad_words_ids=parent.bad_words_ids,
                             prompt_logprobs=parent.prompt_logprobs)
            copy = self.scheduler.fork(parent, child)
            # Nothing below can fail but the copy, and by then the child is the request's like the parent.
            self._generators[child.seq_id] = self._generator(parent.params.seed, index)
            self.outputs.add(child)
            if child.composition is not None:
                self.cache.acquire_chunks([p.chunk_id for p in child.composition.placements])
            parent.group.append(child)
            if copy is not None:
                self.kv_cache.copy_block(*copy)
            children.append(child)
        return children

    def _sample_kv_quality(self, sampling: list[Sequence], logits: torch.Tensor) -> None:
        """For a `kv_quality_sample` fraction of this step's decodes (plain sequences past their
        prompt), recompute the next-token logits from full-precision K/V and record the KL divergence
        KL(full || quantized) of the two distributions (before any sampling option)."""
        for i, seq in enumerate(sampling):
            if seq.composition is not None or seq.num_computed <= seq.num_prompt_tokens:
                continue
            if self._quality_rng.random() >= self._quality_sample:
                continue
            ref = self.runner.full_precision_logits(seq.token_ids[:seq.num_computed]).log_softmax(-1)
            got = logits[i].float().log_softmax(-1)
            self._quality_kl.observe(max(0.0, float((ref.exp() * (ref - got)).sum())))

    def _add_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Extend `seq.prompt_logprobs` from the logits of its tokens at `start`.. (row j predicts
        the token at start + j + 1), up to its last prompt token; the first prompt token has None."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        first = len(seq.prompt_logprobs)  # the next prompt position without an entry
        end = min(seq.num_prompt_tokens, start + logits.shape[0] + 1)
        if first < end:
            seq.prompt_logprobs.extend(token_logprobs(logits[first - 1 - start:end - 1 - start],
                                                      seq.token_ids[first:end], seq.params.prompt_logprobs))

    def _add_logprobs(self, logits: torch.Tensor, sampling: list[Sequence], tokens: list[int]) -> None:
        """Record the sampled tokens' log-probabilities for the sequences that report them, or rank
        their samples by them (best_of), in one batched pass per `logprobs` count."""
        by_k: dict[int, list[int]] = {}
        for row, seq in enumerate(sampling):
            k = _logprobs_to_record(seq.params)
            if k is not None:
                by_k.setdefault(k, []).append(row)
        for k, rows in by_k.items():
            entries = token_logprobs(logits[rows], [tokens[r] for r in rows], k)
            for row, entry in zip(rows, entries):
                _record_logprob(sampling[row], entry, tokens[row])

    def _group_output(self, members: list[Sequence]) -> RequestOutput | None:
        """The RequestOutput of a request with several samples after a step in which `members` got a
        token: DELTA, what each of them added; CUMULATIVE, every sample so far; FINAL_ONLY (and any
        request with best_of > n), all samples once all are done, the n with the highest cumulative
        log-probability for best_of. Forgets the samples that finished (the request with the last)."""
        group = members[0].group
        parent, p = group[0], members[0].params
        first = all(m.num_sent_tokens == 0 for m in group)
        finals = self._finals.setdefault(parent.request_id, {})
        new: dict[int, CompletionOutput] = {}  # index -> the completion of a member, after its token
        for m in members:
            completion = self.outputs.completion(m)
            if completion is not None:
                new[m.index] = completion
                if m.finished:
                    finals[m.index] = completion
            if m.finished:
                self._forget(m)
        done = all(m.finished for m in group)
        if p.output_kind is OutputKind.DELTA:
            completions = list(new.values())
        elif p.output_kind is OutputKind.CUMULATIVE and p.num_samples == p.n:
            # A sample without a token this step (one waiting to be recomputed) shows what it has.
            completions = [finals.get(m.index) or new.get(m.index) or self.outputs.completion(m) for m in group]
        elif done:
            completions = [finals[i] for i in range(len(group))]
            if p.num_samples > p.n:
                best = sorted(group, key=lambda m: -m.cumulative_logprob)[:p.n]
                completions = [dataclasses.replace(finals[m.index], index=i, cumulative_logprob=m.cumulative_logprob)
                               for i, m in enumerate(best)]
        else:
            return None
        return self.outputs.request_output(parent, completions, done, first)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        """What the sampler needs of `seq` this step (EOS and stop ids only while min_tokens holds them back)."""
        p = seq.params
        stop = frozenset(self.tokenizer.eos_token_ids) | frozenset(p.stop_token_ids) \
            if seq.num_output_tokens < p.min_tokens else frozenset()
        return SamplingRow(p, self._generators[seq.seq_id], seq.token_ids, seq.num_prompt_tokens, stop,
                           seq.bad_words_ids)

    def _forget(self, seq: Sequence) -> None:
        """Drop what the engine keeps for a finished sequence: its draft sequence, its chunk users, or
        the pages of a registration that did not complete; its request too once no sample of it is left."""
        if self.drafter is not None:
            self.drafter.free(seq.seq_id)
        if not self._owns(seq) or seq.seq_id not in self.outputs and seq.fills_chunk is None:
            return
        if seq.composition is not None:
            self.cache.release_chunks([p.chunk_id for p in seq.composition.placements])
        if seq.fills_chunk is not None and self._filling.get(seq.fills_chunk) is seq:
            del self._filling[seq.fills_chunk]
            self.cache.free_chunk(seq.fills_chunk)
        self.outputs.forget(seq)
        self._generators.pop(seq.seq_id, None)
        if all(m.finished and m.seq_id not in self.outputs for m in seq.group or [seq]):
            del self._requests[seq.request_id]
            self._finals.pop(seq.request_id, None)

    def _owns(self, seq: Sequence) -> bool:
        """Whether `seq` is a sample of a request the engine tracks."""
        request = self._requests.get(seq.request_id)
        return request is seq or (request is not None and request.group is not None
                                  and any(m is seq for m in request.group))

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
            kv_cache_dtype=self.kv_cache.kv_format,
            kv_bytes_per_token=self.kv_cache.bytes_per_token,
            capacity_tokens=self.kv_cache.num_slots,
            kv_quality_kl=None if self._quality_kl is None else self._quality_kl.snapshot(),
            tiers=self.cache.store_stats(),
            restored_tokens=self.cache.restored_tokens,
            spec_draft_tokens=self._spec_drafted,
            spec_accepted_tokens=self._spec_accepted,
        )

    def check_integrity(self) -> None:
        """Every block accounted for, and the engine's per-request state agrees with the scheduler's
        queues: the cache holds exactly the running sequences (not chunk registrations, whose pages
        are chunk pages), each request id, generator and detokenizer belongs to an unfinished
        sequence, and every chunk's user count is the number of unfinished requests composed from it.
        With a draft model, its cache holds only running sequences, none past its computed tokens.
        Raises RuntimeError naming the first disagreement. Changes nothing."""
        self.cache.check_integrity()
        if self.drafter is not None:
            self.drafter.check_integrity(self.scheduler.running)
        queued = [*self.scheduler.running, *self.scheduler.waiting]
        for seq in self.scheduler.running:
            if seq.fills_chunk is None and self.cache.length(seq.seq_id) < seq.num_computed:
                raise RuntimeError(f"sequence {seq.seq_id} computed {seq.num_computed} tokens but the cache "
                                   f"holds {self.cache.length(seq.seq_id)}")
        cached = sum(1 for s in self.scheduler.running if s.fills_chunk is None)
        if self.cache.num_sequences != cached:
            raise RuntimeError(f"the cache holds {self.cache.num_sequences} sequences, {cached} are running")
        queued_ids = {s.request_id for s in queued}
        if queued_ids != set(self._requests) or not all(self._owns(s) for s in queued):
            raise RuntimeError(f"the engine tracks {len(self._requests)} requests, the scheduler holds "
                               f"{len(queued_ids)}: {sorted(self._requests)[:5]} vs {sorted(queued_ids)[:5]}")
        if not set(self._finals) <= queued_ids:
            raise RuntimeError(f"finished samples are kept for requests no longer queued: {sorted(self._finals)[:5]}")
        generating = {s.seq_id for s in queued if s.fills_chunk is None}
        if set(self._generators) != generating or len(self.outputs) != len(generating) \
                or not all(i in self.outputs for i in generating):
            raise RuntimeError(f"generators or detokenizers are left for {len(self._generators)} / "
                               f"{len(self.outputs)} sequences, {len(generating)} are unfinished")
        filling = [s for s in queued if s.fills_chunk is not None]
        if len(filling) != len(self._filling) or any(self._filling.get(s.fills_chunk) is not s for s in filling):
            raise RuntimeError(f"chunk registrations in flight {sorted(self._filling)} disagree with the queues")
        users = dict.fromkeys(self._chunks, 0)
        for s in queued:
            for p in s.composition.placements if s.composition else ():
                users[p.chunk_id] = users.get(p.chunk_id, 0) + 1
        counted = {c: self.cache.chunk_users(c) for c in users}
        if counted != users:
            raise RuntimeError(f"chunk user counts {counted} disagree with the requests composed from them {users}")
