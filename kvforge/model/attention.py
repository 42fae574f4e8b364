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
class ChunkSegment:
    """A registered chunk's pages, read at `offset`: keys stored at 0..num_tokens-1 are re-rotated
    by `offset` as they are read. The same `key` (chunk id, offset) is read once per layer per step
    however many sequences use it."""

    key: tuple[str, int]
    level: int  # 0 system, 1 context
    block_table: torch.Tensor  # [nb] the chunk's pages
    num_tokens: int
    offset: int


@dataclass(frozen=True)
class ComposedSpan:
    """Rows [start, start + num_tokens) of one sequence composed from chunks (its query, recomputed
    chunk tokens or its newest generated token). Cascade: each row attends to the level-0 and
    level-1 chunk segments and to the sequence's private K/V (level 2), merged by log-sum-exp.
    A chunk key is hidden where the request recomputed it or where it lies after the row's
    position; private keys are causal by position. Rows are in position order, so the rows that
    see any key of a segment are a suffix: segment i is attended by rows segment_rows[i]: only,
    with the additive bias segment_bias[i] (0 visible, -inf hidden; None when all are visible)."""

    start: int
    num_tokens: int
    segments: tuple[ChunkSegment, ...]
    segment_rows: tuple[int, ...]  # per segment: the first row that sees one of its keys
    segment_bias: tuple[torch.Tensor | None, ...]  # per segment [num_tokens - rows, segment.num_tokens]
    private_table: torch.Tensor  # [nb] the sequence's own blocks
    private_bias: torch.Tensor | None  # [num_tokens, private_len], None when every row sees every key
    private_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's K/V go and what each query attends to.

    Packed rows: the decode groups first (one token per sequence), then the prefill spans, then the
    composed spans.
    """

    slot_mapping: torch.Tensor  # [T] flat arena slot of each new token
    decodes: tuple[DecodeGroup, ...]
    prefills: tuple[PrefillSpan, ...]
    composed: tuple[ComposedSpan, ...] = ()


@dataclass(frozen=True)
class ForwardContext:
    metadata: AttentionMetadata
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    inv_freq: torch.Tensor | None = None  # RoPE frequencies, to re-rotate chunk keys


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
            seq_k = ops.gather_seq_kv(k_cache, span.block_table, total)
            seq_v = ops.gather_seq_kv(v_cache, span.block_table, total)
        parts.append(ops.prefill_attention(q[rows], seq_k, seq_v, span.context_len, scale))
    if meta.composed:
        parts.append(_cascade_attention(meta.composed, q, k_cache, v_cache, ctx.inv_freq, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _cascade_attention(spans: tuple[ComposedSpan, ...], q: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of every composed span's rows, level by level (see ComposedSpan): chunk pages are
    gathered and re-rotated once per (chunk, offset); level 0 is one call over the rows of all spans
    that share the same system chunk; level 1 is one call per span and context segment, over the
    rows that see it; level 2 one call per span. Returns the rows in span order."""
    segment_kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for span in spans:
        for seg, row in zip(span.segments, span.segment_rows):
            if row < span.num_tokens and seg.key not in segment_kv:
                k = ops.gather_seq_kv(k_cache, seg.block_table, seg.num_tokens)
                k = ops.rerotate_keys(k, seg.offset, inv_freq) if seg.offset else k
                segment_kv[seg.key] = (k, ops.gather_seq_kv(v_cache, seg.block_table, seg.num_tokens))
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in spans]

    def add_part(i: int, row: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """A partial result for rows [row:] of span i; the rows before see none of its keys."""
        if row:
            out = torch.cat([out.new_zeros(row, *out.shape[1:]), out])
            lse = torch.cat([lse.new_full((row, lse.shape[1]), float("-inf")), lse])
        parts[i].append((out, lse))

    # Level 0 (one call per system chunk over the rows of every span that shares it), then each
    # span's context segments, each over only the rows that see it.
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    calls: list[tuple[tuple[str, int], list[tuple[int, int]]]] = []
    for i, span in enumerate(spans):
        for j, seg in enumerate(span.segments):
            if span.segment_rows[j] == span.num_tokens:
                continue  # no row of this step sees it yet
            if seg.level == 0:
                groups.setdefault(seg.key, []).append((i, j))
            else:
                calls.append((seg.key, [(i, j)]))
    for key, members in [*groups.items(), *calls]:
        k, v = segment_kv[key]
        rows = [q[spans[i].start + spans[i].segment_rows[j]:spans[i].start + spans[i].num_tokens]
                for i, j in members]
        biases = [spans[i].segment_bias[j] for i, j in members]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else r.new_zeros(r.shape[0], k.shape[0], dtype=torch.float32)
             for r, b in zip(rows, biases)])
        out, lse = ops.attention_with_lse(rows[0] if len(rows) == 1 else torch.cat(rows), k, v, bias, scale)
        at = 0
        for (i, j), r in zip(members, rows):
            add_part(i, spans[i].segment_rows[j], out[at:at + r.shape[0]], lse[at:at + r.shape[0]])
            at += r.shape[0]
    for i, span in enumerate(spans):
        rows = q[span.start:span.start + span.num_tokens]
        k = ops.gather_seq_kv(k_cache, span.private_table, span.private_len)
        v = ops.gather_seq_kv(v_cache, span.private_table, span.private_len)
        parts[i].append(ops.attention_with_lse(rows, k, v, span.private_bias, scale))
    return torch.cat([ops.merge_attention_states(p)[0] for p in parts]).to(q.dtype)
