"""Writing new K/V into the paged arena and gathering a sequence's K/V back out of it.

Arena layout per layer: `[num_blocks, block_size, num_kv_heads, data_dim]`; a flat slot is
`block_id * block_size + offset`. Quantized pages come with a scale tensor each (ops/quant.py):
K/V are quantized as they are stored and dequantized as they are gathered.
"""

from __future__ import annotations

import torch

from kvforge.ops.linear import rms_norm_linear
from kvforge.ops.quant import (
    dequantize_blocks,
    dequantize_channels,
    format_of,
    keys_before_rope,
    quantize_channels,
    quantize_rows,
    rope_keys,
)
from kvforge.ops.rope import apply_rope


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write `k`, `v` `[T, kv_heads, head_dim]` into the arena at `slot_mapping` `[T]` (in place),
    cast to the cache's dtype, or quantized into it with `k_scale` / `v_scale` (ops/quant.py; both
    or neither; int4 pages take keys before RoPE and Hadamard-rotated values). A negative slot
    (a padding row, e.g. in a CUDA graph) is skipped.

    The new tokens of one block are written in position order after the ones it already holds
    (int4 keys are quantized per block over its tokens so far: positions at or past the step's
    last new one in a block are not part of it).

    CPU reference: the check for negative slots reads the mapping on the host.
    """
    _, _, heads, width = k_cache.shape
    if (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slot_mapping = slot_mapping.long()  # index_copy_ takes int64 indices only; a no-op for int64
    if k_scale is None:
        k_cache.view(-1, heads, width).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, heads, width).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    if slot_mapping.numel() == 0:
        return
    kv_format = format_of(k_cache, k_scale)
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if scale.dim() == 4:  # int4 keys: per block and channel
            _store_channel_blocks(x, cache, scale, slot_mapping)
            continue
        data, row_scale = quantize_rows(x, kv_format)
        # Through a byte view: index_copy_ has no float8 kernel on the CPU.
        cache.view(torch.uint8).view(-1, heads, width).index_copy_(0, slot_mapping, data.view(torch.uint8))
        scale.view(-1, heads).index_copy_(0, slot_mapping, row_scale)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The attention layer's RoPE and K/V write in one op, for plain (unquantized) pages: `q`
    `[T, heads, D]` and `k` `[T, kv_heads, D]` rotated by `cos`, `sin` `[T, D/2]` (`apply_rope`), the
    rotated keys and `v` stored at `slot_mapping` (`store_kv`: -1 skipped). Returns the rotated `q`
    (new); `q`, `k` and `v` are not modified."""
    store_kv(apply_rope(k, cos, sin), v, k_cache, v_cache, slot_mapping)
    return apply_rope(q, cos, sin)


def split_qkv(qkv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused q/k/v projection's output `[T, (H + 2K) * D]` as views q `[T, H, D]`, k and v `[T, K, D]`."""
    t, kv_size = qkv.shape[0], (qkv.shape[1] - num_heads * head_dim) // 2
    q, k, v = qkv.split([num_heads * head_dim, kv_size, kv_size], dim=-1)
    return q.view(t, num_heads, head_dim), k.view(t, -1, head_dim), v.view(t, -1, head_dim)


def qkv_rope_store_kv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention layer's input side in one op, for plain pages: the fused q/k/v projection `weight`
    `[(H + 2K) * D, hidden]` (+ `bias`) of the normalized residual stream (`rms_norm_linear`), split
    into heads of D = 2 * cos.shape[1], then `rope_store_kv`. Returns (the rotated q `[T, H, D]`, new;
    the stream `x + residual`, `x` itself without a `residual`). Writes only the pages."""
    qkv, total = rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
    q, k, v = split_qkv(qkv, num_heads, 2 * cos.shape[1])
    return rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), total


def _store_channel_blocks(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor) -> None:
    """int4 keys: re-quantize every block the new rows land in over its tokens so far (its earlier
    ones dequantized, then the new ones), per channel."""
    block_size = cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    touched, which = torch.unique(blocks, return_inverse=True)
    end = torch.zeros(touched.shape[0], dtype=torch.long).scatter_reduce_(0, which, offsets + 1, "amax")
    values = dequantize_channels(cache.index_select(0, touched), scale.index_select(0, touched))
    values[which, offsets] = x.float()
    valid = torch.arange(block_size)[None, :] < end[:, None]
    codes, block_scale = quantize_channels(values, valid)
    cache.index_copy_(0, touched, codes)
    scale.index_copy_(0, touched, block_scale)


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, scale: torch.Tensor | None = None,
              rope_table: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Gather whole blocks: `block_tables` `[B, nb]` -> `[B, kv_heads, nb * block_size, head_dim]`
    (dequantized to float32 with `scale`). int4 key pages hold keys before RoPE (ops/quant.py):
    they are rotated to their positions, start + 0 .. nb * block_size - 1 along the table, with
    `rope_table` (`kvforge.ops.rope.rope_table`; required for them, ignored otherwise).

    Returns a copy (views of the arena cannot express a block table). Entries past a sequence's
    length are whatever the padding block holds: the caller masks them.
    """
    batch, nb = block_tables.shape
    blocks = dequantize_blocks(cache, scale, block_tables.reshape(-1))
    _, block_size, heads, dim = blocks.shape
    seqs = blocks.view(batch, nb * block_size, heads, dim)
    if keys_before_rope(scale):
        if rope_table is None:
            raise ValueError("int4 key pages hold keys before RoPE: reading them needs a rope_table")
        seqs = rope_keys(seqs, rope_table, start)
    return seqs.transpose(1, 2)


def gather_seq_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: torch.Tensor | None = None,
                  rope_table: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """One sequence's first `length` positions through its `block_table` `[nb]`:
    `[length, kv_heads, head_dim]` (a copy; dequantized to float32 with `scale`, int4 keys rotated
    to positions start.. with `rope_table`, as `gather_kv`)."""
    return gather_kv(cache, block_table[None], scale, rope_table, start)[0, :, :length].transpose(0, 1)
