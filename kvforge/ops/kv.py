"""Writing new K/V into the paged arena and gathering a sequence's K/V back out of it.

Arena layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`; a flat slot is
`block_id * block_size + offset`.
"""

from __future__ import annotations

import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write `k`, `v` `[T, kv_heads, head_dim]` into the arena at `slot_mapping` `[T]` (in place),
    cast to the cache's dtype. A negative slot (a padding row, e.g. in a CUDA graph) is skipped.

    CPU reference: the check for negative slots reads the mapping on the host.
    """
    num_blocks, block_size, heads, dim = k_cache.shape
    if (slot_mapping < 0).any():
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slot_mapping = slot_mapping.long()  # index_copy_ takes int64 indices only; a no-op for int64
    k_cache.view(num_blocks * block_size, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Gather whole blocks: `block_tables` `[B, nb]` -> `[B, kv_heads, nb * block_size, head_dim]`.

    Returns a copy (views of the arena cannot express a block table). Entries past a sequence's
    length are whatever the padding block holds: the caller masks them.
    """
    batch, nb = block_tables.shape
    _, block_size, heads, dim = cache.shape
    blocks = cache.index_select(0, block_tables.reshape(-1))
    return blocks.view(batch, nb * block_size, heads, dim).transpose(1, 2)


def gather_seq_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` positions through its `block_table` `[nb]`:
    `[length, kv_heads, head_dim]` (a copy)."""
    return gather_kv(cache, block_table[None])[0, :, :length].transpose(0, 1)
