"""Paged attention, torch reference.

One packed batch mixes prefill sequences (many new tokens) and decode sequences (one new token).
Both read K/V from the paged arena through block tables, after the step's new K/V were stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvforge.ops.cascade import attention_with_lse
from kvforge.ops.kv import gather_kv, gather_seq_kv


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     rope_table: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence (quantized pages dequantized with `k_scale` / `v_scale`; int4
    keys, stored before RoPE, rotated to their positions with `rope_table`).

    q: `[B, heads, head_dim]`; block_tables: `[B, nb]` (padded with any valid block id);
    seq_lens: `[B]` each sequence's K/V positions (1 .. nb * block_size), this step's token included.
    Returns `[B, heads, head_dim]`. Gathers each sequence's blocks into a copy (`gather_kv`); the
    native CPU kernel (`kvforge.ops.cpu`) reads them in place.
    """
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = gather_kv(k_cache, block_tables, k_scale, rope_table)  # [B, kv_heads, L, D]
    v = gather_kv(v_cache, block_tables, v_scale)
    # An additive mask keeps SDPA on its fast CPU path (a bool mask is several times slower).
    kv_bias = kv_bias_from_lengths(seq_lens, k.shape[2], k.dtype)
    # GQA without repeating K/V: the query heads of one group act as that group's query rows.
    qg = q.view(batch, kv_heads, heads // kv_heads, dim).to(k.dtype)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=kv_bias[:, None, None, :], scale=scale)
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


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_query_lens: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                    lse: torch.Tensor | None = None, max_query_len: int = 1, num_splits: int = 1,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    rope_table: torch.Tensor | None = None) -> None:
    """Causal attention of a packed varlen batch (prefills with or without cached context, and
    decodes) over the paged arena, written into `out` (and `lse`). Torch reference of the Triton
    kernel `kvforge.ops.triton.attention.paged_attention`, with the same contract:

    - q `[T, H, D]`; k_cache, v_cache `[num_blocks, block_size, kv_heads, D]`; H % kv_heads == 0.
    - cu_query_lens `[B + 1]`: sequence b's new query rows are q[cu[b]:cu[b+1]]. Rows at or past
      cu[B] are padding: left untouched.
    - seq_lens `[B]`: each sequence's whole K/V length, its new tokens included (already stored).
      Row i of sequence b sits at position seq_len - q_len + i and sees keys 0 .. that position.
    - block_tables `[B, nb]`: sequence b's blocks; entries past its length may be any valid id.
    - out `[T, H, D]` gets the attention output in its own dtype; lse, if given, `[T, H]` float32
      gets the natural-log log-sum-exp of each row's scaled scores. A row that sees no key (its
      sequence has seq_len 0, say) gets out 0 and lse -inf.
    - max_query_len and num_splits only tune the kernel's launch: ignored here.
    - k_scale, v_scale: the scales of quantized pages (ops/quant.py), None for unquantized ones.
    - rope_table `[P, D]` float32 (`kvforge.ops.rope.rope_table`, P > every key position): int4 key
      pages hold keys before RoPE, and each key is rotated to its position as it is read with the
      table's cos and sin (required for them, ignored otherwise).

    Computed in float32, one sequence at a time. Reads the lengths on the host.
    """
    cu, lens = cu_query_lens.tolist(), seq_lens.tolist()
    for b, total in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        n = end - start
        if n <= 0:
            continue
        if total <= 0:  # a padding sequence: no key at all
            out[start:end].zero_()
            if lse is not None:
                lse[start:end].fill_(float("-inf"))
            continue
        context = total - n  # may be < 0 only for inconsistent lengths: rows before 0 see nothing
        k = gather_seq_kv(k_cache, block_tables[b], total, k_scale, rope_table)  # [total, kv_heads, D]
        v = gather_seq_kv(v_cache, block_tables[b], total, v_scale)
        bias = None
        if n > 1 or context < 0:
            rows = torch.arange(context, total, device=q.device)[:, None]  # each row's position
            keys = torch.arange(total, device=q.device)[None, :]
            bias = torch.zeros(n, total, device=q.device).masked_fill_(keys > rows, float("-inf"))
        o, row_lse = attention_with_lse(q[start:end], k, v, bias, scale)
        out[start:end] = o.to(out.dtype)
        if lse is not None:
            lse[start:end] = row_lse
