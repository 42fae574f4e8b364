"""RMSNorm, the residual add fused into it, and SiLU-and-mul in Triton: same signatures and numerics as
`kvforge.ops.norm` (the torch reference): reductions in float32, results rounded where the model
rounds (the residual sum and the normalized row to the activation dtype, then the weight product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, hidden, eps,
                     stride_x, stride_r, stride_o, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row, the whole row in registers.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    y = (x32 * inv_rms).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu, rounded as F.silu rounds
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [T, features], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm_launch(x, residual, weight, eps):
    x = _rows(x, "x")
    tokens, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    weight = weight.contiguous()
    total = None
    if residual is not None:
        residual = _rows(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        total = torch.empty_like(x, dtype=torch.result_type(x, residual), memory_format=torch.contiguous_format)
    act_dtype = x.dtype if total is None else total.dtype
    out = torch.empty(tokens, hidden, device=x.device, dtype=torch.promote_types(weight.dtype, act_dtype))
    block = triton.next_power_of_2(hidden)
    if tokens:
        _rms_norm_kernel[(tokens,)](
            x, residual if residual is not None else x, weight, out, total if total is not None else out,
            hidden, eps, x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            total.stride(0) if total is not None else 0,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`kvforge.ops.norm.rms_norm` in Triton: `x` `[T, hidden]`, `weight` `[hidden]` -> a new tensor."""
    return _norm_launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.norm.add_rms_norm` in Triton: (rms_norm(x + residual), x + residual), one read of
    each input; neither input is modified."""
    return _norm_launch(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`kvforge.ops.norm.silu_and_mul` in Triton: `x` `[T, 2I]` -> silu(x[:, :I]) * x[:, I:] `[T, I]`."""
    x = _rows(x, "x")
    tokens, width = x.shape
    if width % 2:
        raise ValueError(f"x must be [T, 2I], got an odd width {width}")
    inter = width // 2
    out = torch.empty(tokens, inter, device=x.device, dtype=x.dtype)
    block = min(1024, triton.next_power_of_2(max(inter, 1)))
    if tokens and inter:
        _silu_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
            x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
