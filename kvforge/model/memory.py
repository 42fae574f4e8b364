"""Sizing the KV arena on a GPU, like vLLM: what is left of `gpu_memory_utilization` of the device
once the weights, the activations of the largest step and the memory torch does not manage are
taken out.

    budget = gpu_memory_utilization * total
             - weights           torch.cuda.memory_allocated() once the model is loaded (anything
                                 else this process already holds on the device counts here too)
             - peak_activation   the most torch allocated, beyond that, during one profiling forward
                                 of the largest step (`profile_peak_memory`), scratch KV excluded
             - non_torch         device memory in use that torch's allocator does not hold
                                 (total - free - torch.cuda.memory_reserved(), after the forward):
                                 the CUDA context, library workspaces, and other processes on the
                                 device (counted against us: the arena never takes their memory)
             - reserved          what the caller allocates after the arena (a draft model's own
                                 KV arena of a fixed size)
    num_blocks = budget // bytes_per_block

The profiling forward runs through the public `ModelRunner.run` only, so it measures what a real
step allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.config import CacheConfig, SchedulerConfig, ceil_div
from kvforge.model.llama import LlamaForCausalLM
from kvforge.model.runner import ModelRunner, TokenRun


@dataclass(frozen=True)
class MemoryProfile:
    """What sizing the arena on a GPU measured and decided, in bytes (see the module's formula).
    `kv_cache_bytes` is the arena allocated: `num_blocks` whole blocks, at most the budget."""

    total_bytes: int
    gpu_memory_utilization: float
    weights_bytes: int
    peak_activation_bytes: int
    non_torch_bytes: int
    kv_cache_bytes: int
    num_blocks: int


def profile_peak_memory(model: LlamaForCausalLM, block_size: int, num_tokens: int, num_seqs: int) -> int:
    """Run one forward of `num_tokens` tokens spread over `min(num_seqs, num_tokens)` sequences
    (prefills from position 0, token ids 0, 1, ..., logits for every sequence, as the largest step the
    scheduler can build) through a scratch arena just big enough for it, and return the most bytes
    torch allocated on the model's device during the forward beyond what it held when the forward
    began (the scratch arena is allocated before, so it does not count). Returns 0 on a device
    whose allocator torch does not track (the CPU): the forward still runs. The model's weights are
    unchanged; the scratch arena is freed before returning."""
    if num_tokens <= 0 or num_seqs <= 0 or block_size <= 0:
        raise ValueError(f"profiling needs positive sizes, got num_tokens={num_tokens}, num_seqs={num_seqs}, "
                         f"block_size={block_size}")
    cfg = model.cfg
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    num_seqs = min(num_seqs, num_tokens)
    lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    runs, next_block = [], 0
    for n in lengths:
        blocks = list(range(next_block, next_block + ceil_div(n, block_size)))
        next_block += len(blocks)
        slots = [blocks[j // block_size] * block_size + j % block_size for j in range(n)]
        runs.append(TokenRun([j % cfg.vocab_size for j in range(n)], 0, slots, blocks, True))
    shape = (next_block, block_size, cfg.num_kv_heads, cfg.head_dim)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
    tracked = device.type == "cuda"
    if tracked:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    logits = ModelRunner(model, k, v, block_size).run(runs)
    if tracked:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    del logits, k, v
    return peak if tracked else 0


def plan_kv_cache(model: LlamaForCausalLM | None, cache: CacheConfig, scheduler: SchedulerConfig,
                  bytes_per_block: int, reserved_bytes: int = 0) -> tuple[int, MemoryProfile | None]:
    """(num_blocks, profile) of the arena for `model` where it lives.

    `num_blocks` or `kv_cache_memory` given, a CPU model, or no model built (None: `kvforge info` off
    the GPU): `cache.resolve_num_blocks`, no profile.
    Else (a GPU): profile one forward of `scheduler.max_num_batched_tokens` tokens over up to
    `scheduler.max_num_seqs` sequences and size the arena by the module's formula, leaving
    `reserved_bytes` of the budget for what the caller allocates afterwards; call it after the
    weights (every model's: a draft model's too) are loaded and before anything else is allocated on
    the device. Empties torch's CUDA cache
    and resets its peak statistics. Raises ValueError saying how much is missing when the budget holds
    no block.
    """
    device = None if model is None else model.embed_tokens.weight.device
    if cache.sized_explicitly or device is None or device.type != "cuda":
        return cache.resolve_num_blocks(bytes_per_block), None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device)
    peak = profile_peak_memory(model, cache.block_size, scheduler.max_num_batched_tokens, scheduler.max_num_seqs)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    util = cache.gpu_memory_utilization
    budget = int(total * util) - weights - peak - non_torch - reserved_bytes
    if budget < bytes_per_block:
        gib = 1 << 30
        raise ValueError(
            f"no room for the KV cache on {device}: gpu_memory_utilization={util} of {total / gib:.2f} GiB "
            f"is {total * util / gib:.2f} GiB, and the weights take {weights / gib:.2f} GiB, the activations "
            f"of the largest step (max_num_batched_tokens={scheduler.max_num_batched_tokens}) "
            f"{peak / gib:.2f} GiB, memory outside torch {non_torch / gib:.2f} GiB, reserved beside the arena "
            f"{reserved_bytes / gib:.2f} GiB; one KV block needs "
            f"{bytes_per_block} bytes, {bytes_per_block - budget} bytes ({(bytes_per_block - budget) / gib:.2f} "
            f"GiB) are missing. Raise gpu_memory_utilization, lower max_num_batched_tokens, or set "
            f"kv_cache_memory / num_blocks")
    num_blocks = budget // bytes_per_block
    return num_blocks, MemoryProfile(total, util, weights, peak, non_torch, num_blocks * bytes_per_block, num_blocks)
