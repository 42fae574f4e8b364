"""Linear layers in Triton: a matrix-vector kernel for one row, the decode step at batch 1.

At one row a projection only streams its weight, and cuBLAS's kernels for that shape reach about
half to two thirds of the H200's copy bandwidth. `_gemv_kernel` gives each program a few output
features and whole rows of the weight, so every program has tens of KB of loads in flight and the
weight streams at close to copy speed. What a one-row step would launch around a projection is
folded into it, each saving a kernel's launch (~1-2 us in a CUDA graph, 33 to 49 times a step):
- the MLP's SiLU-and-mul, taken as the input loads (`silu_and_mul_linear`);
- the residual add and RMSNorm before the q/k/v and gate/up projections (`rms_norm_linear`): each
  program gathers the row's sum of squares in the same pass and scales its dot products at the end;
- after the q/k/v projection, RoPE and the K/V store (`qkv_rope_store_kv`, `_qkv_rope_store_kernel`):
  each program takes both features of a few rotation pairs, so it can rotate what it computed.
Measured on the H200 in CUDA graphs (1B shape): norm + q/k/v 5.0 -> 3.9 us, norm + gate/up 20.2 ->
19.7 us. More rows, float32 (the reference dtype) and anything else go to the Triton norms, RoPE and
store and to torch (cuBLAS), same signatures as the torch references (`kvforge.ops.linear`,
`kvforge.ops.kv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvforge.ops.kv import split_qkv
from kvforge.ops.triton.attention import rope_store_kv
from kvforge.ops.triton.norm import add_rms_norm, rms_norm, silu_and_mul

GEMV_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _load_cols(ptrs, k_ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_ok, other=0.0)


@triton.jit
def _input_tile(x_ptr, res_ptr, g_ptr, sum_ptr, K, k, k_ok, first, SILU_AND_MUL: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr):
    # The input row's columns k (float32, [BK]) as the product sees them, and their squares (for
    # NORM). With SILU_AND_MUL, x[k] = silu(g[k]) * u[k] of x_ptr = [g | u] (2K wide), each step
    # rounded to the dtype as the reference rounds. With NORM, h = x (+ residual, rounded to the
    # dtype; the `first` program stores h to sum_ptr) is RMS-normalized: the columns are h[k] *
    # g[k] (the norm's weight) and the caller scales its dot products by inv_rms at the end.
    x = _load_cols(x_ptr + k, k_ok, EVEN)
    if SILU_AND_MUL:
        u = _load_cols(x_ptr + K + k, k_ok, EVEN)
        s = x.to(tl.float32)
        act = (s / (1.0 + tl.exp(-s))).to(x.dtype)
        x = (act.to(tl.float32) * u.to(tl.float32)).to(x.dtype)
    if HAS_RESIDUAL:
        r = _load_cols(res_ptr + k, k_ok, EVEN)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        if first:
            tl.store(sum_ptr + k, x, mask=k_ok)
    xf = x.to(tl.float32)
    squares = xf * xf
    if NORM:
        xf = xf * _load_cols(g_ptr + k, k_ok, EVEN).to(tl.float32)
    return xf, squares


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, g_ptr, sum_ptr, N, K, stride_w, eps,
                 SILU_AND_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    # out[n] = sum_k x[k] * w[n, k] for this program's BLOCK_N features n, x as `_input_tile` gives it;
    # with NORM, the sum of h^2 gathered in the same pass scales the dot products at the end
    # (out = inv_rms * sum_k w[n, k] * h[k] * g[k]).
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = n < N
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_w  # [BN, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = k < K
        if EVEN:
            w = tl.load(rows + k[None, :])
        else:
            w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xf, sq = _input_tile(x_ptr, res_ptr, g_ptr, sum_ptr, K, k, k_ok, pid == 0, SILU_AND_MUL, HAS_RESIDUAL,
                             NORM, EVEN)
        squares += sq
        acc += w.to(tl.float32) * xf[None, :]
    y = tl.sum(acc, axis=1)  # [BN]
    if NORM:
        y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _qkv_rope_store_kernel(x_ptr, res_ptr, g_ptr, sum_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr,
                           k_cache_ptr, v_cache_ptr, K, stride_w, eps, Q_SIZE: tl.constexpr,
                           KV_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           HAS_BIAS: tl.constexpr, PAIRS: tl.constexpr, BLOCK_K: tl.constexpr,
                           EVEN: tl.constexpr):
    # The normalized row's q/k/v projection for PAIRS rotation pairs (i, i + HEAD_DIM / 2) of one
    # head: q and k features rotated by cos/sin (row 0), q written to q_ptr [H * HEAD_DIM], k and v
    # into the pages at slot_ptr[0] (skipped when -1).
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    pair0 = pid * PAIRS
    head = pair0 // HALF  # PAIRS divides HALF: every pair of the program is in this head
    i = pair0 % HALF + tl.arange(0, PAIRS)  # [P] channel within the half
    n_lo = head * HEAD_DIM + i
    rows_lo = w_ptr + n_lo.to(tl.int64)[:, None] * stride_w  # [P, 1]
    rows_hi = rows_lo + HALF * stride_w
    acc_lo = tl.zeros([PAIRS, BLOCK_K], dtype=tl.float32)
    acc_hi = tl.zeros([PAIRS, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        if EVEN:
            w_lo = tl.load(rows_lo + k[None, :])
            w_hi = tl.load(rows_hi + k[None, :])
        else:
            w_lo = tl.load(rows_lo + k[None, :], mask=k_ok[None, :], other=0.0)
            w_hi = tl.load(rows_hi + k[None, :], mask=k_ok[None, :], other=0.0)
        xf, sq = _input_tile(x_ptr, res_ptr, g_ptr, sum_ptr, K, k, k_ok, pid == 0, False, HAS_RESIDUAL, True, EVEN)
        squares += sq
        acc_lo += w_lo.to(tl.float32) * xf[None, :]
        acc_hi += w_hi.to(tl.float32) * xf[None, :]
    inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    lo = tl.sum(acc_lo, axis=1) * inv_rms  # [P]
    hi = tl.sum(acc_hi, axis=1) * inv_rms
    if HAS_BIAS:
        lo += tl.load(b_ptr + n_lo).to(tl.float32)
        hi += tl.load(b_ptr + n_lo + HALF).to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    lo = lo.to(dtype).to(tl.float32)  # the projection's output, rounded as the reference's
    hi = hi.to(dtype).to(tl.float32)
    feature = head * HEAD_DIM
    if feature < Q_SIZE + KV_SIZE:  # q or k: rotate the pairs
        c = tl.load(cos_ptr + i).to(tl.float32)
        s = tl.load(sin_ptr + i).to(tl.float32)
        lo, hi = lo * c - hi * s, hi * c + lo * s
    if feature < Q_SIZE:
        tl.store(q_ptr + n_lo, lo.to(dtype))
        tl.store(q_ptr + n_lo + HALF, hi.to(dtype))
    else:
        slot = tl.load(slot_ptr).to(tl.int64)
        if slot >= 0:
            if feature < Q_SIZE + KV_SIZE:
                page = k_cache_ptr + slot * KV_SIZE + (n_lo - Q_SIZE)
            else:
                page = v_cache_ptr + slot * KV_SIZE + (n_lo - Q_SIZE - KV_SIZE)
            tl.store(page, lo.to(dtype))
            tl.store(page + HALF, hi.to(dtype))


@dataclass(frozen=True)
class GemvTiles:
    """Features per program, the weight columns each program loads per step, and warps."""

    block_n: int
    block_k: int
    num_warps: int


def gemv_tiles(n: int, k: int) -> GemvTiles:
    """Measured on the H200 over the Llama-3.2-1B projections (2048 to 128256 features of 2048 or
    8192 inputs, in CUDA graphs): 4 features x 1024 columns a step with 4 warps was the fastest or
    within 3% of it for every shape, 8 features with 8 warps for the 8192-wide down projection."""
    wide = k > 4096
    return GemvTiles(8 if wide else 4, min(1024, triton.next_power_of_2(k)), 8 if wide else 4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_and_mul_input: bool = False,
         tiles: GemvTiles | None = None) -> torch.Tensor:
    """`x` `[1, K]` (or `[1, 2K]` with `silu_and_mul_input`) times `weight.T` (`weight` `[N, K]`, rows
    contiguous) plus `bias` -> a new `[1, N]` in x's dtype. `tiles` overrides `gemv_tiles` (tests)."""
    n, k = weight.shape
    if x.shape != (1, 2 * k if silu_and_mul_input else k):
        raise ValueError(f"gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (one row, "
                         f"contiguous weight rows)")
    return _launch(x, weight, bias, tiles, silu_and_mul=silu_and_mul_input)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tiles: GemvTiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.rms_norm_linear` for one row `x` `[1, K]` in one kernel: (gemv(rms_norm(x +
    residual)), x + residual), the sum a new tensor (`x` itself when `residual` is None). The norm's
    scale is applied to the dot products rather than to the normalized row, so the result differs
    from the reference's by its rounding of that row to the dtype."""
    n, k = weight.shape
    if x.shape != (1, k) or norm_weight.shape != (k,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm_gemv: x {tuple(x.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)} and norm weight "
                         f"{tuple(norm_weight.shape)} do not fit weight {tuple(weight.shape)} (one row)")
    total = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    out = _launch(x, weight, bias, tiles, residual=residual, norm_weight=norm_weight, eps=eps, total=total)
    return out, total


def _launch(x, weight, bias, tiles, silu_and_mul=False, residual=None, norm_weight=None, eps=0.0, total=None):
    if weight.stride(1) != 1:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} needs contiguous rows")
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    t = tiles or gemv_tiles(n, k)
    _gemv_kernel[(triton.cdiv(n, t.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        residual.contiguous() if residual is not None else x, norm_weight if norm_weight is not None else x,
        total if residual is not None else out, n, k, weight.stride(0), eps,
        SILU_AND_MUL=silu_and_mul, NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        EVEN=n % t.block_n == 0 and k % t.block_k == 0, num_warps=t.num_warps)
    return out


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.shape[0] == 1 and x.dtype in GEMV_DTYPES and weight.dtype == x.dtype and weight.stride(1) == 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """`kvforge.ops.linear` on the GPU: one bf16/fp16 row through `gemv`, else cuBLAS (`packed` is a
    CPU layout and is ignored)."""
    if _takes_gemv(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`kvforge.ops.silu_and_mul_linear` on the GPU: `linear(silu_and_mul(x), weight)`, fused into
    `gemv` for one bf16/fp16 row."""
    if _takes_gemv(x, weight):
        return gemv(x, weight, None, silu_and_mul_input=True)
    return F.linear(silu_and_mul(x), weight)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None,
                    packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.rms_norm_linear` on the GPU: one bf16/fp16 row in one kernel (`rms_norm_gemv`),
    else the Triton norm and cuBLAS."""
    if _takes_gemv(x, weight) and norm_weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype):
        return rms_norm_gemv(x, residual, norm_weight.contiguous(), eps, weight, bias)
    h, total = (rms_norm(x, norm_weight, eps), x) if residual is None else add_rms_norm(x, residual, norm_weight, eps)
    return F.linear(h, weight, bias), total


def qkv_rope_store_kv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None, num_heads: int, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, pairs: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.qkv_rope_store_kv` on the GPU: one bf16/fp16 row in one kernel (the norm, the
    projection, RoPE and the K/V store: each program takes `pairs` rotation pairs of one head), else
    `rms_norm_linear` then `rope_store_kv`. Never syncs with the device."""
    head_dim = 2 * cos.shape[1]
    if not (_takes_gemv(x, weight) and weight.shape[0] % head_dim == 0 and norm_weight.dtype == x.dtype
            and k_cache.dtype == v_cache.dtype == x.dtype and k_cache.is_contiguous() and v_cache.is_contiguous()
            and (residual is None or residual.dtype == x.dtype) and (head_dim // 2) % pairs == 0):
        qkv, total = rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
        q, k, v = split_qkv(qkv, num_heads, head_dim)
        return rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), total
    n, hidden = weight.shape
    q_size = num_heads * head_dim
    kv_size = (n - q_size) // 2
    if (x.shape != (1, hidden) or norm_weight.shape != (hidden,) or kv_size <= 0 or q_size + 2 * kv_size != n
            or k_cache.shape[2] * k_cache.shape[3] != kv_size or v_cache.shape != k_cache.shape
            or slot_mapping.shape != (1,) or cos.shape != (1, head_dim // 2) or sin.shape != cos.shape
            or (residual is not None and residual.shape != x.shape)):
        raise ValueError(f"qkv_rope_store_kv: x {tuple(x.shape)}, weight {tuple(weight.shape)} ({num_heads} heads), "
                         f"cos {tuple(cos.shape)}, slots {tuple(slot_mapping.shape)} do not fit the pages "
                         f"{tuple(k_cache.shape)}")
    x = x.contiguous()
    total = x if residual is None else torch.empty_like(x)
    q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
    block_k = min(1024, triton.next_power_of_2(hidden))
    _qkv_rope_store_kernel[(n // (2 * pairs),)](
        x, residual.contiguous() if residual is not None else x, norm_weight.contiguous(), total, weight,
        bias if bias is not None else weight, cos, sin, slot_mapping, q, k_cache, v_cache, hidden,
        weight.stride(0), eps, Q_SIZE=q_size, KV_SIZE=kv_size, HEAD_DIM=head_dim,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, PAIRS=pairs, BLOCK_K=block_k,
        EVEN=hidden % block_k == 0, num_warps=4)
    return q, total
