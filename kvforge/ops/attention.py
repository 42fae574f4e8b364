"""Paged attention, torch reference.

One packed batch mixes prefill sequences (many new tokens) and decode sequences (one new token).
Both read K/V from the paged arena through block tables, after the step's new K/V were stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.ops.kv import gather_kv


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, kv_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence.

    q: `[B, heads, head_dim]`; block_tables: `[B, nb]` (padded with any valid block id);
    kv_bias: `[B, nb * block_size]` additive mask in q's dtype: 0 where the position holds this
    sequence's K/V, -inf elsewhere (an additive mask keeps SDPA on its fast CPU path; a bool mask
    is several times slower).
    Returns `[B, heads, head_dim]`.
    """
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_kv(k_cache, block_tables)  # [B, kv_heads, L, D]
    v = gather_kv(v_cache, block_tables)
    # GQA without repeating K/V: the query heads of one group act as that group's query rows.
    qg = q.view(batch, kv_heads, heads // kv_heads, dim).to(k.dtype)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=kv_bias[:, None, None, :].to(k.dtype), scale=scale)
    return out.reshape(batch, heads, dim).to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int,
                      scale: float) -> torch.Tensor:
    """Causal attention for one sequence's new tokens.

    q: `[n, heads, head_dim]` for positions `context_len .. context_len + n - 1`;
    k, v: `[context_len + n, kv_heads, head_dim]`, the sequence's whole K/V in position order.
    Returns `[n, heads, head_dim]`.
    """
    n, heads, _ = q.shape
    total = k.shape[0]
    assert total == context_len + n, (total, context_len, n)
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None].to(q.dtype), v.transpose(0, 1)[None].to(q.dtype)
    if context_len == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        rows = torch.arange(context_len, total)[:, None]
        bias = torch.zeros(n, total, dtype=q.dtype).masked_fill_(torch.arange(total)[None, :] > rows, float("-inf"))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def kv_bias_from_lengths(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, width]` additive mask: 0 for positions < lengths[b], -inf beyond (see decode_attention)."""
    invalid = torch.arange(width)[None, :] >= lengths[:, None]
    return torch.zeros(invalid.shape, dtype=dtype).masked_fill_(invalid, float("-inf"))
