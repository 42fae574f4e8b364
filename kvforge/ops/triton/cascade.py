"""Cascade attention in Triton: one chunk's attention with log-sum-exp for many query rows at once
(`chunk_attention`), and the log-sum-exp merge of partial results (`merge_attention_states`). Same
signatures and results as `kvforge.ops.cascade` (the torch reference and test oracle).

chunk_attention, flash-decoding style, in two launches:

    grid (row tiles, kv heads, key splits)         partial out [S, n, H, D] f32, lse [S, n, H] f32
        each program: BLOCK_M packed rows (query token x query head of one kv head's GQA group,
        the M side of tl.dot) over one key range of the chunk, read page by page through the block
        table, keys re-rotated by `offset` in registers as they are loaded
    merge over the S splits (skipped when S == 1: the split writes the result directly)

The chunk's K/V are read once per row tile, and the row tiles of one key range are neighbours in
the grid, so they share it in L2: 64 requests x 4 query heads are 256 rows, two 128-row tiles.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kvforge.ops.cascade import SEGMENT_TILE_PAIRS, SegmentBatch
from kvforge.ops.rope import rope_cos_sin
from kvforge.ops.triton.attention import (
    INT4_CHANNELS,
    PLAIN,
    TL_DTYPES,
    key_rope_table,
    kv_formats,
    load_kv,
    rope_on_read,
)

_LOG2E = 1.4426950408889634
_MIN_KEYS_PER_SPLIT = 256  # below this a split's partial results cost more than its keys


@triton.jit
def _chunk_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table_ptr, rot_ptr, rope_ptr, bias_ptr, out_ptr, lse_ptr,
    num_rows, num_tokens, offset, keys_per_split, qk_scale,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bias,
    stride_os, stride_on, stride_oh,
    stride_ls, stride_ln,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROTATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    KV_HEADS: tl.constexpr, K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,  # see attention.load_kv
    VALUE_DTYPE: tl.constexpr,  # what q, K, V and p are rounded to: the cache dtype, q's for quantized pages
):
    # Packed row r of kv head `kvh` is query token r // GROUP, query head kvh * GROUP + r % GROUP.
    # Head dims are handled as two halves (d, d + HALF): the RoPE pairs, so re-rotation is elementwise.
    tile, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    dh = tl.arange(0, BLOCK_HALF)
    d_ok = dh < HALF
    # The products run in VALUE_DTYPE (tensor cores); UPCAST (the CPU interpreter, whose bf16
    # tl.dot is wrong) runs them in float32 on the same rounded operands. Quantized pages are
    # dequantized to float32 as they are loaded, before the re-rotation.
    dot_dtype = tl.float32 if UPCAST else VALUE_DTYPE

    q_at = q_ptr + tok[:, None] * stride_qn + head[:, None] * stride_qh + dh[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_at, mask=q_mask, other=0.0).to(VALUE_DTYPE).to(dot_dtype)  # [BLOCK_M, BLOCK_HALF]
    q2 = tl.load(q_at + HALF, mask=q_mask, other=0.0).to(VALUE_DTYPE).to(dot_dtype)
    if ROTATE:
        cos = tl.load(rot_ptr + dh, mask=d_ok, other=1.0)[:, None]  # [BLOCK_HALF, 1]
        sin = tl.load(rot_ptr + HALF + dh, mask=d_ok, other=0.0)[:, None]
    else:
        cos, sin = 1.0, 0.0  # unused

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, num_tokens)
    o1, o2, lse = _attend_keys(
        q1, q2, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table_ptr, rope_ptr, cos, sin,
        bias_ptr + tok[:, None] * stride_bias, row_ok, end + tl.zeros([BLOCK_M], tl.int32), start, end, offset, kvh,
        dh, d_ok, qk_scale,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        PAGE, HALF, BLOCK_M, BLOCK_N, BLOCK_HALF, ROTATE, HAS_BIAS, PRECISION, dot_dtype,
        KV_HEADS, K_FORMAT, V_FORMAT, VALUE_DTYPE)
    out_at = out_ptr + split * stride_os + tok[:, None] * stride_on + head[:, None] * stride_oh + dh[None, :]
    tl.store(out_at, o1, mask=q_mask)
    tl.store(out_at + HALF, o2, mask=q_mask)
    tl.store(lse_ptr + split * stride_ls + tok * stride_ln + head, lse, mask=row_ok)


@triton.jit
def _attend_keys(q1, q2, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table_ptr, rope_ptr, cos, sin, bias_rows, bias_ok,
                 row_end, start, end, offset, kvh, dh, d_ok, qk_scale,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 PAGE: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, ROTATE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, KV_HEADS: tl.constexpr, K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,
                 VALUE_DTYPE: tl.constexpr):
    """Attention of the packed query rows (q1, q2: the two halves of their head dims, `[BLOCK_M,
    BLOCK_HALF]`) over one chunk's keys start..end - 1 of kv head `kvh`, read page by page through
    `table_ptr` and re-rotated by (cos, sin) `[BLOCK_HALF, 1]` when ROTATE (int4 keys: rotated to
    offset + key instead). With HAS_BIAS, `bias_rows` `[BLOCK_M, 1]` points at each row's additive
    bias (read where `bias_ok` `[BLOCK_M]`, 0 elsewhere) and row m sees only keys < `row_end[m]`.
    Returns the normalized output halves (float32) and each row's log-sum-exp (natural log; -inf,
    with output 0, for a row that saw no key)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    if HAS_BIAS:
        end = tl.minimum(end, tl.max(row_end, 0))  # no row sees a key past it
    for first in range(start, end, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        page = tl.load(table_ptr + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
        within = keys % PAGE
        slot = page * PAGE + within
        k_row = (page * stride_kb + within * stride_ks + kvh * stride_kh)[None, :]
        kv_mask = d_ok[:, None] & key_ok[None, :]
        k1 = load_kv(k_ptr, k_scale_ptr, k_row, slot[None, :], page[None, :], kvh, dh[:, None], kv_mask,
                     K_FORMAT, KV_HEADS, 2 * HALF, PAGE)  # [BLOCK_HALF, BLOCK_N], keys as columns
        k2 = load_kv(k_ptr, k_scale_ptr, k_row, slot[None, :], page[None, :], kvh, dh[:, None] + HALF, kv_mask,
                     K_FORMAT, KV_HEADS, 2 * HALF, PAGE)
        if ROTATE:  # in float32, then rounded to VALUE_DTYPE below, like rerotate_keys
            k1f, k2f = k1.to(tl.float32), k2.to(tl.float32)
            k1 = k1f * cos - k2f * sin
            k2 = k2f * cos + k1f * sin
        if K_FORMAT == INT4_CHANNELS:  # stored before RoPE: each key rotated to its position offset + key
            pos = (offset + keys)[None, :]
            k1, k2 = (rope_on_read(k1, k2, pos, dh[:, None], kv_mask, rope_ptr, 2 * HALF),
                      rope_on_read(k2, k1, pos, dh[:, None] + HALF, kv_mask, rope_ptr, 2 * HALF))
        k1, k2 = k1.to(VALUE_DTYPE).to(DOT_DTYPE), k2.to(VALUE_DTYPE).to(DOT_DTYPE)
        s = tl.dot(q1, k1, input_precision=PRECISION)
        s = tl.dot(q2, k2, s, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if HAS_BIAS:
            s += tl.load(bias_rows + keys[None, :], mask=bias_ok[:, None] & key_ok[None, :], other=0.0) * 1.4426950408889634
            s = tl.where(keys[None, :] < row_end[:, None], s, float("-inf"))
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_row = (page * stride_vb + within * stride_vs + kvh * stride_vh)[:, None]
        v_mask = key_ok[:, None] & d_ok[None, :]
        v1 = load_kv(v_ptr, v_scale_ptr, v_row, slot[:, None], page[:, None], kvh, dh[None, :], v_mask,
                     V_FORMAT, KV_HEADS, 2 * HALF, PAGE)  # [BLOCK_N, BLOCK_HALF]
        v2 = load_kv(v_ptr, v_scale_ptr, v_row, slot[:, None], page[:, None], kvh, dh[None, :] + HALF, v_mask,
                     V_FORMAT, KV_HEADS, 2 * HALF, PAGE)
        p = p.to(VALUE_DTYPE).to(DOT_DTYPE)
        v1, v2 = v1.to(VALUE_DTYPE).to(DOT_DTYPE), v2.to(VALUE_DTYPE).to(DOT_DTYPE)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    inv = 1.0 / tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return acc1 * inv[:, None], acc2 * inv[:, None], lse


@triton.jit
def _segment_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, items_ptr, num_items_ptr, pair_rows_ptr, pair_slots_ptr,
    pair_ends_ptr, pair_masks_ptr, masks_ptr, offsets_ptr, rot_ptr, tables_ptr, rope_ptr, out_ptr, lse_ptr, qk_scale,
    stride_items, stride_table, stride_rot, stride_mask,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_on, stride_oh,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROTATE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, KV_HEADS: tl.constexpr, K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,
    VALUE_DTYPE: tl.constexpr, PARTIAL: tl.constexpr,
):
    # Persistent: program p takes tasks p, p + programs, ... of the (work item, kv head) tasks, their
    # count read from the device, so one launch (and one CUDA graph) serves any step. Packed row r of
    # a task is pair first + r // GROUP, query head kvh * GROUP + r % GROUP.
    dh = tl.arange(0, BLOCK_HALF)
    d_ok = dh < HALF
    r = tl.arange(0, BLOCK_M)
    dot_dtype = tl.float32 if UPCAST else VALUE_DTYPE
    tasks = tl.load(num_items_ptr) * KV_HEADS
    for task in range(tl.program_id(0), tasks, tl.num_programs(0)):
        item, kvh = task // KV_HEADS, task % KV_HEADS
        seg = tl.load(items_ptr + item)
        first = tl.load(items_ptr + stride_items + item)
        count = tl.load(items_ptr + 2 * stride_items + item)
        start = tl.load(items_ptr + 3 * stride_items + item)
        end = tl.load(items_ptr + 4 * stride_items + item)
        split = tl.load(items_ptr + 5 * stride_items + item)
        row_ok = r // GROUP < count
        pair = first + r // GROUP
        tok = tl.load(pair_rows_ptr + pair, mask=row_ok, other=0).to(tl.int64)
        slot = (tl.load(pair_slots_ptr + pair, mask=row_ok, other=0) + split).to(tl.int64)
        if PARTIAL:  # a pair sees its segment's keys up to its row, less those its request recomputes
            row_end = tl.load(pair_ends_ptr + pair, mask=row_ok, other=0)
            mask_row = tl.load(pair_masks_ptr + pair, mask=row_ok, other=-1)
        else:  # every pair sees every key (a cascade graph's batch): neither is read
            row_end = tl.zeros([BLOCK_M], tl.int32)
            mask_row = tl.full([BLOCK_M], -1, tl.int32)
        head = kvh * GROUP + r % GROUP
        q_at = q_ptr + tok[:, None] * stride_qn + head[:, None] * stride_qh + dh[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        q1 = tl.load(q_at, mask=q_mask, other=0.0).to(VALUE_DTYPE).to(dot_dtype)
        q2 = tl.load(q_at + HALF, mask=q_mask, other=0.0).to(VALUE_DTYPE).to(dot_dtype)
        if ROTATE:  # offset 0 has cos 1, sin 0: a rotation that changes nothing
            cos = tl.load(rot_ptr + seg * stride_rot + dh, mask=d_ok, other=1.0)[:, None]
            sin = tl.load(rot_ptr + seg * stride_rot + HALF + dh, mask=d_ok, other=0.0)[:, None]
        else:
            cos, sin = 1.0, 0.0  # unused
        o1, o2, lse = _attend_keys(
            q1, q2, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, tables_ptr + seg.to(tl.int64) * stride_table, rope_ptr,
            cos, sin, masks_ptr + tl.maximum(mask_row, 0).to(tl.int64)[:, None] * stride_mask, mask_row >= 0,
            row_end, start, end, tl.load(offsets_ptr + seg), kvh, dh, d_ok, qk_scale,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            PAGE, HALF, BLOCK_M, BLOCK_N, BLOCK_HALF, ROTATE, PARTIAL, PRECISION, dot_dtype,
            KV_HEADS, K_FORMAT, V_FORMAT, VALUE_DTYPE)
        out_at = out_ptr + slot[:, None] * stride_on + head[:, None] * stride_oh + dh[None, :]
        tl.store(out_at, o1, mask=q_mask)
        tl.store(out_at + HALF, o2, mask=q_mask)
        tl.store(lse_ptr + slot * (KV_HEADS * GROUP) + head, lse, mask=row_ok)


@triton.jit
def _merge_rows_kernel(own_out_ptr, own_lse_ptr, parts_out_ptr, parts_lse_ptr, row_slots_ptr, out_ptr,
                       stride_own, stride_own_lse, stride_out, HEADS: tl.constexpr, DIM: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (query row, head): its own attention, then its partial results (slots),
    # BLOCK_S slots at a time, merged online.
    row, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    s = tl.arange(0, BLOCK_S)
    top = tl.load(own_lse_ptr + row * stride_own_lse + head)
    seen = top > float("-inf")
    acc = tl.load(own_out_ptr + row * stride_own + head * DIM + d, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.where(seen, acc, 0.0)  # a row with no key of its own (a padding row) has out anything
    total = tl.where(seen, 1.0, 0.0)  # weights relative to exp(top)
    end = tl.load(row_slots_ptr + row + 1)
    for first in range(tl.load(row_slots_ptr + row), end, BLOCK_S):
        slots = first + s
        ok = slots < end
        lse = tl.load(parts_lse_ptr + slots * HEADS + head, mask=ok, other=float("-inf"))
        o = tl.load(parts_out_ptr + (slots * HEADS + head)[:, None] * DIM + d[None, :],
                    mask=(ok & (lse > float("-inf")))[:, None] & d_ok[None, :], other=0.0)
        new = tl.maximum(top, tl.max(lse, 0))
        safe = tl.where(new == float("-inf"), 0.0, new)
        a = tl.exp(top - safe)
        w = tl.exp(lse - safe)
        acc = acc * a + tl.sum(o * w[:, None], 0)
        total = total * a + tl.sum(w, 0)
        top = new
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * stride_out + head * DIM + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _merge_kernel(parts_out_ptr, parts_lse_ptr, out_ptr, lse_ptr, num_parts, num_rows, head_dim,
                  stride_po, stride_pl, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows are the flattened (token, head) pairs; parts_out [P, rows, D] and parts_lse [P, rows],
    # each part contiguous. Two passes over the small lse, one over the outputs.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < head_dim)[None, :]
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for part in range(num_parts):
        top = tl.maximum(top, tl.load(parts_lse_ptr + part * stride_pl + rows, mask=row_ok, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for part in range(num_parts):
        lse = tl.load(parts_lse_ptr + part * stride_pl + rows, mask=row_ok, other=float("-inf"))
        w = tl.exp(lse - top)
        # A part a row does not see is not read at all (its output may be anything).
        o = tl.load(parts_out_ptr + part * stride_po + rows[:, None] * head_dim + d[None, :],
                    mask=mask & (lse > float("-inf"))[:, None], other=0.0)
        acc += o * w[:, None]
        total += w
    tl.store(out_ptr + rows[:, None] * head_dim + d[None, :], acc / tl.where(total > 0.0, total, 1.0)[:, None],
             mask=mask)
    seen = total > 0.0
    tl.store(lse_ptr + rows, tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf")), mask=row_ok)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one: splitting only adds work


def _chunk_config(rows: int, kv_heads: int, num_tokens: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, splits) for `rows` packed rows per kv head: at most one wave of
    programs (row tiles x kv heads x splits <= the SM count), a split covering >= 256 keys. E.g. on
    an H200 (132 SMs), 8 kv heads, 4096 keys: 64 requests x 4 heads -> 2 tiles of 128 x 8 splits;
    one request -> 1 tile of 16 x 16 splits; 256 requests -> 8 tiles x 2 splits. Not yet tuned on
    the GPU (bench/cascade_kernels.py --sweep)."""
    block_m = min(128, max(16, triton.next_power_of_2(rows)))
    block_n = 64
    tiles = triton.cdiv(rows, block_m)
    splits = max(1, min(num_sms(device) // (tiles * kv_heads), triton.cdiv(num_tokens, _MIN_KEYS_PER_SPLIT)))
    return block_m, block_n, 8 if block_m >= 128 else 4, splits


def _rotation(offset: int, inv_freq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """cos then sin of offset * inv_freq `[D]` float32 (`rope_cos_sin`)."""
    cos, sin = rope_cos_sin(torch.tensor([offset], device=device), inv_freq.to(device), torch.float32)
    return torch.cat((cos, sin), dim=1)[0]


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    num_tokens: int, offset: int, inv_freq: torch.Tensor | None, bias: torch.Tensor | None,
                    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    rope_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.cascade.chunk_attention` in Triton: (out `[n, H, D]` float32, lse `[n, H]` float32)
    of `q` `[n, H, D]` over the chunk's first `num_tokens` positions through `block_table` `[nb]`,
    keys re-rotated by `offset`. q is rounded to the cache dtype for the tensor-core products.
    Quantized pages (`k_scale`, `v_scale`: ops/quant.py) are dequantized to float32 tile by tile as
    they are loaded, before the re-rotation, and the products run in q's dtype instead; int4 keys,
    stored before RoPE, are rotated to their positions offset.. with `rope_table` instead."""
    return _chunk_attention(q, k_cache, v_cache, block_table, num_tokens, offset, inv_freq, bias, scale,
                            k_scale=k_scale, v_scale=v_scale, rope_table=rope_table)


def _chunk_attention(q, k_cache, v_cache, block_table, num_tokens, offset, inv_freq, bias, scale,
                     num_splits: int | None = None, block_m: int | None = None, k_scale=None, v_scale=None,
                     rope_table=None):
    """chunk_attention with the split count and row tile forced (tests, tuning)."""
    n, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if heads % kv_heads or dim % 2:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: head_dim must "
                         f"be even, heads a multiple of kv_heads")
    k_format, v_format = kv_formats(k_cache, v_cache, k_scale, v_scale, dim)  # head dims, layout
    values = k_cache.dtype if k_format == PLAIN else q.dtype  # what the products run in
    if values not in TL_DTYPES:
        raise ValueError(f"chunk_attention runs its products in the cache's dtype, or q's over quantized pages: "
                         f"one of {list(TL_DTYPES)}, got {values}")
    value_dtype = TL_DTYPES[values]
    if num_tokens > block_table.shape[0] * page:
        raise ValueError(f"num_tokens {num_tokens} exceeds the {block_table.shape[0]} pages of the block table")
    if bias is not None and tuple(bias.shape) != (n, num_tokens):
        raise ValueError(f"bias must be [n, num_tokens] = [{n}, {num_tokens}], got {tuple(bias.shape)}")
    rotate = bool(offset) and k_format != INT4_CHANNELS.value  # int4 keys are rotated to offset.. as read
    if rotate and inv_freq is None:
        raise ValueError("a non-zero offset needs inv_freq")
    rope = key_rope_table(k_format, rope_table, dim, k_cache)
    for cache in (k_cache, v_cache):
        if cache.stride(-1) != 1:
            raise ValueError("the arena's head_dim must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if bias is not None:
        bias = bias.to(torch.float32)
        bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    group = heads // kv_heads
    rows = n * group
    if rows == 0:
        return q.new_zeros(0, heads, dim, dtype=torch.float32), q.new_zeros(0, heads, dtype=torch.float32)
    bm, bn, warps, splits = _chunk_config(rows, kv_heads, num_tokens, q.device)
    bm = block_m or bm
    splits = num_splits or splits
    keys_per_split = triton.cdiv(triton.cdiv(max(num_tokens, 1), splits), bn) * bn
    splits = max(1, triton.cdiv(num_tokens, keys_per_split))
    parts_out = torch.empty(splits, n, heads, dim, device=q.device, dtype=torch.float32)
    parts_lse = torch.empty(splits, n, heads, device=q.device, dtype=torch.float32)
    rot = _rotation(offset, inv_freq, q.device) if rotate else parts_lse  # a placeholder pointer when unused
    half = dim // 2
    grid = (triton.cdiv(rows, bm), kv_heads, splits)
    _chunk_attention_kernel[grid](
        q, k_cache, v_cache, k_scale if k_scale is not None else k_cache,
        v_scale if v_scale is not None else v_cache,  # placeholders, never read, for unquantized pages
        block_table, rot, rope, bias if bias is not None else parts_lse, parts_out, parts_lse,
        rows, num_tokens, offset, keys_per_split, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bias.stride(0) if bias is not None else 0,
        parts_out.stride(0), parts_out.stride(1), parts_out.stride(2),
        parts_lse.stride(0), parts_lse.stride(1),
        GROUP=group, PAGE=page, HALF=half, BLOCK_HALF=max(16, triton.next_power_of_2(half)),
        BLOCK_M=bm, BLOCK_N=bn, ROTATE=rotate, HAS_BIAS=bias is not None,
        PRECISION="ieee" if value_dtype == tl.float32 else "tf32", UPCAST=q.device.type == "cpu",
        KV_HEADS=kv_heads, K_FORMAT=k_format, V_FORMAT=v_format, VALUE_DTYPE=value_dtype,
        num_warps=warps, num_stages=2,
    )
    if splits == 1:
        return parts_out[0], parts_lse[0]
    return merge_stacked(parts_out, parts_lse)


def segment_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: SegmentBatch,
                      own_out: torch.Tensor, own_lse: torch.Tensor, scale: float, out: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      rope_table: torch.Tensor | None = None) -> None:
    """`kvforge.ops.cascade.segment_attention` in Triton, in two launches whose sizes do not depend
    on the step (so a CUDA graph captures them once): the segments' partial results by persistent
    programs over the batch's work items, then one program per query row merging them with its own
    attention into `out`. Nothing is read back to the host."""
    n, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if heads % kv_heads or dim % 2:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: head_dim must "
                         f"be even, heads a multiple of kv_heads")
    if own_out.shape != q.shape or own_lse.shape != q.shape[:2] or out.shape != q.shape:
        raise ValueError("own_out and out must be shaped like q, own_lse [n, heads]")
    k_format, v_format = kv_formats(k_cache, v_cache, k_scale, v_scale, dim)
    values = k_cache.dtype if k_format == PLAIN else q.dtype
    if values not in TL_DTYPES:
        raise ValueError(f"segment_attention runs its products in the cache's dtype, or q's over quantized pages: "
                         f"one of {list(TL_DTYPES)}, got {values}")
    value_dtype = TL_DTYPES[values]
    rope = key_rope_table(k_format, rope_table, dim, k_cache)
    for t in (k_cache, v_cache, q, own_out, out):
        if t.stride(-1) != 1:
            raise ValueError("segment_attention needs the head dim contiguous")
    if own_out.stride(1) != dim or out.stride(1) != dim:
        raise ValueError("segment_attention needs own_out's and out's heads contiguous")
    group = heads // kv_heads
    half = dim // 2
    parts_out = torch.empty(batch.num_slots, heads, dim, device=q.device, dtype=torch.float32)
    parts_lse = torch.empty(batch.num_slots, heads, device=q.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(SEGMENT_TILE_PAIRS * group))
    _segment_attention_kernel[(4 * num_sms(q.device),)](
        q, k_cache, v_cache, k_scale if k_scale is not None else k_cache,
        v_scale if v_scale is not None else v_cache, batch.items, batch.num_items, batch.pair_rows,
        batch.pair_slots, batch.pair_ends, batch.pair_masks, batch.masks, batch.offsets, batch.rotations, batch.tables,
        rope, parts_out, parts_lse, scale * _LOG2E,
        batch.items.stride(0), batch.tables.stride(0), batch.rotations.stride(0), batch.masks.stride(0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        parts_out.stride(0), parts_out.stride(1),
        GROUP=group, PAGE=page, HALF=half, BLOCK_HALF=max(16, triton.next_power_of_2(half)),
        BLOCK_M=block_m, BLOCK_N=64, ROTATE=k_format != INT4_CHANNELS.value,
        PRECISION="ieee" if value_dtype == tl.float32 else "tf32", UPCAST=q.device.type == "cpu",
        KV_HEADS=kv_heads, K_FORMAT=k_format, V_FORMAT=v_format, VALUE_DTYPE=value_dtype, PARTIAL=batch.masked,
        num_warps=4, num_stages=2,
    )
    if n:
        _merge_rows_kernel[(n, heads)](
            own_out, own_lse, parts_out, parts_lse, batch.row_slots, out,
            own_out.stride(0), own_lse.stride(0), out.stride(0), HEADS=heads, DIM=dim,
            BLOCK_S=16, BLOCK_D=triton.next_power_of_2(dim), num_warps=2)


def merge_stacked(parts_out: torch.Tensor, parts_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial results stacked as `parts_out` `[P, n, H, D]`, `parts_lse` `[P, n, H]` (float32,
    contiguous) in one launch: (out `[n, H, D]`, lse `[n, H]`) float32. Parts with lse -inf are not read."""
    num_parts, n, heads, dim = parts_out.shape
    if parts_lse.shape != parts_out.shape[:3]:
        raise ValueError(f"parts_lse {tuple(parts_lse.shape)} does not match parts_out {tuple(parts_out.shape)}")
    parts_out = parts_out.to(torch.float32).contiguous()
    parts_lse = parts_lse.to(torch.float32).contiguous()
    out = torch.empty(n, heads, dim, device=parts_out.device, dtype=torch.float32)
    lse = torch.empty(n, heads, device=parts_out.device, dtype=torch.float32)
    rows = n * heads
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(64, 1024 // block_d))
    if rows:
        _merge_kernel[(triton.cdiv(rows, block_r),)](
            parts_out, parts_lse, out, lse, num_parts, rows, dim, parts_out.stride(0), parts_lse.stride(0),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out, lse


def merge_attention_states(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.cascade.merge_attention_states` in Triton: the parts are stacked, then merged in
    one launch. Returns (out `[n, H, D]`, lse `[n, H]`) float32; a row no part sees gets 0 and -inf."""
    if not parts:
        raise ValueError("merge_attention_states needs at least one partial result")
    return merge_stacked(torch.stack([o.to(torch.float32) for o, _ in parts]),
                         torch.stack([lse.to(torch.float32) for _, lse in parts]))
