"""Rotary position embeddings (the "rotate half" form HF Llama uses), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from kvforge.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (float64 for exact position tables)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    between = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(between, (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[len(positions), head_dim // 2]` for integer positions.

    Angles are computed in float64 and only cos/sin are cast to `dtype`. `inv_freq` must be float32 or
    float64 (ValueError otherwise): frequencies rounded to bf16/fp16 rotate far positions by wrong angles.
    """
    if inv_freq.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"inv_freq must be float32 or float64, got {inv_freq.dtype}; keep RoPE frequencies "
                         f"in full precision and pass the activation dtype as `dtype`")
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_table(inv_freq: torch.Tensor, num_positions: int) -> torch.Tensor:
    """cos and sin of positions 0 .. num_positions - 1 in one float32 table `[num_positions, head_dim]`:
    row p holds cos(p * inv_freq) then sin(p * inv_freq), as `rope_cos_sin` computes them. The
    readers of keys stored before RoPE (int4 pages, ops/quant.py) look their rotations up in it."""
    cos, sin = rope_cos_sin(torch.arange(num_positions, device=inv_freq.device), inv_freq, torch.float32)
    return torch.cat((cos, sin), dim=-1).contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[T, heads, head_dim]` by per-token `cos`/`sin` `[T, head_dim // 2]`.

    Pairs are (i, i + head_dim/2). Rotations compose: rotating by p then by q equals rotating by p + q,
    which is what chunk re-rotation relies on. Returns a new tensor.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
