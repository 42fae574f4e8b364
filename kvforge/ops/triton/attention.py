"""Paged KV store and paged attention, Triton kernels.

Torch references with the same signatures: `kvforge.ops.kv.store_kv` and
`kvforge.ops.attention.paged_attention` (the tests compare them).

Arena layout per layer: `[num_blocks, block_size, kv_heads, D]` contiguous; a flat slot is
`block * block_size + offset`, and slot s starts at element `s * kv_heads * D`.

paged_attention is one kernel for a packed batch that mixes prefills (with or without cached
context) and decodes. Grid: (query blocks, kv heads, splits). One program owns

    rows  m = 0 .. BLOCK_M-1  ->  query token qblock * BLOCK_Q + m // GROUP, head kv_head * GROUP + m % GROUP

so the query heads of one KV group (and, for prefills, several of its tokens) fill the M dimension
of one `tl.dot` tile: a decode step uses tensor cores too. It walks the keys in tiles of BLOCK_N
positions, reading each key's slot through the block table (`table[pos // block_size] *
block_size + pos % block_size`), so the tile size does not depend on the page size. Online
softmax in float32, in base 2.

Split-K (flash-decoding): with num_splits > 1 each program takes one of num_splits ranges of its
key tiles, computed in the kernel from the sequence's own length (a CUDA graph captured with a
fixed num_splits serves any length), writes a partial (out, lse) to float32 scratch, and a second
kernel merges the parts by log-sum-exp. Prefill rows split correctly too.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # 1 / ln 2
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read, like triton.jit, at import


# --------------------------------------------------------------------------------------------
# store_kv
# --------------------------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,            # [T, KV_HEADS, HEAD_DIM], last dim contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks * block_size, KV_HEADS, HEAD_DIM] contiguous
    slot_ptr,                # [T] int32 / int64; < 0 = skip
    stride_kt, stride_kh, stride_vt, stride_vh,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row
        return
    h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (h[:, None] < KV_HEADS) & (d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
    dst = slot * (KV_HEADS * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write `k`, `v` `[T, kv_heads, head_dim]` into the arena at `slot_mapping` `[T]` (int32 or
    int64) in place, cast to the cache's dtype; a negative slot (a padding row) is skipped.
    k and v may be strided views (e.g. slices of a fused qkv projection) with a contiguous last dim."""
    tokens, kv_heads, dim = k.shape
    if k_cache.shape[2:] != (kv_heads, dim) or v.shape != k.shape or slot_mapping.shape != (tokens,):
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slot_mapping.shape)} "
                         f"do not fit the cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: the K/V caches must be contiguous")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("store_kv: k and v need a contiguous last dimension")
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(dim), num_warps=1 if kv_heads * dim <= 512 else 2,
    )


# --------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------

@triton.jit
def _paged_attention_kernel(
    q_ptr,                       # [T, H, HEAD_DIM]
    k_cache_ptr, v_cache_ptr,    # [num_blocks * BLOCK_SIZE, KV_HEADS, HEAD_DIM] contiguous
    out_ptr,                     # out [T, H, HEAD_DIM], or float32 scratch [NUM_SPLITS, T, H, HEAD_DIM]
    lse_ptr,                     # lse [T, H] float32, or scratch [NUM_SPLITS, T, H]
    cu_ptr,                      # [B + 1] query row offsets
    seq_lens_ptr,                # [B] K/V lengths, new tokens included
    tables_ptr,                  # [B, nb] block ids
    scale_log2,                  # softmax scale * log2(e)
    num_seqs,
    stride_qt, stride_qh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt, stride_lh,
    stride_table,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,    # page size (positions per arena block)
    BLOCK_M: tl.constexpr,       # rows per program: BLOCK_Q tokens x GROUP heads, padded
    BLOCK_Q: tl.constexpr,       # query tokens per program
    BLOCK_N: tl.constexpr,       # key positions per tile
    NUM_SPLITS: tl.constexpr,
    ONE_QBLOCK_PER_SEQ: tl.constexpr,  # every sequence's rows fit one program: program 0 = sequence
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,     # q's dtype; float32 under the interpreter, whose bf16 dot is wrong
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # ---- which sequence and which block of its query tokens this program owns
    if ONE_QBLOCK_PER_SEQ:
        seq = pid
        qblock = 0
    else:
        # Sequence b's query blocks are numbered from cu[b] // BLOCK_Q + b (an upper bound on the
        # blocks of the sequences before it): find the last b whose first block is <= pid.
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            right = tl.load(cu_ptr + mid) // BLOCK_Q + mid <= pid
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(right, hi, mid)
        seq = lo - 1
        qblock = pid - (tl.load(cu_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    if qblock * BLOCK_Q >= q_len:  # past this sequence's rows (or q_len 0)
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # position of the first new token

    # ---- this program's rows: [BLOCK_M]
    m = tl.arange(0, BLOCK_M)
    tok = qblock * BLOCK_Q + m // GROUP          # token within the sequence
    head = kv_head * GROUP + m % GROUP           # query head
    row_ok = (m < BLOCK_Q * GROUP) & (tok < q_len)
    row = (q_start + tok).to(tl.int64)           # row of q / out
    pos = context + tok                          # the row's position: it sees keys 0 .. pos
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]

    # ---- keys this program's rows can see: 0 .. kv_end - 1, in tiles; this split's share
    last_tok = tl.minimum((qblock + 1) * BLOCK_Q, q_len) - 1
    kv_end = tl.maximum(context + last_tok + 1, 0)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_table
    n = tl.arange(0, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        kpos = tile * BLOCK_N + n                                    # [BLOCK_N] key positions
        k_ok = kpos < kv_end
        block = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + kpos % BLOCK_SIZE
        kv_off = slot * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM   # [BLOCK_N]
        kt = tl.load(k_cache_ptr + kv_off[None, :] + d[:, None],
                     mask=k_ok[None, :] & d_ok[:, None], other=0.0)   # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        seen = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)        # rows that saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])                             # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :],
                     mask=k_ok[:, None] & d_ok[None, :], other=0.0)   # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    # ---- finish: a row that saw no key gets out 0 and lse -inf
    seen_any = l_i > 0.0
    acc = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    split64 = split.to(tl.int64)  # scratch offsets can pass 2**31 at long prefills
    out_off = split64 * stride_os + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = tl.where(seen_any, (m_i + tl.log2(tl.where(seen_any, l_i, 1.0))) / 1.4426950408889634,
                       float("-inf"))
        tl.store(lse_ptr + split64 * stride_ls + row * stride_lt + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,   # [NUM_SPLITS, T, H, HEAD_DIM] float32
    part_lse_ptr,   # [NUM_SPLITS, T, H] float32
    out_ptr,        # [T, H, HEAD_DIM]
    lse_ptr,        # [T, H] float32 (if STORE_LSE)
    cu_ptr, num_seqs,
    stride_ps, stride_pt, stride_ph,
    stride_pls, stride_plt,
    stride_ot, stride_oh, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    if t >= tl.load(cu_ptr + num_seqs):  # a padding row: the attention kernel wrote no part
        return
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    t64 = t.to(tl.int64)
    lse = tl.load(part_lse_ptr + s * stride_pls + t64 * stride_plt + h, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)                                         # 0 for splits that saw no key
    total = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + s[:, None] * stride_ps + t64 * stride_pt + h * stride_ph + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + t64 * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    if STORE_LSE:
        tl.store(lse_ptr + t64 * stride_lt + h * stride_lh,
                 tl.where(total > 0.0, top + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf")))


class AttentionTiles(NamedTuple):
    """Launch shape of `paged_attention`: rows per program (BLOCK_M = block_q tokens x GQA group,
    padded), key positions per tile, warps and software-pipeline stages."""
    block_m: int
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int


def attention_tiles(head_dim: int, dtype: torch.dtype, group: int, max_query_len: int) -> AttentionTiles:
    """Tile sizes by head_dim, dtype, GQA group and whether any sequence has several query rows.

    Decode (every sequence's rows fit 16 tile rows): BLOCK_M 16, a long key tile (the step is bound
    by reading K/V). Prefill: 64-128 rows per program to reuse each K/V tile across many queries.
    float32 halves the tiles (twice the bytes, and the dots run in full fp32).
    """
    small = dtype != torch.float32
    if max_query_len * group <= 16:  # decode-like
        block_m = 16
        block_n = (128 if head_dim <= 64 else 64) if small else 32
        num_warps, num_stages = 4, 3 if small else 2
    else:
        block_m = (128 if head_dim <= 64 else 64) if small else 32
        block_n = 64 if small else 32
        num_warps, num_stages = (8 if block_m >= 128 else 4), 2
    block_m = max(block_m, triton.next_power_of_2(group))
    return AttentionTiles(block_m, block_m // group, block_n, num_warps, num_stages)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len_hint: int, num_sms: int = 132) -> int:
    """Key splits per (sequence, kv head) for a decode step, so a small batch still fills the GPU:
    1 when num_seqs * num_kv_heads programs already give every SM work, else enough splits for about
    two programs per SM, with at least 256 keys per split (below that the merge costs more than
    the parallelism gains), at most 64."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= num_sms:
        return 1
    want = math.ceil(2 * num_sms / programs)
    most = max(1, max_seq_len_hint // 256)
    return max(1, min(want, most, 64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_query_lens: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                    lse: torch.Tensor | None = None, max_query_len: int = 1, num_splits: int = 1) -> None:
    """Causal attention of a packed varlen batch over the paged arena, written into `out` (and `lse`).

    Same contract as the torch reference `kvforge.ops.attention.paged_attention` (read it for the
    shapes), plus: `max_query_len` must be >= every sequence's query length (it picks the tiles
    and the grid; a smaller value leaves rows unwritten); cu_query_lens, seq_lens and block_tables
    are int32 (or int64) on q's device; num_splits > 1 = split-K, valid for prefill rows too.
    Rows at or past cu_query_lens[-1] are left untouched. Never syncs with the device.
    """
    _paged_attention(q, k_cache, v_cache, cu_query_lens, seq_lens, block_tables, scale, out, lse,
                     max_query_len, num_splits, None)


def _paged_attention(q, k_cache, v_cache, cu_query_lens, seq_lens, block_tables, scale, out, lse,
                     max_query_len, num_splits, tiles: AttentionTiles | None) -> None:
    """`paged_attention` with an optional tile override (tests use it to vary BLOCK_N)."""
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, kv_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if kv_dim != dim or heads % kv_heads or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
                         "(heads must be a multiple of kv heads, head dims equal)")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_attention: the K/V caches must be contiguous")
    if out.shape != q.shape or q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"paged_attention: out {tuple(out.shape)} must match q {tuple(q.shape)}, "
                         "both with a contiguous last dimension")
    if lse is not None and (lse.shape != (tokens, heads) or lse.dtype != torch.float32):
        raise ValueError(f"paged_attention: lse must be float32 [{tokens}, {heads}], got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    if cu_query_lens.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs or block_tables.stride(1) != 1:
        raise ValueError(f"paged_attention: cu_query_lens {tuple(cu_query_lens.shape)}, block_tables "
                         f"{tuple(block_tables.shape)} must have B + 1 and B rows for B = {num_seqs}")
    if q.dtype not in _TL_DTYPES or out.dtype != q.dtype:
        raise ValueError(f"paged_attention: q and out must share a dtype among {list(_TL_DTYPES)}, got "
                         f"{q.dtype} and {out.dtype}")
    if max_query_len < 1 or num_splits < 1:
        raise ValueError(f"paged_attention: max_query_len ({max_query_len}) and num_splits ({num_splits}) "
                         "must be >= 1")
    if tokens == 0 or num_seqs == 0:
        return
    group = heads // kv_heads
    if tiles is None:
        tiles = attention_tiles(dim, q.dtype, group, max_query_len)
    one_qblock = max_query_len <= tiles.block_q
    grid_q = num_seqs if one_qblock else tokens // tiles.block_q + num_seqs
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Triton's interpreter multiplies bf16 operands as their raw bits: run its dots in float32.
    dot_dtype = tl.float32 if _INTERPRETED and q.dtype == torch.bfloat16 else _TL_DTYPES[q.dtype]
    if num_splits > 1:
        # One scratch allocation: parts [S, T, H, D] then their lse [S, T, H], all float32.
        scratch = torch.empty(num_splits * tokens * heads * (dim + 1), dtype=torch.float32, device=q.device)
        part_out = scratch[:num_splits * tokens * heads * dim].view(num_splits, tokens, heads, dim)
        part_lse = scratch[num_splits * tokens * heads * dim:].view(num_splits, tokens, heads)
        dst_out, dst_lse, split_stride_o, split_stride_l = part_out, part_lse, part_out.stride(0), part_lse.stride(0)
    else:
        dst_out, dst_lse, split_stride_o, split_stride_l = out, lse, 0, 0
    store_lse = dst_lse is not None
    lse_arg = dst_lse if store_lse else out  # any pointer: never written when STORE_LSE is off
    lse_strides = (dst_lse.stride(-2), dst_lse.stride(-1)) if store_lse else (0, 0)
    _paged_attention_kernel[(grid_q, kv_heads, num_splits)](
        q, k_cache, v_cache, dst_out, lse_arg, cu_query_lens, seq_lens, block_tables,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1),
        split_stride_o, dst_out.stride(-3), dst_out.stride(-2),
        split_stride_l, *lse_strides,
        block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_SIZE=block_size, BLOCK_M=tiles.block_m, BLOCK_Q=tiles.block_q, BLOCK_N=tiles.block_n,
        NUM_SPLITS=num_splits, ONE_QBLOCK_PER_SEQ=one_qblock, STORE_LSE=store_lse,
        DOT_PRECISION=precision, DOT_DTYPE=dot_dtype, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(tokens, heads)](
            part_out, part_lse, out, lse if lse is not None else part_lse, cu_query_lens, num_seqs,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
            HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim), NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), STORE_LSE=lse is not None, num_warps=1 if dim <= 64 else 2,
        )
