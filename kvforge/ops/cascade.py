"""Cascade attention pieces, torch reference: attention over one key set that also returns each
query row's log-sum-exp, the merge of such partial results over disjoint key sets, and the
re-rotation of cached keys to a new position offset.

Attention over keys K = K_a ∪ K_b (disjoint) is recovered from the parts exactly:

    lse   = log(exp(lse_a) + exp(lse_b))
    out   = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

so a prompt whose KV lives at several levels (a shared system prompt, shared context chunks, each
request's own tokens) is attended level by level and merged (FlashInfer's cascade attention).
A query row that sees no key of a level gets out = 0 and lse = -inf there, which the merge ignores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kvforge.ops.kv import gather_seq_kv
from kvforge.ops.quant import keys_before_rope
from kvforge.ops.rope import apply_rope, rope_cos_sin

# Pairs (of one segment) a SegmentBatch work item covers at most: its query rows are the M side of
# the tensor-core tile, SEGMENT_TILE_PAIRS x the GQA group.
SEGMENT_TILE_PAIRS = 32


# PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp (an ATen op).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q` `[n, heads, D]` over `k`, `v` `[L, kv_heads, D]` (GQA: heads is a multiple of
    kv_heads), with an optional additive `bias` `[n, L]` (0 = visible, -inf = hidden).

    Returns (out `[n, heads, D]` in float32, lse `[n, heads]` float32: the log of the softmax
    denominator of each row; -inf, with out = 0, for a row that sees no key). Computed in float32,
    by the fused CPU kernel when PyTorch has it, else by `attention_with_lse_reference`.
    """
    if _FLASH_CPU is None or q.device.type != "cpu":
        return attention_with_lse_reference(q, k, v, bias, scale)
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # GQA without repeating K/V: the query heads of a group become that group's query rows.
    qg = q.float().view(n, kv_heads, group, dim).transpose(0, 1).reshape(1, kv_heads, n * group, dim)
    mask = None if bias is None else bias.float().repeat_interleave(group, dim=0)[None, None]
    out, lse = _FLASH_CPU(qg, k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None], 0.0, False,
                          attn_mask=mask, scale=scale)
    lse = lse[0].view(kv_heads, n, group).transpose(0, 1).reshape(n, heads)
    if bias is not None:  # the kernel reports lse 0 (and out 0) for a row that sees no key
        lse = lse.masked_fill(torch.isinf(bias).all(dim=-1)[:, None], float("-inf"))
    return out[0].view(kv_heads, n, group, dim).transpose(0, 1).reshape(n, heads, dim), lse


def attention_with_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` in plain torch operations: the oracle for the fused path."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.float().view(n, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads, n * group, dim)  # [K, n*G, D]
    kt = k.float().permute(1, 2, 0)  # [K, D, L]
    if bias is None:
        scores = torch.bmm(qg, kt).mul_(scale)  # [K, n*G, L], rows ordered (token, group)
    else:
        rows = bias.float().repeat_interleave(group, dim=0)  # [n*G, L]
        scores = torch.baddbmm(rows, qg, kt, alpha=scale)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows that see no key
    probs = scores.sub_(top).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.bmm(probs, v.float().transpose(0, 1))  # [K, n*G, D]
    out = out.div_(torch.where(total > 0, total, torch.ones_like(total)))
    lse = (top + total.log()).squeeze(-1)  # -inf where total is 0
    out = out.view(kv_heads, n, group, dim).transpose(0, 1).reshape(n, heads, dim)
    return out, lse.view(kv_heads, n, group).transpose(0, 1).reshape(n, heads)


def merge_attention_states(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results `(out [n, heads, D], lse [n, heads])` over disjoint key sets
    into the result over their union (see the module docstring). Returns (out, lse), float32."""
    if not parts:
        raise ValueError("merge_attention_states needs at least one partial result")
    lses = torch.stack([lse.float() for _, lse in parts])  # [P, n, H]
    top = lses.max(dim=0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lses - top)  # [P, n, H]; 0 for parts a row does not see
    total = weights.sum(dim=0)
    out = parts[0][0].float() * weights[0][..., None]
    for w, (o, _) in zip(weights[1:], parts[1:]):
        out.addcmul_(o.float(), w[..., None])
    out.div_(torch.where(total > 0, total, torch.ones_like(total))[..., None])
    return out, top + torch.log(total)


def rerotate_keys(k: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys `[L, kv_heads, D]` stored with RoPE at positions 0..L-1, rotated to offset..offset+L-1.

    RoPE rotations compose (rotating by p, then by q, is rotating by p + q), so one rotation by
    `offset` moves every key; values carry no position and need nothing. Returns a new tensor in
    k's dtype (rotated in float32)."""
    cos, sin = rope_cos_sin(torch.tensor([offset], device=inv_freq.device), inv_freq, torch.float32)  # [1, D/2]
    return apply_rope(k.float(), cos, sin).to(k.dtype)


def chunk_keys(k_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, offset: int,
               inv_freq: torch.Tensor | None, k_scale: torch.Tensor | None = None,
               rope_table: torch.Tensor | None = None) -> torch.Tensor:
    """A chunk's first `num_tokens` keys through `block_table`, at positions offset..: `[num_tokens,
    kv_heads, D]` (a copy; float32 for quantized pages). Keys stored with RoPE at 0.. are re-rotated
    by `offset` (`inv_freq`, unused when offset is 0); int4 keys, stored before RoPE, are rotated
    straight to offset.. with `rope_table`."""
    if keys_before_rope(k_scale):
        return gather_seq_kv(k_cache, block_table, num_tokens, k_scale, rope_table, offset)
    k = gather_seq_kv(k_cache, block_table, num_tokens, k_scale)
    return rerotate_keys(k, offset, inv_freq) if offset else k


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    num_tokens: int, offset: int, inv_freq: torch.Tensor | None, bias: torch.Tensor | None,
                    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    rope_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `q` `[n, heads, D]` (rows of any number of requests) over one chunk's K/V: its
    first `num_tokens` positions through `block_table` `[nb]` in the arena `[num_blocks, block_size,
    kv_heads, D]`, the keys (stored with RoPE at 0..num_tokens-1) re-rotated by `offset` (`inv_freq`
    `[D/2]` float32, unused when offset is 0); int4 pages store keys before RoPE, rotated instead to
    offset.. as they are read, with `rope_table` (`kvforge.ops.rope.rope_table`). `bias`
    `[n, num_tokens]` float32 additive or None.

    Returns (out `[n, heads, D]` float32, lse `[n, heads]` float32), as `attention_with_lse`: a row
    that sees no key gets out 0 and lse -inf. Cascade levels 0 and 1; does not modify the arena.
    Quantized pages are dequantized with `k_scale` / `v_scale` (ops/quant.py) before re-rotation.
    """
    k = chunk_keys(k_cache, block_table, num_tokens, offset, inv_freq, k_scale, rope_table)
    return attention_with_lse(q, k, gather_seq_kv(v_cache, block_table, num_tokens, v_scale), bias, scale)


class SegmentBatch(NamedTuple):
    """The chunk attention of a step's rows as one batch of work, every count on the device so a
    CUDA graph replays it for any step that fits its buffers (the graph's cascade decode step; an
    eager step's batch is built the same way).

    A pair is (chunk segment, query row): the row attends to the segment's keys. Pairs of one
    segment are consecutive. Work item w (of the first `num_items[0]`) computes pairs
    first..first + count - 1 (at most SEGMENT_TILE_PAIRS, all of segment `seg`, query rows
    `pair_rows[...]`) over the segment's keys key_start..key_end - 1 (the split `split` of its key
    range), writing each pair's partial result (out, lse) to slot `pair_slots[pair] + split`. Query
    row r's partial results are slots `row_slots[r]`..`row_slots[r + 1] - 1`; they are merged with
    the row's own attention (its private K/V) by log-sum-exp. Segment s's keys are read through
    `tables[s]`, stored with RoPE at 0.. and re-rotated by `offsets[s]` as they are read:
    `rotations[s]` is cos then sin of offsets[s] * inv_freq (float32, angles taken in float64);
    int4 keys, stored before RoPE, are rotated to offsets[s] + key with the rope table instead.
    A pair's row sees its segment's keys 0..pair_ends[pair] - 1 (those at or before its position),
    less those that `masks[pair_masks[pair]]` hides (additive: 0 or -inf; -1 for no mask): the
    chunk tokens its request recomputes. A pair that sees no key of a work item's range gets lse
    -inf there, which the merge ignores. A slot no work item writes is never read."""

    items: torch.Tensor  # int32 [6, W]: segment, first pair, pairs, first key, end key, split
    num_items: torch.Tensor  # int32 [1]
    pair_rows: torch.Tensor  # int32 [P]
    pair_slots: torch.Tensor  # int32 [P]
    row_slots: torch.Tensor  # int32 [n + 1]
    offsets: torch.Tensor  # int32 [S]
    rotations: torch.Tensor  # float32 [S, D]
    tables: torch.Tensor  # int32 [S, nb]
    num_slots: int  # slots a step may use (the partial results' buffer rows)
    pair_ends: torch.Tensor  # int32 [P]
    pair_masks: torch.Tensor  # int32 [P]
    masks: torch.Tensor  # float32 [M, keys]
    masked: bool  # whether any pair sees only part of its segment (an end before its last key, or a mask):
    # on the host, for the kernels compile that path apart; False promises every pair sees every key


def segment_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: SegmentBatch,
                      own_out: torch.Tensor, own_lse: torch.Tensor, scale: float, out: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      rope_table: torch.Tensor | None = None) -> None:
    """Attention of the rows `q` `[n, H, D]` over their own K/V and the chunk segments of `batch`
    (see SegmentBatch, which says which keys each row sees): `own_out` `[n, H, D]`, `own_lse`
    `[n, H]` (float32) are each row's attention over its own K/V, merged with its segments' partial
    results into `out` `[n, H, D]` (out's dtype). Writes `out` only. Quantized pages are dequantized
    with `k_scale`, `v_scale`."""
    n, heads, dim = q.shape
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[(own_out[r], own_lse[r])] for r in range(n)]
    slot_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    count = int(batch.num_items[0])
    for seg, first, pairs, start, end, split in batch.items[:, :count].t().tolist():
        if start >= end:
            continue
        table, offset = batch.tables[seg].long(), int(batch.offsets[seg])
        if keys_before_rope(k_scale):
            k = gather_seq_kv(k_cache, table, end, k_scale, rope_table, offset)
        else:
            k = gather_seq_kv(k_cache, table, end, k_scale)
            if offset:
                cos, sin = batch.rotations[seg].view(2, 1, dim // 2)
                k = apply_rope(k.float(), cos, sin).to(k.dtype)
        v = gather_seq_kv(v_cache, table, end, v_scale)
        rows = batch.pair_rows[first:first + pairs].long()
        keys = torch.arange(start, end, device=q.device)
        bias = torch.zeros(pairs, end - start, device=q.device)
        bias.masked_fill_(keys[None, :] >= batch.pair_ends[first:first + pairs, None], float("-inf"))
        for i, m in enumerate(batch.pair_masks[first:first + pairs].tolist()):
            if m >= 0:
                bias[i] += batch.masks[m, start:end].to(q.device)
        o, lse = attention_with_lse(q.index_select(0, rows), k[start:], v[start:], bias, scale)
        for i, pair in enumerate(range(first, first + pairs)):
            slot_of[int(batch.pair_slots[pair]) + split] = (o[i], lse[i])
    for r in range(n):
        for slot in range(int(batch.row_slots[r]), int(batch.row_slots[r + 1])):
            if slot in slot_of:
                parts[r].append(slot_of[slot])
        o, _ = merge_attention_states([(o[None], lse[None]) for o, lse in parts[r]])
        out[r] = o[0].to(out.dtype)
