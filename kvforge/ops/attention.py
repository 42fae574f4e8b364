"""Paged attention, torch reference.

One packed batch mixes prefill sequences (many new tokens) and decode sequences (one new token).
Both read K/V from the paged arena through block tables, after the step's new K/V were stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.ops.kv import gather_kv


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, kv_mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence.

    q: `[B, heads, head_dim]`; block_tables: `[B, nb]` (padded with any valid block id);
    kv_mask: `[B, nb * block_size]` bool, True where the position holds this sequence's K/V.
    Returns `[B, heads, head_dim]`.
    """
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_kv(k_cache, block_tables)  # [B, kv_heads, L, D]
    v = gather_kv(v_cache, block_tables)
    # GQA without repeating K/V: the query heads of one group act as that group's query rows.
    qg = q.view(batch, kv_heads, heads // kv_heads, dim).to(k.dtype)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=kv_mask[:, None, None, :], scale=scale)
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
        mask = torch.arange(total)[None, :] <= rows  # [n, total]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
