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
from kvforge.ops import library as ops_library  # registers the kvforge:: custom ops


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
    seq_lens: torch.Tensor  # [count] K/V positions of each sequence, this step's token included


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
class VarlenBatch:
    """Sequences whose rows attend through the unified paged-attention kernel (the GPU path): the
    rows of sequence b are `cu_query_lens[b]:cu_query_lens[b + 1]` (relative to the batch's first
    row), its newest tokens among `seq_lens[b]` positions, causal; its K/V are read through
    `block_tables[b]` inside the kernel. Rows past `cu_query_lens[-1]` are padding (CUDA graphs)."""

    cu_query_lens: torch.Tensor  # [B + 1] int32, on the device
    seq_lens: torch.Tensor  # [B] int32: K/V positions of each sequence, this step's included
    block_tables: torch.Tensor  # [B, nb] int32
    max_query_len: int
    num_splits: int  # key splits per sequence (split-K decode); 1 for none


@dataclass(frozen=True)
class CascadeCall:
    """One chunk attention of a step: the rows `rows` (absolute rows of the packed batch) of the
    composed spans that see `segment` attend to it once, with `bias` `[len(rows), segment.num_tokens]`
    (None when every key is visible). `members` are the (span, segment) index pairs it serves, in
    row order."""

    segment: ChunkSegment
    members: tuple[tuple[int, int], ...]
    rows: torch.Tensor  # [n] long, on the device
    bias: torch.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's K/V go and what each query attends to.

    Packed rows: the plain rows first (on CPU: the decode groups, then the prefill spans; on GPU: one
    `varlen` batch of both), then the composed spans. On GPU, `cascade` lists the step's chunk
    attentions and `private` is the composed spans' own K/V as a varlen batch over their rows; a
    cascade graph has no composed spans but `segments` (see the field).
    """

    slot_mapping: torch.Tensor  # [T] flat arena slot of each new token (-1: padding, not stored)
    decodes: tuple[DecodeGroup, ...] = ()
    prefills: tuple[PrefillSpan, ...] = ()
    composed: tuple[ComposedSpan, ...] = ()
    varlen: VarlenBatch | None = None
    num_varlen_rows: int = 0  # rows of `varlen` (padding rows included)
    cascade: tuple[CascadeCall, ...] = ()
    private: VarlenBatch | None = None
    # A cascade graph's step, or an eager GPU step with composed rows: `varlen` holds every row's own
    # K/V (a composed sequence's private K/V), `segments` the chunk segments its composed rows read,
    # merged into the output.
    segments: ops.SegmentBatch | None = None


@dataclass(frozen=True)
class ForwardContext:
    metadata: AttentionMetadata
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    inv_freq: torch.Tensor | None = None  # RoPE frequencies, to re-rotate chunk keys
    k_scales: list[torch.Tensor | None] | None = None  # quantized pages' scales per layer (ops/quant.py)
    v_scales: list[torch.Tensor | None] | None = None
    # int4 pages (ops/quant.py): the rope table their keys, stored before RoPE, are rotated with as
    # they are read ([max positions, D] float32), and their values stored Hadamard-transformed.
    rope_table: torch.Tensor | None = None
    rotate_values: bool = False

    def scales(self, layer: int) -> dict[str, torch.Tensor]:
        """`layer`'s scales as the ops' keyword arguments: empty for unquantized pages."""
        if self.k_scales is None or self.k_scales[layer] is None:
            return {}
        return {"k_scale": self.k_scales[layer], "v_scale": self.v_scales[layer]}


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


def paged_attention(layer: int, x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module,
                    qkv_proj: torch.nn.Module, num_heads: int, scale: float, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention layer from the residual stream `x + residual` (`x` alone without a residual):
    `norm` (an RMSNorm: `weight`, `eps`) and the fused q/k/v projection `qkv_proj` (a Linear:
    `weight`, `bias`, `packed`) give q `[T, heads, D]` and k, v `[T, kv_heads, D]`; q and k are
    rotated by `cos`, `sin` `[T, D/2]`, this step's K/V stored for `layer`, and q attends. Returns
    (the attention output `[T, heads, D]`, the stream `x + residual`).

    int4 pages keep keys before RoPE (their readers rotate each key to its position) and values
    rotated by a Hadamard matrix (ops/quant.py): the values are rotated as they are stored and the
    attention output is rotated back here. On the GPU, plain pages take the projection, the rotations
    and the store in one op (`qkv_rope_store_kv`: one kernel for one row, the decode step at batch 1)."""
    ctx = _context
    if ctx is None:
        raise RuntimeError("paged_attention called outside forward_context")
    meta, quant = ctx.metadata, ctx.scales(layer)
    kernels = ops_library.backend_for(x.device)
    head_dim = 2 * cos.shape[1]
    k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
    if (meta.varlen is not None or meta.private is not None) and not quant:
        if torch.compiler.is_compiling():  # its graph sees the custom op that writes the pages
            qkv, residual = kernels.rms_norm_linear(x, residual, norm.weight, norm.eps, qkv_proj.weight,
                                                    qkv_proj.bias, qkv_proj.packed)
            q = torch.ops.kvforge.rope_store_kv(*ops.split_qkv(qkv, num_heads, head_dim), cos, sin, k_cache, v_cache,
                                                meta.slot_mapping)
        else:
            q, residual = kernels.qkv_rope_store_kv(x, residual, norm.weight, norm.eps, qkv_proj.weight,
                                                    qkv_proj.bias, num_heads, cos, sin, k_cache, v_cache,
                                                    meta.slot_mapping)
        return _attention_triton(meta, q, k_cache, v_cache, ctx.inv_freq, ctx.rope_table, scale, quant), residual
    qkv, residual = kernels.rms_norm_linear(x, residual, norm.weight, norm.eps, qkv_proj.weight, qkv_proj.bias,
                                            qkv_proj.packed)
    q, k, v = ops.split_qkv(qkv, num_heads, head_dim)
    q = kernels.apply_rope(q, cos, sin)
    if not ctx.rotate_values:
        return _attend(ctx, layer, q, kernels.apply_rope(k, cos, sin), v, scale), residual
    out = _attend(ctx, layer, q, k, ops.hadamard_transform(v), scale)
    return ops.hadamard_transform(out).to(q.dtype), residual


def _attend(ctx: ForwardContext, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scale: float) -> torch.Tensor:
    """`paged_attention` after the rotations: store `k`, `v` as the pages take them, attend."""
    meta = ctx.metadata
    k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
    quant = ctx.scales(layer)
    if meta.varlen is not None or meta.private is not None:
        _kernels().store_kv(k, v, k_cache, v_cache, meta.slot_mapping, **quant)
        return _attention_triton(meta, q, k_cache, v_cache, ctx.inv_freq, ctx.rope_table, scale, quant)
    kernels = ops_library.backend_for(q.device)
    kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, **quant)
    k_scale, v_scale = quant.get("k_scale"), quant.get("v_scale")
    parts = []
    for group in meta.decodes:
        rows = slice(group.start, group.start + group.count)
        parts.append(kernels.decode_attention(q[rows], k_cache, v_cache, group.block_tables, group.seq_lens,
                                              scale, **quant, rope_table=ctx.rope_table))
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        if span.context_len == 0 and not quant:
            # The whole K/V is this step's: attend to it directly, no gather from the arena. (Quantized
            # K/V are read back from the arena, so every token attends to what later steps will see.)
            seq_k, seq_v = k[rows], v[rows]
        else:
            total = span.context_len + span.num_tokens
            seq_k = ops.gather_seq_kv(k_cache, span.block_table, total, k_scale, ctx.rope_table)
            seq_v = ops.gather_seq_kv(v_cache, span.block_table, total, v_scale)
        parts.append(kernels.prefill_attention(q[rows], seq_k, seq_v, span.context_len, scale))
    if meta.composed:
        parts.append(_cascade_attention(meta, q, k_cache, v_cache, ctx.inv_freq, ctx.rope_table, scale, k_scale,
                                        v_scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _kernels():
    """The `kvforge::` custom ops while torch.compile traces (so its graph sees them), else the Triton
    kernels themselves: in eager mode (and so in CUDA graphs captured from it) the custom-op
    dispatch would cost ~0.1 ms of host time a call, more than the kernels at a short prefill."""
    return torch.ops.kvforge if torch.compiler.is_compiling() else ops_library.backend("triton")


def _attention_triton(meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      inv_freq: torch.Tensor, rope_table: torch.Tensor | None, scale: float,
                      quant: dict[str, torch.Tensor]) -> torch.Tensor:
    """The GPU path through the custom ops, once this step's K/V are stored: one unified kernel over
    the varlen rows (merged with the chunk segments of `meta.segments`: a cascade graph, or an
    eager step's composed rows), and the other composed rows level by level (their
    private K/V through the same kernel with log-sum-exp, each chunk once for every row that sees
    it, with its mask, merged in float32). `quant`: the
    layer's scales (ForwardContext.scales), quantized pages being dequantized inside the kernels."""
    kernels = _kernels()
    out = torch.empty_like(q)
    n = meta.num_varlen_rows
    if meta.varlen is not None:
        b = meta.varlen
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)[:n]
        own = out[:n] if meta.segments is None else torch.empty_like(q[:n])
        kernels.paged_attention(q[:n], k_cache, v_cache, b.cu_query_lens, b.seq_lens, b.block_tables,
                                scale, own, lse, b.max_query_len, b.num_splits, **quant, rope_table=rope_table)
        if meta.segments is not None:
            ops_library.backend("triton").segment_attention(q[:n], k_cache, v_cache, meta.segments, own, lse, scale,
                                                            out[:n], **quant, rope_table=rope_table)
    if meta.private is not None:
        triton = ops_library.backend("triton")
        b, qc = meta.private, q[n:]
        private_out = torch.empty_like(qc)
        acc_lse = qc.new_empty(qc.shape[:2], dtype=torch.float32)
        kernels.paged_attention(qc, k_cache, v_cache, b.cu_query_lens, b.seq_lens, b.block_tables,
                                scale, private_out, acc_lse, b.max_query_len, b.num_splits, **quant,
                                rope_table=rope_table)
        acc = private_out.float()
        for call in meta.cascade:
            seg = call.segment
            o, lse = triton.chunk_attention(qc.index_select(0, call.rows), k_cache, v_cache, seg.block_table,
                                             seg.num_tokens, seg.offset, inv_freq, call.bias, scale, **quant,
                                             rope_table=rope_table)
            o, lse = triton.merge_attention_states(
                [(acc.index_select(0, call.rows), acc_lse.index_select(0, call.rows)), (o, lse)])
            acc.index_copy_(0, call.rows, o)
            acc_lse.index_copy_(0, call.rows, lse)
        out[n:] = acc
    return out


def plan_cascade(spans: tuple[ComposedSpan, ...], device: torch.device) -> tuple[CascadeCall, ...]:
    """The step's chunk attentions (see CascadeCall): one per system chunk (level 0) over the rows
    of every span that shares it, one per span and context segment (level 1) over the rows that see
    it. Rows are counted from the first composed row. Built once per step, used by every layer."""
    firsts = []
    at = 0
    for span in spans:
        firsts.append(at)
        at += span.num_tokens
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    calls: list[list[tuple[int, int]]] = []
    for i, span in enumerate(spans):
        for j, seg in enumerate(span.segments):
            if span.segment_rows[j] == span.num_tokens:
                continue  # no row of this step sees it yet
            if seg.level == 0:
                groups.setdefault(seg.key, []).append((i, j))
            else:
                calls.append([(i, j)])
    plan = []
    for members in [*groups.values(), *calls]:
        rows: list[int] = []
        biases = []
        for i, j in members:
            span, first = spans[i], spans[i].segment_rows[j]
            rows.extend(range(firsts[i] + first, firsts[i] + span.num_tokens))
            biases.append((span.num_tokens - first, span.segment_bias[j]))
        seg = spans[members[0][0]].segments[members[0][1]]
        bias = None if all(b is None for _, b in biases) else torch.cat(
            [b if b is not None else torch.zeros(count, seg.num_tokens) for count, b in biases]).to(device)
        plan.append(CascadeCall(seg, tuple(members), torch.tensor(rows, dtype=torch.long, device=device), bias))
    return tuple(plan)


def _cascade_attention(meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       inv_freq: torch.Tensor, rope_table: torch.Tensor | None, scale: float,
                       k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    """The torch path of the composed spans' rows, level by level (see ComposedSpan and
    `plan_cascade`): chunk pages are gathered and re-rotated once per (chunk, offset) per layer;
    level 2 is one call per span. Returns the rows in span order."""
    spans = meta.composed
    qc = q[spans[0].start:]
    segment_kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in spans]
    for call in meta.cascade:
        seg = call.segment
        if seg.key not in segment_kv:
            k = ops.chunk_keys(k_cache, seg.block_table, seg.num_tokens, seg.offset, inv_freq, k_scale, rope_table)
            segment_kv[seg.key] = (k, ops.gather_seq_kv(v_cache, seg.block_table, seg.num_tokens, v_scale))
        k, v = segment_kv[seg.key]
        out, lse = ops.attention_with_lse(qc.index_select(0, call.rows), k, v, call.bias, scale)
        at = 0
        for i, j in call.members:
            row = spans[i].segment_rows[j]
            count = spans[i].num_tokens - row
            o, s = out[at:at + count], lse[at:at + count]
            if row:  # the rows before `row` see none of this segment's keys
                o = torch.cat([o.new_zeros(row, *o.shape[1:]), o])
                s = torch.cat([s.new_full((row, s.shape[1]), float("-inf")), s])
            parts[i].append((o, s))
            at += count
    for i, span in enumerate(spans):
        rows = q[span.start:span.start + span.num_tokens]
        k = ops.gather_seq_kv(k_cache, span.private_table, span.private_len, k_scale, rope_table)
        v = ops.gather_seq_kv(v_cache, span.private_table, span.private_len, v_scale)
        parts[i].append(ops.attention_with_lse(rows, k, v, span.private_bias, scale))
    return torch.cat([ops.merge_attention_states(p)[0] for p in parts]).to(q.dtype)
