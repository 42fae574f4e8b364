"""Cascade attention ops: attention with log-sum-exp, the merge over disjoint key sets, key re-rotation."""

from __future__ import annotations

import math

import pytest
import torch

from kvforge import ops
from kvforge.config import RopeScaling

HEADS, KV_HEADS, DIM = 6, 2, 16
SCALE = 1 / math.sqrt(DIM)
LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _sdpa(q, k, v, visible):
    """torch SDPA over [n, H, D] / [L, K, D] with a boolean `visible` [n, L]; rows that see no key are NaN."""
    rep = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1),
        attn_mask=visible[None], scale=SCALE)
    return out.transpose(0, 1)


def _lse(q, k, visible):
    rep = q.shape[1] // k.shape[1]
    scores = torch.einsum("nhd,lhd->nhl", q, k.repeat_interleave(rep, 1)) * SCALE
    return torch.logsumexp(scores.masked_fill(~visible[:, None, :], float("-inf")), dim=-1)


def _bias(visible):
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


@pytest.fixture
def split_problem():
    """9 query rows over 30 keys split (not contiguously) into 3 disjoint sets, with a random mask in
    which row 0 sees only set 0, row 1 sees nothing of set 0, row 2 sees nothing at all."""
    g = torch.Generator().manual_seed(0)
    n, total = 9, 30
    q = torch.randn(n, HEADS, DIM, generator=g)
    k = torch.randn(total, KV_HEADS, DIM, generator=g)
    v = torch.randn(total, KV_HEADS, DIM, generator=g)
    perm = torch.randperm(total, generator=g)
    sets = [perm[:7].sort().values, perm[7:19].sort().values, perm[19:].sort().values]
    visible = torch.rand(n, total, generator=g) < 0.6
    visible[0] = False
    visible[0, sets[0]] = True
    visible[1, sets[0]] = False
    visible[2] = False
    visible[3:, sets[2][0]] = True  # every other row sees at least one key
    return q, k, v, visible, sets


@pytest.mark.parametrize("attend", [ops.attention_with_lse, ops.attention_with_lse_reference],
                         ids=["fused", "reference"])
def test_merging_three_disjoint_key_sets_equals_attention_over_all_keys(split_problem, attend):
    q, k, v, visible, sets = split_problem
    parts = [attend(q, k[s], v[s], _bias(visible[:, s]), SCALE) for s in sets]
    merged_out, merged_lse = ops.merge_attention_states(parts)
    flat_out, flat_lse = attend(q, k, v, _bias(visible), SCALE)
    torch.testing.assert_close(merged_out, flat_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, flat_lse, atol=1e-5, rtol=1e-5)
    seen = visible.any(dim=1)
    torch.testing.assert_close(merged_out[seen], _sdpa(q, k, v, visible)[seen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse[seen], _lse(q, k, visible)[seen], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attend", [ops.attention_with_lse, ops.attention_with_lse_reference],
                         ids=["fused", "reference"])
def test_a_row_that_sees_no_key_gets_zero_output_and_minus_infinite_lse(split_problem, attend):
    q, k, v, visible, sets = split_problem
    parts = [attend(q, k[s], v[s], _bias(visible[:, s]), SCALE) for s in sets]
    # Row 0 sees nothing of sets 1 and 2; row 1 nothing of set 0; row 2 nothing anywhere.
    for i, rows in ((0, [1, 2]), (1, [0, 2]), (2, [0, 2])):
        out, lse = parts[i]
        assert torch.isneginf(lse[rows]).all()
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
    merged_out, merged_lse = ops.merge_attention_states(parts)
    assert not merged_out.isnan().any() and not merged_lse.isnan().any()
    assert torch.isneginf(merged_lse[2]).all() and torch.equal(merged_out[2], torch.zeros_like(merged_out[2]))
    # Row 0 sees only set 0: the merge is set 0's result unchanged.
    torch.testing.assert_close(merged_out[0], parts[0][0][0])
    torch.testing.assert_close(merged_lse[0], parts[0][1][0])


def test_fused_attention_with_lse_matches_the_reference_without_a_bias():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, HEADS, DIM, generator=g)
    k, v = torch.randn(11, KV_HEADS, DIM, generator=g), torch.randn(11, KV_HEADS, DIM, generator=g)
    out, lse = ops.attention_with_lse(q, k, v, None, SCALE)
    ref_out, ref_lse = ops.attention_with_lse_reference(q, k, v, None, SCALE)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    everything = torch.ones(5, 11, dtype=torch.bool)
    torch.testing.assert_close(out, _sdpa(q, k, v, everything), atol=1e-5, rtol=1e-5)
    assert out.dtype == lse.dtype == torch.float32


def test_merge_is_independent_of_the_order_of_the_parts(split_problem):
    q, k, v, visible, sets = split_problem
    parts = [ops.attention_with_lse(q, k[s], v[s], _bias(visible[:, s]), SCALE) for s in sets]
    forward, backward = ops.merge_attention_states(parts), ops.merge_attention_states(parts[::-1])
    torch.testing.assert_close(forward[0], backward[0])
    torch.testing.assert_close(forward[1], backward[1])


def test_merging_nothing_is_refused():
    with pytest.raises(ValueError, match="at least one partial result"):
        ops.merge_attention_states([])


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["plain", "llama3"])
@pytest.mark.parametrize("offset", [1, 37, 1000, 20000])
def test_keys_stored_at_zero_and_rerotated_to_p_equal_keys_computed_at_p(scaling, offset):
    n, dim = 24, 64
    inv = ops.rope_inv_freq(dim, 500000.0 if scaling else 10000.0, scaling)
    x = torch.randn(n, KV_HEADS, dim, generator=torch.Generator().manual_seed(offset))
    stored = ops.apply_rope(x, *ops.rope_cos_sin(torch.arange(n), inv, torch.float32))
    at_p = ops.apply_rope(x, *ops.rope_cos_sin(torch.arange(offset, offset + n), inv, torch.float32))
    moved = ops.rerotate_keys(stored, offset, inv)
    assert moved.dtype == torch.float32 and moved.shape == stored.shape
    torch.testing.assert_close(moved, at_p, atol=1e-5, rtol=0)
    # One position off is clearly wrong, however the frequencies are scaled.
    wrong = ops.rerotate_keys(stored, offset + 1, inv)
    assert (wrong - at_p).abs().max() > 1e-2


def test_rerotating_by_zero_changes_nothing_and_keeps_the_dtype():
    inv = ops.rope_inv_freq(DIM, 10000.0)
    k = torch.randn(7, KV_HEADS, DIM)
    torch.testing.assert_close(ops.rerotate_keys(k, 0, inv), k, atol=0, rtol=0)
    assert ops.rerotate_keys(k.to(torch.bfloat16), 5, inv).dtype == torch.bfloat16


def test_attention_scores_depend_only_on_the_distance_after_rerotation():
    """A query at p + i scores chunk keys re-rotated to p as if they had been computed there."""
    n, dim, offset = 6, DIM, 50
    inv = ops.rope_inv_freq(dim, 10000.0)
    g = torch.Generator().manual_seed(3)
    q_raw, k_raw = torch.randn(n, HEADS, dim, generator=g), torch.randn(n, KV_HEADS, dim, generator=g)
    v = torch.randn(n, KV_HEADS, dim, generator=g)
    q = ops.apply_rope(q_raw, *ops.rope_cos_sin(torch.arange(offset, offset + n), inv, torch.float32))
    k_at_p = ops.apply_rope(k_raw, *ops.rope_cos_sin(torch.arange(offset, offset + n), inv, torch.float32))
    k_stored = ops.apply_rope(k_raw, *ops.rope_cos_sin(torch.arange(n), inv, torch.float32))
    causal = _bias(torch.ones(n, n, dtype=torch.bool).tril())
    want = ops.attention_with_lse(q, k_at_p, v, causal, SCALE)
    got = ops.attention_with_lse(q, ops.rerotate_keys(k_stored, offset, inv), v, causal, SCALE)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
