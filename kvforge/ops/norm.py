"""RMSNorm (plain and fused with the residual add) and the gated MLP activation, torch reference.

Numerics follow the model (`kvforge.model.llama`): the norm reduces in float32 and casts back to the
activation dtype before the weight multiply; sums and products happen in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x` `[T, hidden]` normalized by its root mean square (in float32), cast back to x's dtype, times
    `weight` `[hidden]`. The result has the promoted dtype of `weight` and `x`. Returns a new tensor."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add (in the activation dtype, as the model's
    `x = x + ...`) and the next norm in one op. Neither input is modified."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`x` `[T, 2I]` (gate, up side by side, as the fused gate_up projection writes them) ->
    silu(gate) * up `[T, I]`, in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
