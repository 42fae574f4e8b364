"""Linear layers in Triton: a matrix-vector kernel for one row, the decode step at batch 1.

At one row a projection only streams its weight, and cuBLAS's kernels for that shape reach about
half to two thirds of the H200's copy bandwidth. `_gemv_kernel` gives each program a few output
features and whole rows of the weight, so every program has tens of KB of loads in flight and the
weight streams at close to copy speed. It takes the MLP's SiLU-and-mul as it loads its input
(`silu_and_mul_linear`), which saves that kernel's launch. More rows, float32 (the reference dtype)
and anything else go to torch (cuBLAS), same signatures as the torch reference (`kvforge.ops.linear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvforge.ops.triton.norm import silu_and_mul

GEMV_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w, SILU_AND_MUL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    # out[n] = sum_k x[k] * w[n, k] for this program's BLOCK_N features n; with SILU_AND_MUL, x[k] =
    # silu(g[k]) * u[k] of x_ptr = [g | u] (2K wide), each step rounded to the dtype as the reference rounds.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = n < N
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_w  # [BN, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        if EVEN:
            w = tl.load(rows + k[None, :])
            x = tl.load(x_ptr + k)
            if SILU_AND_MUL:
                u = tl.load(x_ptr + K + k)
        else:
            k_ok = k < K
            w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            if SILU_AND_MUL:
                u = tl.load(x_ptr + K + k, mask=k_ok, other=0.0)
        if SILU_AND_MUL:
            g = x.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(x.dtype)
            x = (act.to(tl.float32) * u.to(tl.float32)).to(x.dtype)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


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
    if x.shape != (1, 2 * k if silu_and_mul_input else k) or weight.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (one row, "
                         f"contiguous weight rows)")
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    t = tiles or gemv_tiles(n, k)
    _gemv_kernel[(triton.cdiv(n, t.block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        SILU_AND_MUL=silu_and_mul_input, HAS_BIAS=bias is not None, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
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
