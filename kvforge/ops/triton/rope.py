"""Rotary embeddings in one kernel: `apply_rope` with the torch reference's signature
(`kvforge.ops.rope.apply_rope`), for x `[T, heads, D]` of any row and head strides (q and k are
views into the fused qkv projection)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, num_heads, stride_xt, stride_xh, stride_ot, stride_oh,
                 stride_ct, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program per token: every head of it, both halves of each pair (i, i + HALF)
    t = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    cols = tl.arange(0, HALF)[None, :]  # [1, HALF]
    mask = heads < num_heads
    c = tl.load(cos_ptr + t * stride_ct + cols).to(tl.float32)  # [1, HALF]
    s = tl.load(sin_ptr + t * stride_ct + cols).to(tl.float32)
    x = x_ptr + t * stride_xt + heads * stride_xh + cols
    x1 = tl.load(x, mask=mask).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask).to(tl.float32)
    o = out_ptr + t * stride_ot + heads * stride_oh + cols
    tl.store(o, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[T, heads, head_dim]` by per-token `cos`/`sin` `[T, head_dim // 2]` (pairs
    (i, i + head_dim/2)); returns a new contiguous tensor in x's dtype, computed in float32."""
    tokens, heads, dim = x.shape
    half = dim // 2
    if x.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride() or half & (half - 1):
        raise ValueError("apply_rope needs unit-stride head dims, cos/sin of one layout and a power-of-two head_dim")
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        _rope_kernel[(tokens,)](x, out, cos, sin, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                                cos.stride(0), HALF=half, BLOCK_H=triton.next_power_of_2(heads))
    return out
