"""Linear layers, torch reference and the CPU's packed fast path.

On the CPU, `F.linear` hands MKL a weight it re-packs on every call: for a few rows (batched decode,
short prefills) that packing costs more than the product (2.7x the time of one row at 8 rows). oneDNN
can reorder a weight once into its blocked layout and multiply any number of rows against it
(`pack_weight`, then `linear` with the pack). A single row stays on `F.linear`, which streams the
plain weight faster than oneDNN does (matrix-vector), and so do prefills of more than
PACKED_MAX_ROWS rows, where MKL's own packing is amortized and measured faster in the engine (32 x
256-token prompts: 8.6-9.1 s unpacked vs 9.5-10.5 s packed). A packed layer keeps both weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.ops.norm import add_rms_norm, rms_norm, silu_and_mul

# oneDNN picks its blocked layout for this many rows; measured on this project's CPU, 32 serves 2 to
# 256 rows within a few percent of a layout picked for each.
PACK_ROWS_HINT = 32
PACKED_MAX_ROWS = 256


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `pack_weight` applies: a float32 weight on the CPU, with oneDNN built into torch."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` `[out, in]` in oneDNN's blocked layout (an opaque tensor for
    `linear`). It does not follow later changes to `weight`. ValueError if `can_pack` is False."""
    if not can_pack(weight):
        raise ValueError(f"only float32 CPU weights can be packed, got {weight.dtype} on {weight.device}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for `x` `[T, in]` and `weight` `[out, in]` (`F.linear`). With `packed` =
    `pack_weight(weight)`, 2 to PACKED_MAX_ROWS rows multiply the packed copy instead: the same result
    up to float rounding."""
    if packed is None or not 1 < x.shape[0] <= PACKED_MAX_ROWS:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """The MLP's down projection of its gate/up activations: `linear(silu_and_mul(x), weight)` for `x`
    `[T, 2I]` and `weight` `[out, I]`. One op so that a backend can fuse the activation into the product."""
    return linear(silu_and_mul(x), weight, None, packed)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None,
                    packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection that follows a norm: (`linear(rms_norm(x + residual), weight, bias, packed)`,
    `x + residual`), where the sum is `x` itself when `residual` is None (the first layer). One op so
    that a backend can fuse the residual add and the norm into the product."""
    h, total = (rms_norm(x, norm_weight, eps), x) if residual is None else add_rms_norm(x, residual, norm_weight, eps)
    return linear(h, weight, bias, packed), total
