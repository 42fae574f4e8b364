"""Per-step attention metadata (prepared once per step) and the paged attention layer.

The runner builds one `AttentionMetadata` per step and enters `forward_context(...)`; every layer
reads it from there. Contexts do not nest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvforge import ops


@dataclass(frozen=True)
class PrefillSpan:
    """A run of new tokens of one sequence in the packed batch: rows [start, start + num_tokens)."""

    start: int
    num_tokens: int
    context_len: int  # tokens of this sequence already in the cache before this step
    block_table: torch.Tensor  # [nb] covering context_len + num_tokens positions


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows [start, start + count), one token per sequence, of similar K/V lengths: their block
    tables are padded to the group's longest only."""

    start: int
    count: int
    block_tables: torch.Tensor  # [count, nb], padded with a valid block id
    kv_bias: torch.Tensor  # [count, nb * block_size] additive: 0 on the sequence's positions, -inf past them


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's K/V go and what each query attends to.

    Packed rows: the decode groups first (one token per sequence), then the prefill spans.
    """

    slot_mapping: torch.Tensor  # [T] flat arena slot of each new token
    decodes: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillSpan, ...]


@dataclass(frozen=True)
class ForwardContext:
    metadata: AttentionMetadata
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]


_context: ForwardContext | None = None


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` visible to the attention layers for one forward pass."""
    global _context
    if _context is not None:
        raise RuntimeError("forward_context is already active: forward passes do not nest")
    _context = ctx
    try:
        yield ctx
    finally:
        _context = None


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Store this step's `k`, `v` `[T, kv_heads, D]` for `layer` and attend with `q` `[T, heads, D]`."""
    ctx = _context
    if ctx is None:
        raise RuntimeError("paged_attention called outside forward_context")
    meta = ctx.metadata
    k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
    ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    parts = []
    for group in meta.decodes:
        rows = slice(group.start, group.start + group.count)
        parts.append(ops.decode_attention(q[rows], k_cache, v_cache, group.block_tables, group.kv_bias, scale))
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        if span.context_len == 0:
            # The whole K/V is this step's: attend to it directly, no gather from the arena.
            seq_k, seq_v = k[rows], v[rows]
        else:
            total = span.context_len + span.num_tokens
            seq_k = ops.gather_kv(k_cache, span.block_table[None])[0, :, :total].transpose(0, 1)
            seq_v = ops.gather_kv(v_cache, span.block_table[None])[0, :, :total].transpose(0, 1)
        parts.append(ops.prefill_attention(q[rows], seq_k, seq_v, span.context_len, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
