"""LLM: the offline API, shaped like vLLM's (`generate`, `chat`, `get_tokenizer`)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq

from tqdm import tqdm

from kvforge.cache import KVEvent, PinHandle
from kvforge.config import EngineConfig
from kvforge.engine.engine import EngineStats, LLMEngine, PromptType, SavedCache
from kvforge.model.tokenizer import Tokenizer
from kvforge.types import Chunk, OutputKind, RequestOutput, SamplingParams

Message = Mapping[str, str]


class LLM:
    """`LLM(model="smollm2-135m", device="auto", dtype=None, load_format="auto", block_size=16,
    kv_cache_memory=None, num_blocks=None, gpu_memory_utilization=0.9, enable_prefix_caching=True,
    max_pinned_fraction=0.5, kv_cache_dtype="auto", kv_quality_sample=0.0, kv_tiers=(),
    kv_tier_policy="write_back", load_cache=None, max_num_seqs=..., max_num_batched_tokens=...,
    max_model_len=..., seed=0)`.

    `model` is the alias of the embedded model, a .gguf path or a HF model directory (with
    `load_format="dummy"`: a HF config.json or its directory, random weights). `device` "auto" takes
    the GPU when torch sees one; `dtype` None is bfloat16 there, float32 on the CPU. On a GPU the KV
    cache takes what `gpu_memory_utilization` of the device leaves after the weights and a profiled
    step, unless `num_blocks` or `kv_cache_memory` fix it (on the CPU it defaults to 1 GiB).
    `kv_cache_dtype` "int8", "int4", "fp8_e4m3" or "fp8_e5m2" quantizes the KV cache (the same bytes
    then hold 2-4x the tokens of float16); `kv_quality_sample` measures what that costs as it serves.
    `kv_tiers` (e.g. `["host:4GiB", "disk:/var/cache/kvforge:50GiB", "redis://127.0.0.1:6379/0"]`) keep
    evicted blocks below the arena and load them back instead of recomputing; `load_cache` restores a
    directory written by `save_cache`. Call `close()` (or use `with LLM(...) as llm:`) to write the
    cached blocks back to the tiers before the process ends.
    See `EngineConfig`, `CacheConfig`, `SchedulerConfig`.
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine (vLLM's name for it)."""
        return self.engine

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True, priority: Seq[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; outputs come in prompt order.

        All prompts are validated before any runs: one bad prompt raises ValueError and none is kept.
        `use_tqdm` shows a progress bar on stderr as vLLM does (requests done, input and output tok/s);
        a callable is used in place of `tqdm`. `priority` gives each prompt's priority (lower runs first).
        """
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Seq):
            prompts = [prompts]  # a single prompt; add_request says what is wrong with a bad one
        prompts = list(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), SamplingParams, len(prompts), "sampling params")
        priorities = [0] * len(prompts) if priority is None else _per_prompt(priority, None, len(prompts), "priorities")
        return self._wait(self._add(zip(prompts, params, priorities)), use_tqdm)

    def chat(self, messages: Seq[Message] | Seq[Seq[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[RequestOutput]:
        """Render each conversation (one list of messages, or a list of them) with the model's chat
        template, or `chat_template` (Jinja source), and generate a reply. `continue_final_message`
        continues the last message instead of starting a new turn (set add_generation_prompt=False)."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        if not conversations:
            raise ValueError("chat() needs at least one message")
        prompts = [self.engine.tokenize_chat(list(conv), add_generation_prompt, chat_template, continue_final_message)
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are produced. Text that may be the
        start of a stop string is held back until the next tokens show it is not (the engine cuts a
        matched stop string out), so the pieces always add up to the final text."""
        [request_id] = self._add([(prompt, sampling_params or SamplingParams(), 0)], OutputKind.DELTA)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        if out.outputs[0].text:
                            yield out.outputs[0].text
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    # ---- prefix cache ---------------------------------------------------------------------------

    def pin_prefix(self, prompt: str | Seq[int], cache_salt: str | None = None) -> PinHandle:
        """Keep the full blocks of `prompt` (text or token ids) cached under any memory pressure
        until `unpin(handle)`: the "system prompt cache". Prefills the prompt first if its blocks
        are not all cached. Only whole blocks are pinned (`handle.num_tokens`); requests with the
        same prefix and salt then skip them. Raises ValueError, keeping nothing: prefix caching
        off, a prompt shorter than one block, or pins over `max_pinned_fraction` of the pool."""
        engine = self.engine
        _, ids = engine.tokenize(_as_prompt(prompt))
        if not engine.cache.enable_prefix_caching:
            raise ValueError("cannot pin a prefix: prefix caching is disabled (enable_prefix_caching=False)")
        whole = len(ids) // engine.cache.block_size * engine.cache.block_size
        if whole == 0:
            raise ValueError(f"cannot pin a prefix of {len(ids)} tokens: it fills no block "
                             f"(block_size={engine.cache.block_size})")
        if whole > engine.cache.pin_budget * engine.cache.block_size:
            raise ValueError(f"cannot pin {whole // engine.cache.block_size} blocks: the pin budget is "
                             f"{engine.cache.pin_budget} blocks (max_pinned_fraction of the pool)")
        if engine.cached_prefix(ids, cache_salt).num_tokens < whole:
            self.generate({"prompt_token_ids": ids, "cache_salt": cache_salt}, SamplingParams(max_tokens=1),
                          use_tqdm=False)
        return engine.pin_cached_prefix(ids, cache_salt)

    def unpin(self, handle: PinHandle) -> None:
        """Release a pin; its blocks stay cached until evicted. A second unpin is a no-op."""
        self.engine.cache.unpin(handle)

    def reset_prefix_cache(self) -> None:
        """Drop every cached block. Raises ValueError while any block is in use (a running request
        or a pin)."""
        self.engine.cache.reset_prefix_cache()

    def take_events(self) -> list[KVEvent]:
        """KV events (BlockStored, BlockRemoved, AllBlocksCleared) since the last call, oldest first."""
        return self.engine.cache.take_events()

    # ---- chunks ---------------------------------------------------------------------------------

    def register_chunk(self, text_or_token_ids: str | Seq[int], kind: str = "context",
                       chunk_id: str | None = None) -> Chunk:
        """Prefill a document chunk once (keys at positions 0..n-1) and keep its KV in chunk pages
        until `unregister_chunk`. `kind` is "system" (cascade level 0, placed first) or "context"
        (level 1). See `LLMEngine.register_chunk` for the errors."""
        return self.engine.register_chunk(_as_prompt(text_or_token_ids), kind, chunk_id)

    def unregister_chunk(self, chunk_id: str) -> None:
        """Free a chunk's pages; refused (ValueError) while a request uses it."""
        self.engine.unregister_chunk(chunk_id)

    def list_chunks(self) -> list[Chunk]:
        return self.engine.list_chunks()

    def generate_from_chunks(self, chunk_ids: Seq[str | Chunk], query: str | Seq[int],
                             sampling_params: SamplingParams | None = None, recompute_ratio: float = 0.15,
                             recompute_rule: str = "first") -> RequestOutput:
        """Generate from the prompt `chunks..., query`, reusing the chunks' KV at their offsets and
        feeding only the query (and the recomputed fraction of the chunks) through the model.
        `recompute_ratio` 0 is pure reuse, 1 recomputes every chunk after the first (a full
        prefill). Returns a RequestOutput like `generate`."""
        request_id = str(next(self._ids))
        self.engine.add_chunk_request(request_id, list(chunk_ids), _as_prompt(query),
                                      _with_kind(sampling_params or SamplingParams(), OutputKind.FINAL_ONLY),
                                      recompute_ratio, recompute_rule)
        return self._wait([request_id], use_tqdm=False)[0]

    def fork(self, output: RequestOutput, n: int = 2, sampling_params: SamplingParams | None = None,
             at: int | None = None, index: int = 0) -> RequestOutput:
        """Continue a finished generation `n` ways ("regenerate from here"): the context is `output`'s
        prompt followed by the first `at` tokens (all by default) of its completion `index`, and each
        continuation is generated from it with `sampling_params` (n set to `n`). The continuations share
        the context's KV: its full blocks through the prefix cache (computed by `output`'s request, if
        still cached, so only the context's last, partly filled block is computed again) and that last
        block by forking (`KVCacheManager.fork`: copied once per continuation). Returns one
        RequestOutput whose `prompt_token_ids` is the context and whose `n` completions are the tokens
        after it. ValueError for an `at` or `index` outside `output`."""
        if not 0 <= index < len(output.outputs):
            raise ValueError(f"index {index} names no completion of the output (it has {len(output.outputs)})")
        generated = list(output.outputs[index].token_ids)
        if at is not None and (isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= len(generated)):
            raise ValueError(f"at must be a token count in [0, {len(generated)}], got {at!r}")
        params = dataclasses.replace(sampling_params or SamplingParams(), n=n)
        context = list(output.prompt_token_ids) + generated[:at]
        return self.generate({"prompt_token_ids": context}, params, use_tqdm=False)[0]

    # ---- tiers and saved caches ------------------------------------------------------------------

    def save_cache(self, path: str) -> SavedCache:
        """Write the cached prefixes, pins and registered chunks to the directory `path` (created if
        missing), to be restored by `LLM(..., load_cache=path)`. Incremental: blocks the directory holds
        already are not written again. See `LLMEngine.save_cache`."""
        return self.engine.save_cache(path)

    def close(self) -> None:
        """Write cached blocks back to the kv_tiers and stop their threads (`LLMEngine.close`)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- visibility -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def dump_stats(self) -> str:
        return self.engine.cache.dump_stats()

    def _add(self, requests, kind: OutputKind = OutputKind.FINAL_ONLY) -> list[str]:
        """Add every (prompt, params, priority) request (all or none), with outputs of `kind`."""
        ids: list[str] = []
        try:
            for prompt, params, priority in requests:
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, _with_kind(params, kind), priority)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids

    def _wait(self, ids: list[str], use_tqdm: bool | Callable[..., tqdm]) -> list[RequestOutput]:
        """Step until the requests `ids` finish, with a progress bar (see `generate`); abort them if
        interrupted."""
        final: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = None
        if use_tqdm:
            bar = (use_tqdm if callable(use_tqdm) else tqdm)(
                total=len(ids), desc="Processed prompts", dynamic_ncols=True,
                postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        start, tokens_in, tokens_out = time.perf_counter(), 0, 0
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        if bar is not None:
                            tokens_in += len(out.prompt_token_ids)
                            tokens_out += sum(len(c.token_ids) for c in out.outputs)
                            elapsed = time.perf_counter() - start
                            bar.postfix = (f"est. speed input: {tokens_in / elapsed:.2f} toks/s, "
                                           f"output: {tokens_out / elapsed:.2f} toks/s")
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for request_id in ids:
                if request_id not in final:
                    self.engine.abort_request(request_id)
        return [final[i] for i in ids]


def _per_prompt(value, single: type | None, n: int, what: str) -> list:
    """`value` for each of `n` prompts: one `single` given for all, or a list of exactly n."""
    if single is not None and isinstance(value, single):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} {what} for {n} prompts; give one for all or one per prompt")
    return values


def _with_kind(params: SamplingParams | None, kind: OutputKind) -> SamplingParams | None:
    """`params` with outputs of `kind` (anything else is passed on for the engine to refuse)."""
    return dataclasses.replace(params, output_kind=kind) if isinstance(params, SamplingParams) else params


def _as_prompt(text_or_token_ids: str | Seq[int]) -> PromptType:
    return text_or_token_ids if isinstance(text_or_token_ids, str) else {"prompt_token_ids": list(text_or_token_ids)}
