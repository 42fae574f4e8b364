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

Quantized pages (kvforge.ops.quant: int8, fp8_e4m3, fp8_e5m2, int4) are handled in registers, with
the format a constexpr (PLAIN compiles to the unquantized kernels): store_kv quantizes each row as
it stores it (per-row absmax scale, round to nearest even), and int4 keys, quantized per block and
channel, by a second kernel that re-quantizes each block a run of new rows lands in;
paged_attention (and cascade.chunk_attention) dequantize K/V tiles to float32 as they load them
(`load_kv`); int4 keys, stored before RoPE, are then rotated to their positions with the cos and
sin of a rope table (`rope_on_read`). float8 pages are passed as torch float8 tensors: Triton's
CPU interpreter loads them correctly, but its float32 -> float8 cast is wrong, so the store rounds
to the float8 grid in float32 first (`_round_to_fp8`) and the cast is exact everywhere.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvforge.ops.quant import INT4_VALUE_BOUNDS, INT4_VALUE_LEVELS, SCALE_DTYPE, format_of, kv_layout

_LOG2E = 1.4426950408889634  # 1 / ln 2
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read, like triton.jit, at import


# --------------------------------------------------------------------------------------------
# quantized pages (kvforge.ops.quant): kernel formats and the in-register (de)quantization
# --------------------------------------------------------------------------------------------

# How a kernel reads or writes one of K / V (a constexpr argument). int8 and fp8 share their reads.
PLAIN = tl.constexpr(0)          # the cache's own dtype, no scale
INT8 = tl.constexpr(1)           # per (token, kv head) scale [nb, bs, kv_heads]
FP8 = tl.constexpr(2)            # float8 (either torch format), same scales
INT4_ROWS = tl.constexpr(3)      # int4 values: packed codes of INT4_VALUE_LEVELS, same scales
INT4_CHANNELS = tl.constexpr(4)  # int4 keys: packed codes, per block and channel min / step / first key [nb, 3, kv_heads, D]

_FORMAT_CODES = {  # kv_cache_dtype -> (K, V) kernel formats
    "auto": (PLAIN.value, PLAIN.value), "int8": (INT8.value, INT8.value), "fp8_e4m3": (FP8.value, FP8.value),
    "fp8_e5m2": (FP8.value, FP8.value), "int4": (INT4_CHANNELS.value, INT4_ROWS.value),
}
# float8: (largest finite value, mantissa bits, exponent of the smallest normal number)
_FP8_GRID = {torch.float8_e4m3fn: (448.0, 3, -6), torch.float8_e5m2: (57344.0, 2, -14)}
_MIN_FP8_SCALE = tl.constexpr(torch.finfo(SCALE_DTYPE).tiny)  # as quantize_rows: fp8 scales stay normal float16
# int4 values' codebook (ops/quant.py), as compile-time constants: the levels and the bounds between them.
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7 = (tl.constexpr(x) for x in INT4_VALUE_LEVELS)
_B0, _B1, _B2, _B3, _B4, _B5, _B6 = (tl.constexpr(x) for x in INT4_VALUE_BOUNDS)


def kv_formats(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
               v_scale: torch.Tensor | None, head_dim: int) -> tuple[int, int]:
    """The kernel formats (PLAIN, INT8, ...) of K and V pages, read as `kvforge.ops.quant.format_of`
    does; ValueError unless the pages and scales are laid out as `kv_layout` lays out that format
    for `head_dim` (shapes and dtypes; contiguous float16 scales, both or neither). The caller checks
    the pages' strides."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError("quantized pages need both k_scale and v_scale (or neither)")
    kv_format = format_of(k_cache, k_scale)
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    layout = kv_layout(kv_format, block_size, kv_heads, head_dim, k_cache.dtype)
    pages = (num_blocks, block_size, kv_heads, layout.data_dim)
    if k_cache.shape != pages or v_cache.shape != pages or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{kv_format} pages of head_dim {head_dim} must both be {k_cache.dtype} {list(pages)}; "
                         f"got k {tuple(k_cache.shape)}, v {v_cache.dtype} {tuple(v_cache.shape)}")
    if layout.quantized:
        for name, scale, shape in (("k_scale", k_scale, layout.k_scale_shape),
                                   ("v_scale", v_scale, layout.v_scale_shape)):
            want = (num_blocks, *shape)
            if scale.shape != want or scale.dtype != SCALE_DTYPE or not scale.is_contiguous():
                raise ValueError(f"{kv_format} pages need a contiguous float16 {name} {list(want)}; got "
                                 f"{scale.dtype} {tuple(scale.shape)}")
    return _FORMAT_CODES[kv_format]


def key_rope_table(k_format: int, rope_table: torch.Tensor | None, head_dim: int,
                   placeholder: torch.Tensor) -> torch.Tensor:
    """What the kernels' `rope_ptr` points at: int4 keys (INT4_CHANNELS), stored before RoPE, need a
    contiguous float32 `rope_table` `[P, head_dim]` (`kvforge.ops.rope.rope_table`) on their device
    (ValueError otherwise; that P exceeds every key position is the caller's to keep: reading the
    lengths would sync); any other format reads none and gets `placeholder`."""
    if k_format != INT4_CHANNELS.value:
        return placeholder
    if rope_table is None or rope_table.dim() != 2 or rope_table.shape[1] != head_dim \
            or rope_table.dtype != torch.float32 or not rope_table.is_contiguous() \
            or rope_table.device != placeholder.device:
        got = None if rope_table is None else f"{rope_table.dtype} {tuple(rope_table.shape)} on {rope_table.device}"
        raise ValueError(f"int4 key pages hold keys before RoPE: reading them needs a contiguous float32 rope_table "
                         f"[positions, {head_dim}] on {placeholder.device}; got {got}")
    return rope_table


@triton.jit
def rope_on_read(x, partner, pos, chan, mask, rope_ptr, HEAD_DIM: tl.constexpr):
    """Keys stored before RoPE ("rotate half" pairs (c, c + HEAD_DIM / 2)), rotated to their
    positions as they are read: `x` holds channels `chan`, `partner` the paired channels
    `(chan + HEAD_DIM / 2) % HEAD_DIM` of the same keys, `pos` their positions (all broadcast
    together with `mask`; float32 values). cos and sin come from the rope table `[P, HEAD_DIM]`
    (row p: cos of p times each frequency, then the sines), the values the torch reference uses."""
    half: tl.constexpr = HEAD_DIM // 2
    at = rope_ptr + pos.to(tl.int64) * HEAD_DIM + chan % half
    cos = tl.load(at, mask=mask, other=1.0)
    sin = tl.load(at + half, mask=mask, other=0.0)
    return x * cos + tl.where(chan < half, -sin, sin) * partner


@triton.jit
def _rint(y):
    """`y` (float32, |y| < 2**22) rounded to the nearest integer, ties to even (torch.round): the
    float32 addition of 1.5 * 2**23 rounds away the fraction. Plain arithmetic, so the interpreter,
    which lacks libdevice's rint, computes it too."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_fp8(y, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr):
    """`y` (float32, finite, within the float8 format's range) rounded to the nearest float8 value,
    ties to even, still in float32, so the cast to float8 that follows is exact on every backend
    (a GPU casts to nearest; Triton's CPU interpreter casts float32 -> float8 wrongly, e.g. 7.99 ->
    4). The grid step of y's binade is 2**(exponent - MANTISSA), subnormals sharing the lowest one;
    adding 1.5 * 2**23 steps rounds to it. Keeps the sign of a value that rounds to 0."""
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP)
    magic = (((exponent - MANTISSA + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rounded = (y + magic) - magic
    return tl.where(rounded == 0.0, y * 0.0, rounded)


@triton.jit
def _divide_round(x, s):
    """round(x / s) (float32, ties to even), 0 where s is 0: quant.py's `where(s > 0, x / s, 0).round()`."""
    ok = s > 0.0
    return tl.where(ok, _rint(tl.math.div_rn(x, tl.where(ok, s, 1.0))), 0.0)


@triton.jit
def _int4_value_code(x, s):
    """The int4 value code (0..15, int32) of `x` / `s` (float32; 0 where s is 0): its nearest
    codebook level, as quant.py's `_int4_value_codes`."""
    ok = s > 0.0
    y = tl.where(ok, tl.math.div_rn(x, tl.where(ok, s, 1.0)), 0.0)
    a = tl.abs(y)
    size = ((a > _B0).to(tl.int32) + (a > _B1).to(tl.int32) + (a > _B2).to(tl.int32) + (a > _B3).to(tl.int32)
            + (a > _B4).to(tl.int32) + (a > _B5).to(tl.int32) + (a > _B6).to(tl.int32))
    return tl.where(y > 0.0, 8 + size, 7 - size)


@triton.jit
def _int4_value_level(code):
    """The codebook level (float32) of int4 value codes `code` (int32, 0..15): a tree of selects on
    the bits of the level index."""
    positive = code >= 8
    i = tl.where(positive, code - 8, 7 - code)
    odd, twos, fours = (i & 1) != 0, (i & 2) != 0, (i & 4) != 0
    low = tl.where(twos, tl.where(odd, _L3, _L2), tl.where(odd, _L1, _L0))
    high = tl.where(twos, tl.where(odd, _L7, _L6), tl.where(odd, _L5, _L4))
    level = tl.where(fours, high, low)
    return tl.where(positive, level, -level)


@triton.jit
def _row_scale(absmax, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """float16 scale of rows with `absmax` (float32): absmax / QMAX, at least MIN_SCALE; returned
    as float32 (the float16 value)."""
    return tl.maximum(tl.math.div_rn(absmax, QMAX), MIN_SCALE).to(tl.float16).to(tl.float32)


@triton.jit
def load_kv(data_ptr, scale_ptr, row_off, slot, block, kv_head, chan, mask,
            FORMAT: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """K or V elements of the paged arena: channel `chan` of the (token at `slot`, `kv_head`) row
    whose first element sits at `row_off` in the data tensor (byte offset for int4); `block` is the
    slot's arena block of BLOCK_SIZE positions (read only by INT4_CHANNELS). All tensor arguments
    broadcast together; masked elements read 0. Scales are contiguous as ops/quant.py lays them out.

    PLAIN returns the cache's dtype; the quantized formats return float32, dequantized exactly as
    `kvforge.ops.quant` does (int8/fp8: q * scale; int4 values: level(code) * scale; int4 keys:
    code * step + min, the block's first key read whole from the scales)."""
    if FORMAT == PLAIN:
        x = tl.load(data_ptr + row_off + chan, mask=mask, other=0.0)
    elif FORMAT == INT4_CHANNELS:
        first = slot == block * BLOCK_SIZE
        packed = tl.load(data_ptr + row_off + chan // 2, mask=mask & ~first, other=0)
        code = ((packed >> ((chan % 2) * 4)) & 0xF).to(tl.float32)
        at = scale_ptr + block * (3 * KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + chan
        lo = tl.load(at, mask=mask & ~first, other=0.0).to(tl.float32)
        step = tl.load(at + KV_HEADS * HEAD_DIM, mask=mask & ~first, other=0.0).to(tl.float32)
        whole = tl.load(at + 2 * KV_HEADS * HEAD_DIM, mask=mask & first, other=0.0).to(tl.float32)
        x = tl.where(first, whole, code * step + lo)
    else:
        s = tl.load(scale_ptr + slot * KV_HEADS + kv_head, mask=mask, other=0.0).to(tl.float32)
        if FORMAT == INT4_ROWS:
            packed = tl.load(data_ptr + row_off + chan // 2, mask=mask, other=0)
            x = _int4_value_level(((packed >> ((chan % 2) * 4)) & 0xF).to(tl.int32)) * s
        else:
            x = tl.load(data_ptr + row_off + chan, mask=mask, other=0.0).to(tl.float32) * s
    return x


# --------------------------------------------------------------------------------------------
# store_kv
# --------------------------------------------------------------------------------------------

@triton.jit
def _store_rows(src_ptr, stride_t, stride_h, t, cache_ptr, scale_ptr, slot,
                FORMAT: tl.constexpr, QMAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr,
                KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row `t` of `src` [T, KV_HEADS, HEAD_DIM] into the arena at `slot`: cast (PLAIN), or quantized
    per kv head with its scale written to `scale_ptr` [slots, KV_HEADS] (INT8, FP8: QMAX, MANTISSA,
    MIN_EXP of the float8 format; INT4_ROWS)."""
    h = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = h < KV_HEADS
    src = src_ptr + t * stride_t + h[:, None] * stride_h
    if FORMAT == INT4_ROWS:  # even and odd channels apart: they share a byte
        d = tl.arange(0, BLOCK_D // 2)  # [BLOCK_D / 2] bytes
        mask = h_ok[:, None] & (d[None, :] < HEAD_DIM // 2)
        even = tl.load(src + 2 * d[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D / 2]
        odd = tl.load(src + 2 * d[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        s = _row_scale(tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1)), 1.0, 0.0)
        low = _int4_value_code(even, s[:, None])
        high = _int4_value_code(odd, s[:, None])
        packed = low.to(tl.uint8) | (high.to(tl.uint8) << 4)
        tl.store(cache_ptr + slot * (KV_HEADS * HEAD_DIM // 2) + h[:, None] * (HEAD_DIM // 2) + d[None, :],
                 packed, mask=mask)
    else:
        d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = h_ok[:, None] & (d[None, :] < HEAD_DIM)  # [BLOCK_H, BLOCK_D]
        dst = cache_ptr + slot * (KV_HEADS * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]
        x = tl.load(src + d[None, :], mask=mask)
        if FORMAT == PLAIN:
            tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)
        else:
            x = x.to(tl.float32)
            absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
            if FORMAT == INT8:
                s = _row_scale(absmax, 127.0, 0.0)
                q = tl.minimum(tl.maximum(_divide_round(x, s[:, None]), -127.0), 127.0)
            else:
                s = _row_scale(absmax, QMAX, _MIN_FP8_SCALE)
                q = tl.math.div_rn(x, s[:, None])
                q = _round_to_fp8(tl.minimum(tl.maximum(q, -QMAX), QMAX), MANTISSA, MIN_EXP)
            tl.store(dst, q.to(cache_ptr.dtype.element_ty), mask=mask)
    if FORMAT != PLAIN:
        tl.store(scale_ptr + slot * KV_HEADS + h, s.to(tl.float16), mask=h_ok)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr,              # [T, KV_HEADS, HEAD_DIM], last dim contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks * block_size, KV_HEADS, data_dim] contiguous
    k_scale_ptr, v_scale_ptr,  # per-row scales [num_blocks * block_size, KV_HEADS] (quantized formats)
    slot_ptr,                  # [T] int32 / int64; < 0 = skip
    stride_kt, stride_kh, stride_vt, stride_vh,
    K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,  # INT4_CHANNELS keys: stored by _store_int4_keys_kernel
    QMAX: tl.constexpr, MANTISSA: tl.constexpr, MIN_EXP: tl.constexpr,  # the float8 format's grid (FP8)
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # a padding row
        return
    if K_FORMAT != INT4_CHANNELS:
        _store_rows(k_ptr, stride_kt, stride_kh, t, k_cache_ptr, k_scale_ptr, slot, K_FORMAT, QMAX, MANTISSA,
                    MIN_EXP, KV_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D)
    _store_rows(v_ptr, stride_vt, stride_vh, t, v_cache_ptr, v_scale_ptr, slot, V_FORMAT, QMAX, MANTISSA,
                MIN_EXP, KV_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D)


@triton.jit
def _requantize_nibble(packed, NIBBLE: tl.constexpr, k_at, scale_at, c, c_ok, o, old, new, valid,
                       SCALE_ROW: tl.constexpr):
    """The codes of channels 2c + NIBBLE of one int4 key block [BLOCK_S, BLOCK_C] (float32, 0 at
    offset 0 and at positions not `valid`), re-quantized as quant.quantize_channels over its values:
    at `old` positions the `packed` codes dequantized with the channels' stored min (`scale_at +
    chan`) and step (`+ SCALE_ROW`), or the first key (`+ 2 * SCALE_ROW`) at offset 0; at `new`
    ones the keys at `k_at + NIBBLE`. Stores the new float16 min, step and first key over the old
    ones."""
    chan = 2 * c + NIBBLE  # [BLOCK_C]
    lo = tl.load(scale_at + chan, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    step = tl.load(scale_at + SCALE_ROW + chan, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    whole = tl.load(scale_at + 2 * SCALE_ROW + chan, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    earlier = tl.where(o == 0, whole, ((packed >> (4 * NIBBLE)) & 0xF).to(tl.float32) * step + lo)
    x = tl.where(old, earlier, tl.load(k_at + NIBBLE, mask=new, other=0.0).to(tl.float32))  # [BLOCK_S, BLOCK_C]
    ranged = valid & (o > 0)
    some = tl.max(ranged.to(tl.int32), axis=0) > 0  # [BLOCK_C]: a key besides the first
    lo = tl.where(some, tl.min(tl.where(ranged, x, float("inf")), axis=0), 0.0).to(tl.float16).to(tl.float32)
    hi = tl.where(some, tl.max(tl.where(ranged, x, float("-inf")), axis=0), 0.0)
    step = tl.math.div_rn(hi - lo, 15.0).to(tl.float16).to(tl.float32)
    whole = tl.sum(tl.where((o == 0) & valid, x, 0.0), axis=0)
    tl.store(scale_at + chan, lo.to(tl.float16), mask=c_ok)
    tl.store(scale_at + SCALE_ROW + chan, step.to(tl.float16), mask=c_ok)
    tl.store(scale_at + 2 * SCALE_ROW + chan, whole.to(tl.float16), mask=c_ok)
    codes = tl.minimum(tl.maximum(_divide_round(x - lo[None, :], step[None, :]), 0.0), 15.0)
    return tl.where(ranged, codes, 0.0)


@triton.jit
def _store_int4_keys_kernel(
    k_ptr,          # [T, KV_HEADS, HEAD_DIM], last dim contiguous
    cache_ptr,      # [num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM // 2] uint8, contiguous
    scale_ptr,      # [num_blocks, 3, KV_HEADS, HEAD_DIM] float16: min, step, first key
    slot_ptr,       # [T]; < 0 = skip
    num_rows, stride_kt, stride_kh,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,   # next power of 2 >= BLOCK_SIZE
    BLOCK_C: tl.constexpr,   # next power of 2 >= HEAD_DIM // 2
):
    # Grid (T, KV_HEADS). Program (r, h) owns head h of the run of rows starting at row r, if one
    # does: consecutive rows with consecutive slots in one block. It re-quantizes that block over
    # its positions < the run's end: the earlier ones dequantized, the run's rows new.
    r = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + r).to(tl.int64)
    prev = tl.load(slot_ptr + r - 1, mask=r > 0, other=-1).to(tl.int64)
    if (slot < 0) | ((r > 0) & (prev == slot - 1) & (slot % BLOCK_SIZE != 0)):  # padding, or inside a run
        return
    block = slot // BLOCK_SIZE
    first = slot % BLOCK_SIZE  # the run's first offset in the block
    i = tl.arange(0, BLOCK_S)
    later = tl.load(slot_ptr + r + i, mask=r + i < num_rows, other=-1).to(tl.int64)  # [BLOCK_S]
    in_run = (later == slot + i) & (first + i < BLOCK_SIZE)
    end = first + tl.min(tl.where(in_run, BLOCK_S, i), axis=0)  # one past the run's last offset

    o = tl.arange(0, BLOCK_S)[:, None]  # [BLOCK_S, 1] offsets in the block
    c = tl.arange(0, BLOCK_C)           # [BLOCK_C] bytes: channels 2c (low nibble), 2c + 1 (high)
    c_ok = c < HEAD_DIM // 2
    old = (o < first) & c_ok[None, :]
    new = (o >= first) & (o < end) & c_ok[None, :]
    data_at = cache_ptr + ((block * BLOCK_SIZE + o) * KV_HEADS + h) * (HEAD_DIM // 2) + c[None, :]
    packed = tl.load(data_at, mask=old, other=0)  # [BLOCK_S, BLOCK_C]
    k_at = k_ptr + (r + o - first).to(tl.int64) * stride_kt + h * stride_kh + 2 * c[None, :]
    scale_at = scale_ptr + block * (3 * KV_HEADS * HEAD_DIM) + h * HEAD_DIM
    valid = o < end
    low = _requantize_nibble(packed, 0, k_at, scale_at, c, c_ok, o, old, new, valid, KV_HEADS * HEAD_DIM)
    high = _requantize_nibble(packed, 1, k_at, scale_at, c, c_ok, o, old, new, valid, KV_HEADS * HEAD_DIM)
    tl.store(data_at, low.to(tl.uint8) | (high.to(tl.uint8) << 4), mask=(o < BLOCK_SIZE) & c_ok[None, :])


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write `k`, `v` `[T, kv_heads, head_dim]` into the arena at `slot_mapping` `[T]` (int32 or
    int64) in place, cast to the cache's dtype, or quantized into it with `k_scale` / `v_scale`
    (ops/quant.py; both or neither, mutated too); a negative slot (a padding row) is skipped.
    k and v may be strided views (e.g. slices of a fused qkv projection) with a contiguous last dim.

    Same contract and results as `kvforge.ops.kv.store_kv` (int8 / fp8 / int4 codes and scales
    equal, up to one code where the GPU's float rounding differs), with one more condition for int4
    keys: the new rows of one block must be consecutive rows with consecutive slots (as a sequence's
    tokens are in a packed batch). Each such run is one program, which re-quantizes its block over
    the positions before the run's end. Never syncs with the device (CUDA-graph safe)."""
    tokens, kv_heads, dim = k.shape
    if k_cache.shape[2] != kv_heads or v.shape != k.shape or slot_mapping.shape != (tokens,):
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slots {tuple(slot_mapping.shape)} "
                         f"do not fit the cache {tuple(k_cache.shape)}")
    k_format, v_format = kv_formats(k_cache, v_cache, k_scale, v_scale, dim)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: the K/V caches must be contiguous")
    if k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("store_kv: k and v need a contiguous last dimension")
    if tokens == 0:
        return
    qmax, mantissa, min_exp = _FP8_GRID.get(k_cache.dtype, (0.0, 0, 0))
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, k_scale if k_scale is not None else k_cache,
        v_scale if v_scale is not None else v_cache,  # placeholders, never read, for unquantized pages
        slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        K_FORMAT=k_format, V_FORMAT=v_format, QMAX=qmax, MANTISSA=mantissa, MIN_EXP=min_exp,
        KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(dim), num_warps=1 if kv_heads * dim <= 512 else 2,
    )
    if k_format == INT4_CHANNELS:
        block_size = k_cache.shape[1]
        _store_int4_keys_kernel[(tokens, kv_heads)](
            k, k_cache, k_scale, slot_mapping, tokens, k.stride(0), k.stride(1),
            KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK_SIZE=block_size, BLOCK_S=triton.next_power_of_2(block_size),
            BLOCK_C=triton.next_power_of_2(dim // 2), num_warps=1 if block_size * dim <= 2048 else 4,
        )


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr,           # [T, H | KV_HEADS, 2 * HALF], last dim contiguous
    cos_ptr, sin_ptr,              # [T, HALF]
    q_out_ptr,                     # [T, H, 2 * HALF] contiguous
    k_cache_ptr, v_cache_ptr,      # [num_blocks * block_size, KV_HEADS, 2 * HALF] contiguous, plain
    slot_ptr,                      # [T]; < 0 = skip
    num_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr,
):
    # One program per token: rotate its query heads, then its keys, and store keys and values.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]  # [1, HALF]
    c = tl.load(cos_ptr + t * stride_ct + cols).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + cols).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    mask = heads < num_heads
    x = q_ptr + t * stride_qt + heads * stride_qh + cols
    x1 = tl.load(x, mask=mask).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask).to(tl.float32)
    o = q_out_ptr + t * num_heads * 2 * HALF + heads * 2 * HALF + cols
    tl.store(o, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(o + HALF, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        kh = tl.arange(0, BLOCK_KH)[:, None]  # [BKH, 1]
        kmask = kh < KV_HEADS
        key = k_ptr + t * stride_kt + kh * stride_kh + cols
        k1 = tl.load(key, mask=kmask).to(tl.float32)
        k2 = tl.load(key + HALF, mask=kmask).to(tl.float32)
        at = slot * KV_HEADS * 2 * HALF + kh * 2 * HALF + cols
        tl.store(k_cache_ptr + at, (k1 * c - k2 * s).to(k_cache_ptr.dtype.element_ty), mask=kmask)
        tl.store(k_cache_ptr + at + HALF, (k2 * c + k1 * s).to(k_cache_ptr.dtype.element_ty), mask=kmask)
        value = v_ptr + t * stride_vt + kh * stride_vh + cols
        tl.store(v_cache_ptr + at, tl.load(value, mask=kmask).to(v_cache_ptr.dtype.element_ty), mask=kmask)
        tl.store(v_cache_ptr + at + HALF, tl.load(value + HALF, mask=kmask).to(v_cache_ptr.dtype.element_ty),
                 mask=kmask)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`kvforge.ops.kv.rope_store_kv` in one kernel (one program per token), computed in float32
    like `apply_rope`: returns the rotated `q` (new, contiguous), writes the rotated keys and `v`
    into the plain pages at `slot_mapping` (int32 or int64; -1 skipped). q, k and v may be strided
    views of the fused qkv projection with a contiguous last dim. Never syncs with the device."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    half = dim // 2
    if (k.shape != (tokens, kv_heads, dim) or v.shape != k.shape or slot_mapping.shape != (tokens,)
            or k_cache.shape[2:] != (kv_heads, dim) or v_cache.shape != k_cache.shape):
        raise ValueError(f"rope_store_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, slots "
                         f"{tuple(slot_mapping.shape)} do not fit the cache {tuple(k_cache.shape)}")
    if k_cache.dtype not in TL_DTYPES or v_cache.dtype != k_cache.dtype or not (k_cache.is_contiguous()
                                                                                and v_cache.is_contiguous()):
        raise ValueError("rope_store_kv: plain, contiguous pages only (quantized pages: apply_rope, store_kv)")
    if (q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride()
            or cos.shape != (tokens, half) or half & (half - 1)):
        raise ValueError("rope_store_kv needs unit-stride head dims, cos/sin [T, D/2] of one layout and a "
                         "power-of-two head_dim")
    out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    if tokens:
        _rope_store_kv_kernel[(tokens,)](
            q, k, v, cos, sin, out, k_cache, v_cache, slot_mapping, heads, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            KV_HEADS=kv_heads, HALF=half, BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_KH=triton.next_power_of_2(kv_heads), num_warps=1 if heads * dim <= 1024 else 2)
    return out


# --------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------

@triton.jit
def _paged_attention_kernel(
    q_ptr,                       # [T, H, HEAD_DIM]
    k_cache_ptr, v_cache_ptr,    # [num_blocks * BLOCK_SIZE, KV_HEADS, DATA_DIM] contiguous
    k_scale_ptr, v_scale_ptr,    # quantized pages' scales (kvforge.ops.quant), else unused
    rope_ptr,                    # [P, HEAD_DIM] float32 rope table (INT4_CHANNELS keys), else unused
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
    DATA_DIM: tl.constexpr,      # page elements per (token, kv head): HEAD_DIM, or HEAD_DIM // 2 bytes for int4
    K_FORMAT: tl.constexpr, V_FORMAT: tl.constexpr,  # PLAIN, INT8, ...: K/V tiles dequantized as loaded
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
        kv_off = slot * (KV_HEADS * DATA_DIM) + kv_head * DATA_DIM   # [BLOCK_N]
        kt = load_kv(k_cache_ptr, k_scale_ptr, kv_off[None, :], slot[None, :], block[None, :], kv_head, d[:, None],
                     k_ok[None, :] & d_ok[:, None], K_FORMAT, KV_HEADS, HEAD_DIM, BLOCK_SIZE)  # [BLOCK_D, BLOCK_N]
        if K_FORMAT == INT4_CHANNELS:  # stored before RoPE: rotate each key to its position
            pair = (d + HEAD_DIM // 2) % HEAD_DIM
            kp = load_kv(k_cache_ptr, k_scale_ptr, kv_off[None, :], slot[None, :], block[None, :], kv_head,
                         pair[:, None], k_ok[None, :] & d_ok[:, None], K_FORMAT, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
            kt = rope_on_read(kt, kp, kpos[None, :], d[:, None], k_ok[None, :] & d_ok[:, None], rope_ptr, HEAD_DIM)
        s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        seen = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)        # rows that saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])                             # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = load_kv(v_cache_ptr, v_scale_ptr, kv_off[:, None], slot[:, None], block[:, None], kv_head, d[None, :],
                     k_ok[:, None] & d_ok[None, :], V_FORMAT, KV_HEADS, HEAD_DIM, BLOCK_SIZE)  # [BLOCK_N, BLOCK_D]
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


def attention_tiles(head_dim: int, dtype: torch.dtype, group: int, max_query_len: int,
                    k_format: int = PLAIN.value) -> AttentionTiles:
    """Tile sizes by head_dim, dtype, GQA group, whether any sequence has several query rows, and
    the key pages' kernel format.

    Decode (every sequence's rows fit 16 tile rows): BLOCK_M 16, a long key tile (the step is bound
    by reading K/V), 3 pipeline stages (2 for int4 keys: their gathers of codes, scales, first keys,
    partner channels and rope rows took 351 KB of shared memory at 3 stages on the H200 with Triton
    3.6, over its 227 KB). Prefill: 64-128 rows per program to reuse each K/V tile across many
    queries. float32 halves the tiles (twice the bytes, and the dots run in full fp32).
    """
    small = dtype != torch.float32
    if max_query_len * group <= 16:  # decode-like
        block_m = 16
        block_n = (128 if head_dim <= 64 else 64) if small else 32
        num_warps, num_stages = 4, 3 if small and k_format != INT4_CHANNELS.value else 2
    else:
        block_m = (128 if head_dim <= 64 else 64) if small else 32
        block_n = 64 if small else 32
        num_warps, num_stages = (8 if block_m >= 128 else 4), 2
    block_m = max(block_m, triton.next_power_of_2(group))
    return AttentionTiles(block_m, block_m // group, block_n, num_warps, num_stages)


# Programs per SM that split-K aims for when a batch alone cannot fill the GPU.
PROGRAMS_PER_SM = 4


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len_hint: int, num_sms: int = 132) -> int:
    """Key splits per (sequence, kv head) for a decode step, so a small batch still fills the GPU:
    1 when num_seqs * num_kv_heads programs already give every SM work, else enough splits for about
    PROGRAMS_PER_SM programs per SM, with at least 256 keys per split (below that the merge costs
    more than the parallelism gains), at most 64."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= num_sms:
        return 1
    want = math.ceil(PROGRAMS_PER_SM * num_sms / programs)
    most = max(1, max_seq_len_hint // 256)
    return max(1, min(want, most, 64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_query_lens: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                    lse: torch.Tensor | None = None, max_query_len: int = 1, num_splits: int = 1,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    rope_table: torch.Tensor | None = None) -> None:
    """Causal attention of a packed varlen batch over the paged arena, written into `out` (and `lse`).

    Same contract as the torch reference `kvforge.ops.attention.paged_attention` (read it for the
    shapes), plus: `max_query_len` must be >= every sequence's query length (it picks the tiles
    and the grid; a smaller value leaves rows unwritten); cu_query_lens, seq_lens and block_tables
    are int32 (or int64) on q's device; num_splits > 1 = split-K, valid for prefill rows too.
    Rows at or past cu_query_lens[-1] are left untouched. Never syncs with the device.
    Quantized pages (`k_scale`, `v_scale`: ops/quant.py) are dequantized tile by tile as the kernel
    loads them, to float32 and then q's dtype for the products; nothing else is materialized. int4
    keys, stored before RoPE, are rotated to their positions as they are loaded (`rope_table`).
    """
    _paged_attention(q, k_cache, v_cache, cu_query_lens, seq_lens, block_tables, scale, out, lse,
                     max_query_len, num_splits, None, k_scale, v_scale, rope_table)


def _paged_attention(q, k_cache, v_cache, cu_query_lens, seq_lens, block_tables, scale, out, lse,
                     max_query_len, num_splits, tiles: AttentionTiles | None, k_scale=None, v_scale=None,
                     rope_table=None) -> None:
    """`paged_attention` with an optional tile override (tests use it to vary BLOCK_N)."""
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, data_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if heads % kv_heads:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
                         "(heads must be a multiple of kv heads)")
    k_format, v_format = kv_formats(k_cache, v_cache, k_scale, v_scale, dim)  # head dims, layout
    rope = key_rope_table(k_format, rope_table, dim, k_cache)
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
    if q.dtype not in TL_DTYPES or out.dtype != q.dtype:
        raise ValueError(f"paged_attention: q and out must share a dtype among {list(TL_DTYPES)}, got "
                         f"{q.dtype} and {out.dtype}")
    if max_query_len < 1 or num_splits < 1:
        raise ValueError(f"paged_attention: max_query_len ({max_query_len}) and num_splits ({num_splits}) "
                         "must be >= 1")
    if tokens == 0 or num_seqs == 0:
        return
    group = heads // kv_heads
    if tiles is None:
        tiles = attention_tiles(dim, q.dtype, group, max_query_len, k_format)
    one_qblock = max_query_len <= tiles.block_q
    grid_q = num_seqs if one_qblock else tokens // tiles.block_q + num_seqs
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # Triton's interpreter multiplies bf16 operands as their raw bits: run its dots in float32.
    dot_dtype = tl.float32 if _INTERPRETED and q.dtype == torch.bfloat16 else TL_DTYPES[q.dtype]
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
        q, k_cache, v_cache, k_scale if k_scale is not None else k_cache,
        v_scale if v_scale is not None else v_cache,  # placeholders, never read, for unquantized pages
        rope, dst_out, lse_arg, cu_query_lens, seq_lens, block_tables,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1),
        split_stride_o, dst_out.stride(-3), dst_out.stride(-2),
        split_stride_l, *lse_strides,
        block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
        DATA_DIM=data_dim, K_FORMAT=k_format, V_FORMAT=v_format,
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
