"""The attention and KV-store ops as `torch.library` custom ops, and the kernel backend per device.

`kvforge::store_kv`, `kvforge::rope_store_kv` and `kvforge::paged_attention` mutate only the tensors
they are handed (the arena, the output buffers) and have fake implementations, so a model that calls
them can be traced by `torch.compile` and captured in CUDA graphs. Each dispatches on its tensors'
device: CUDA tensors go to the Triton kernels (`kvforge.ops.triton`), everything else to the torch
references (`kvforge.ops`), which have the same signatures.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "triton")


@functools.cache
def backend(name: str) -> ModuleType:
    """The module holding one backend's ops (`store_kv`, `paged_attention`, `chunk_attention`,
    `merge_attention_states`, `rms_norm`, `add_rms_norm`, `silu_and_mul`, ...), by name."""
    if name == "torch":
        import kvforge.ops as module
    elif name == "cpu":
        import kvforge.ops.cpu as module
    elif name == "triton":
        import kvforge.ops.triton as module
    else:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    return module


@functools.cache
def backend_for(device: torch.device) -> ModuleType:
    """Triton on CUDA devices; on the CPU the native kernels (`kvforge.ops.cpu`) where they are built
    and not turned off, else the torch references. Never falls back silently: on a CUDA device without
    Triton this raises ImportError, and a failed native build logs a warning. Cached per device: the
    model asks on every call."""
    if device.type == "cuda":
        return backend("triton")
    if device.type == "cpu" and backend("cpu").available():
        return backend("cpu")
    return backend("torch")


@torch.library.custom_op("kvforge::store_kv", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """`ops.store_kv`: write `k`, `v` `[T, kv_heads, D]` at `slot_mapping` `[T]` (slot -1 skipped),
    quantized with their scales into quantized pages (`k_scale`, `v_scale`: ops/quant.py, mutated)."""
    backend_for(k_cache.device).store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@store_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    return None


@torch.library.custom_op("kvforge::rope_store_kv", mutates_args=("k_cache", "v_cache"))
def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`ops.rope_store_kv`: rotate `q` and `k`, store the keys and `v` into plain pages; the rotated `q`."""
    return backend_for(q.device).rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


@rope_store_kv.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("kvforge::paged_attention", mutates_args=("out", "lse"))
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_query_lens: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                    lse: torch.Tensor, max_query_len: int, num_splits: int, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, rope_table: torch.Tensor | None = None) -> None:
    """`ops.paged_attention` over a packed batch of prefills and decodes; writes `out` `[T, H, D]`
    and `lse` `[T, H]` (float32). Quantized pages are read with `k_scale`, `v_scale` (ops/quant.py),
    int4 keys rotated to their positions with `rope_table`."""
    backend_for(q.device).paged_attention(q, k_cache, v_cache, cu_query_lens, seq_lens, block_tables, scale,
                                          out, lse, max_query_len, num_splits, k_scale, v_scale, rope_table)


@paged_attention.register_fake
def _(q, k_cache, v_cache, cu_query_lens, seq_lens, block_tables, scale, out, lse, max_query_len,
      num_splits, k_scale=None, v_scale=None, rope_table=None) -> None:
    return None
