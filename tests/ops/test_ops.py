"""Torch reference ops against naive formulas."""

from __future__ import annotations

import math

import pytest
import torch

from kvforge import ops
from kvforge.config import RopeScaling


def _naive_attention(q, k, v, causal_offset=None):
    """q [n, H, D], k/v [L, K, D]: repeat kv heads, softmax(q k^T / sqrt(D)) v."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) / math.sqrt(q.shape[-1])
    if causal_offset is not None:
        n, total = q.shape[0], k.shape[0]
        allowed = torch.arange(total)[None, :] <= torch.arange(causal_offset, causal_offset + n)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def test_rope_rotations_compose_so_rotating_by_p_then_q_equals_p_plus_q():
    inv = ops.rope_inv_freq(64, 100000.0)
    x = torch.randn(5, 3, 64, dtype=torch.float64)
    p, q = torch.tensor([3, 7, 0, 100, 5]), torch.tensor([11, 0, 9, 28, 1000])
    once = ops.apply_rope(x, *ops.rope_cos_sin(p + q, inv, torch.float64))
    twice = ops.apply_rope(ops.apply_rope(x, *ops.rope_cos_sin(p, inv, torch.float64)),
                           *ops.rope_cos_sin(q, inv, torch.float64))
    torch.testing.assert_close(once, twice)


def test_rope_keeps_norms_and_position_zero_is_identity():
    inv = ops.rope_inv_freq(8, 10000.0)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    y = ops.apply_rope(x, *ops.rope_cos_sin(torch.tensor([0, 1, 2, 3]), inv, torch.float64))
    torch.testing.assert_close(y[0], x[0])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_llama3_rope_scaling_slows_only_long_wavelengths():
    base = ops.rope_inv_freq(64, 500000.0)
    scaled = ops.rope_inv_freq(64, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
    assert scaled[0] == base[0]  # shortest wavelength kept
    assert torch.isclose(scaled[-1], base[-1] / 8.0)  # longest slowed by the factor


def test_store_then_gather_returns_what_was_stored_in_block_table_order():
    cache = torch.zeros(6, 4, 2, 8)
    k = torch.randn(7, 2, 8)
    table = [4, 1]  # positions 0-3 in block 4, 4-6 in block 1
    slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(7)])
    ops.store_kv(k, k, cache, cache.clone(), slots)
    got = ops.gather_kv(cache, torch.tensor([table]))  # [1, K, 8, D]
    torch.testing.assert_close(got[0].transpose(0, 1)[:7], k)


@pytest.mark.parametrize("lengths", [[1], [5, 17, 3], [16, 32]])
def test_decode_attention_equals_naive_attention_per_sequence(lengths):
    bs, kvh, heads, d = 4, 2, 6, 8
    kc, vc = torch.randn(20, bs, kvh, d), torch.randn(20, bs, kvh, d)
    perm = torch.randperm(20).tolist()
    tables = []
    for n in lengths:
        nb = -(-n // bs)
        tables.append([perm.pop() for _ in range(nb)])
    nbmax = max(map(len, tables))
    padded = torch.tensor([t + [t[0]] * (nbmax - len(t)) for t in tables])
    q = torch.randn(len(lengths), heads, d)
    out = ops.decode_attention(q, kc, vc, padded, torch.tensor(lengths), d ** -0.5)
    for i, (n, t) in enumerate(zip(lengths, tables)):
        k = kc[t].reshape(-1, kvh, d)[:n]
        v = vc[t].reshape(-1, kvh, d)[:n]
        torch.testing.assert_close(out[i], _naive_attention(q[i:i + 1], k, v)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("context", [0, 5])
def test_prefill_attention_is_causal_with_an_offset_for_cached_context(context):
    n, heads, kvh, d = 6, 4, 2, 8
    q = torch.randn(n, heads, d)
    k, v = torch.randn(context + n, kvh, d), torch.randn(context + n, kvh, d)
    out = ops.prefill_attention(q, k, v, context, d ** -0.5)
    torch.testing.assert_close(out, _naive_attention(q, k, v, causal_offset=context), atol=1e-5, rtol=1e-4)


def test_paged_attention_reference_equals_naive_causal_attention_and_lse_per_sequence():
    bs, kvh, heads, d = 4, 2, 6, 8
    # cached-context prefill, decode, no new token, prefill from scratch, a padding sequence (no K/V)
    q_lens, seq_lens = [3, 1, 0, 2, 1], [7, 9, 4, 2, 0]
    kc, vc = torch.randn(20, bs, kvh, d), torch.randn(20, bs, kvh, d)
    perm = torch.randperm(20).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in seq_lens]
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    cu = torch.tensor([0, 3, 4, 4, 6, 7], dtype=torch.int32)
    q = torch.randn(8, heads, d)  # row 7 is past cu[-1]: padding, left untouched
    out, lse = torch.full_like(q, float("nan")), torch.full((8, heads), float("nan"))
    ops.paged_attention(q, kc, vc, cu, torch.tensor(seq_lens, dtype=torch.int32), padded, d ** -0.5, out, lse)
    for b, (n, total) in enumerate(zip(q_lens, seq_lens)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        if n == 0 or total == 0:
            assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isneginf(lse[rows]).all()
            continue
        k = kc[tables[b]].reshape(-1, kvh, d)[:total]
        v = vc[tables[b]].reshape(-1, kvh, d)[:total]
        torch.testing.assert_close(out[rows], _naive_attention(q[rows], k, v, causal_offset=total - n),
                                   atol=1e-5, rtol=1e-4)
        scores = torch.einsum("nhd,lhd->nhl", q[rows], k.repeat_interleave(heads // kvh, 1)) * d ** -0.5
        hidden = torch.arange(total)[None, :] > torch.arange(total - n, total)[:, None]  # [n, total]
        naive_lse = scores.masked_fill(hidden[:, None, :], float("-inf")).logsumexp(-1)
        torch.testing.assert_close(lse[rows], naive_lse, atol=1e-5, rtol=1e-5)
    assert out[7].isnan().all() and lse[7].isnan().all()
