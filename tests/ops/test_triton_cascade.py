"""Triton cascade kernels (chunk_attention, merge_attention_states) against the torch references.

Without a GPU the kernels run in Triton's CPU interpreter on small shapes; with one they run on the
GPU, at the small shapes and at a real one (64 and 256 decoding rows over a 4k-token chunk).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at @jit time
pytest.importorskip("triton")

from kvforge import ops  # noqa: E402
from kvforge.ops.triton import cascade as tcascade  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="real shapes need a GPU")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inv_freq(dim: int) -> torch.Tensor:
    return ops.rope_inv_freq(dim, 10000.0).float()


def _chunk(g, num_tokens, page, kv_heads, dim, dtype, raw_k=None):
    """An arena poisoned with NaN except the chunk's positions, which sit on shuffled pages; the
    table has one page more than the chunk needs (a NaN page) so nothing past num_tokens is read."""
    pages = max(1, math.ceil(num_tokens / page))
    num_blocks = pages + 4
    k_cache = torch.full((num_blocks, page, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.randperm(num_blocks, generator=g)[:pages + 1].to(torch.int32)
    pos = torch.arange(num_tokens)
    slots = table[pos // page].long() * page + pos % page
    k = raw_k if raw_k is not None else torch.randn(num_tokens, kv_heads, dim, generator=g)
    ops.store_kv(k, torch.randn(num_tokens, kv_heads, dim, generator=g), k_cache, v_cache, slots)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), table.to(DEVICE)


def _bias(g, kind, n, num_tokens):
    if kind == "none":
        return None
    visible = torch.rand(n, num_tokens, generator=g) < 0.6
    visible[:, -1] = True  # every row sees a key...
    if kind == "hidden_row":
        visible[1] = False  # ...but row 1 sees none, row 0 only the last
        visible[0, :-1] = False
    return torch.zeros(n, num_tokens).masked_fill_(~visible, float("-inf"))


def _compare(q, k_cache, v_cache, table, num_tokens, offset, inv_freq, bias, scale, dtype, **force):
    out, lse = tcascade._chunk_attention(q, k_cache, v_cache, table, num_tokens, offset, inv_freq,
                                         None if bias is None else bias.to(q.device), scale, **force)
    ref_out, ref_lse = ops.chunk_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), table.cpu(), num_tokens, offset,
                                           inv_freq, bias, scale)
    assert out.dtype == lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    torch.testing.assert_close(out.cpu(), ref_out, **TOL[dtype])
    torch.testing.assert_close(lse.cpu(), ref_lse, **TOL[dtype])
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("offset", [0, 5000])
@pytest.mark.parametrize("bias_kind", ["none", "partial", "hidden_row"])
def test_chunk_attention_matches_the_reference(dtype, group, page, offset, bias_kind):
    g = torch.Generator().manual_seed(1000 * group + page + offset)
    n, kv_heads, dim, num_tokens = 5, 2, 32, 150
    k_cache, v_cache, table = _chunk(g, num_tokens, page, kv_heads, dim, dtype)
    q = torch.randn(n, kv_heads * group, dim, generator=g).to(dtype).to(DEVICE)
    bias = _bias(g, bias_kind, n, num_tokens)
    out, lse = _compare(q, k_cache, v_cache, table, num_tokens, offset, _inv_freq(dim), bias, dim ** -0.5, dtype)
    if bias_kind == "hidden_row":
        assert torch.isneginf(lse[1]).all() and torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_key_splits_merge_to_the_unsplit_result(num_splits):
    """Splits of 64 keys: with the hidden-row bias some splits see nothing for some rows."""
    g = torch.Generator().manual_seed(num_splits)
    n, kv_heads, group, dim, num_tokens = 4, 2, 2, 32, 300
    k_cache, v_cache, table = _chunk(g, num_tokens, 16, kv_heads, dim, torch.float32)
    q = torch.randn(n, kv_heads * group, dim, generator=g).to(DEVICE)
    bias = _bias(g, "hidden_row", n, num_tokens)
    bias[2, :200] = float("-inf")  # row 2 sees only the last splits
    _compare(q, k_cache, v_cache, table, num_tokens, 777, _inv_freq(dim), bias, 0.2, torch.float32,
             num_splits=num_splits)


def test_the_default_config_splits_long_chunks_by_the_sm_count(monkeypatch):
    monkeypatch.setattr(tcascade, "num_sms", lambda device: 8)  # 8 SMs, 2 kv heads, 1 tile: 4 splits
    assert tcascade._chunk_config(rows=10, kv_heads=2, num_tokens=1000, device=torch.device(DEVICE))[3] == 4
    g = torch.Generator().manual_seed(8)
    k_cache, v_cache, table = _chunk(g, 1000, 32, 2, 32, torch.float32)
    q = torch.randn(5, 4, 32, generator=g).to(DEVICE)
    _compare(q, k_cache, v_cache, table, 1000, 0, None, _bias(g, "hidden_row", 5, 1000), 0.2, torch.float32)


def test_rows_over_several_row_tiles():
    """9 tokens x 4 query heads = 36 packed rows per kv head, in three 16-row tiles (the last partial)."""
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache, table = _chunk(g, 70, 16, 2, 32, torch.float32)
    q = torch.randn(9, 8, 32, generator=g).to(DEVICE)
    _compare(q, k_cache, v_cache, table, 70, 12, _inv_freq(32), _bias(g, "partial", 9, 70), 0.18, torch.float32,
             block_m=16, num_splits=2)


@pytest.mark.parametrize("dim", [16, 48])
def test_head_dims_whose_half_is_not_a_tile_width(dim):
    g = torch.Generator().manual_seed(dim)
    k_cache, v_cache, table = _chunk(g, 40, 16, 1, dim, torch.float32)
    q = torch.randn(3, 2, dim, generator=g).to(DEVICE)
    _compare(q, k_cache, v_cache, table, 40, 4096, _inv_freq(dim), None, dim ** -0.5, torch.float32)


def test_strided_query_view_of_a_packed_projection():
    g = torch.Generator().manual_seed(5)
    n, heads, kv_heads, dim = 6, 4, 2, 32
    k_cache, v_cache, table = _chunk(g, 33, 32, kv_heads, dim, torch.float32)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE)
    q = qkv[:, :heads * dim].view(n, heads, dim)
    assert not q.is_contiguous()
    _compare(q, k_cache, v_cache, table, 33, 100, _inv_freq(dim), None, 0.2, torch.float32)


def test_an_empty_chunk_gives_zero_output_and_minus_infinite_lse():
    g = torch.Generator().manual_seed(6)
    k_cache, v_cache, table = _chunk(g, 0, 16, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32, generator=g).to(DEVICE)
    out, lse = tcascade.chunk_attention(q, k_cache, v_cache, table, 0, 0, None, None, 0.2)
    assert torch.equal(out.cpu(), torch.zeros(2, 4, 32)) and torch.isneginf(lse).all()


def test_reference_equals_gather_rerotate_attend_and_attention_at_the_shifted_positions():
    """The reference is the composition it replaces, and re-rotating keys stored at 0..L-1 by `offset`
    is the same as having stored them at offset..offset+L-1."""
    g = torch.Generator().manual_seed(7)
    num_tokens, kv_heads, dim, offset = 45, 2, 16, 3000
    inv = _inv_freq(dim)
    raw = torch.randn(num_tokens, kv_heads, dim, generator=g, dtype=torch.float64).float()
    at_zero = ops.apply_rope(raw, *ops.rope_cos_sin(torch.arange(num_tokens), inv, torch.float32))
    k_cache, v_cache, table = (t.cpu() for t in _chunk(g, num_tokens, 16, kv_heads, dim, torch.float32, at_zero))
    q = torch.randn(3, 6, dim, generator=g)
    bias = _bias(g, "hidden_row", 3, num_tokens)
    out, lse = ops.chunk_attention(q, k_cache, v_cache, table, num_tokens, offset, inv, bias, 0.25)
    k = ops.rerotate_keys(ops.gather_seq_kv(k_cache, table, num_tokens), offset, inv)
    v = ops.gather_seq_kv(v_cache, table, num_tokens)
    want_out, want_lse = ops.attention_with_lse(q, k, v, bias, 0.25)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    shifted = ops.apply_rope(raw, *ops.rope_cos_sin(torch.arange(offset, offset + num_tokens), inv, torch.float32))
    direct_out, direct_lse = ops.attention_with_lse_reference(q, shifted, v, bias, 0.25)
    torch.testing.assert_close(out, direct_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, direct_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_parts", [1, 3, 5])
def test_merge_matches_the_reference_and_never_reads_unseen_parts(num_parts):
    g = torch.Generator().manual_seed(num_parts)
    n, heads, dim = 7, 6, 24
    parts = []
    for i in range(num_parts):
        out = torch.randn(n, heads, dim, generator=g)
        lse = torch.randn(n, heads, generator=g) * 3
        lse[i % n] = float("-inf")  # a row that does not see this part
        lse[3] = float("-inf")  # a row that sees no part at all
        parts.append((out, lse))
    ref_out, ref_lse = ops.merge_attention_states(parts)
    poisoned = [(o.masked_fill(torch.isneginf(lse)[..., None], float("nan")).to(DEVICE), lse.to(DEVICE))
                for o, lse in parts]
    out, lse = tcascade.merge_attention_states(poisoned)
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[3].cpu(), torch.zeros(heads, dim)) and torch.isneginf(lse[3]).all()


def test_merge_accepts_bfloat16_outputs():
    g = torch.Generator().manual_seed(11)
    parts = [(torch.randn(4, 2, 32, generator=g).bfloat16(), torch.randn(4, 2, generator=g)) for _ in range(2)]
    ref_out, ref_lse = ops.merge_attention_states(parts)
    out, lse = tcascade.merge_attention_states([(o.to(DEVICE), lse.to(DEVICE)) for o, lse in parts])
    torch.testing.assert_close(out.cpu(), ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-6, rtol=1e-5)


@needs_gpu
@pytest.mark.parametrize("n", [1, 64, 256])
@pytest.mark.parametrize("offset", [0, 5000])
def test_real_shape_decoding_rows_over_a_4k_system_chunk(n, offset):
    """Llama-3.2-1B shape: 32 heads, 8 kv heads, D 64, bf16, pages of 16, a 4096-token chunk."""
    g = torch.Generator().manual_seed(n + offset)
    k_cache, v_cache, table = _chunk(g, 4096, 16, 8, 64, torch.bfloat16)
    q = torch.randn(n, 32, 64, generator=g).bfloat16().to(DEVICE)
    bias = _bias(g, "hidden_row", n, 4096) if n > 1 else None
    inv = ops.rope_inv_freq(64, 500000.0).float()
    _compare(q, k_cache, v_cache, table, 4096, offset, inv, bias, 0.125, torch.bfloat16)


def _segment_step(g, dtype, kv_heads=2, group=3, dim=16, page=4):
    """An arena holding three chunks (one long enough to split) and six rows' private pages; rows 0
    and 5 are plain, the others read chunks, chunk "a" at offset 0 by three rows, chunk "b" at two
    offsets. Returns (q, k_cache, v_cache, placements per row, own (table, length) per row)."""
    from kvforge.types import ChunkPlacement

    lengths = {"a": 37, "b": 600, "c": 9}
    own_lens = [5, 3, 1, 7, 2, 4]
    need = sum(math.ceil(n / page) for n in lengths.values()) + sum(math.ceil(n / page) for n in own_lens)
    k_cache = torch.randn(need + 3, page, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(need + 3, page, kv_heads, dim, generator=g).to(dtype)
    free = torch.randperm(need + 3, generator=g).tolist()

    def take(n):
        return tuple(free.pop() for _ in range(math.ceil(n / page)))

    pages = {c: take(n) for c, n in lengths.items()}

    def place(c, offset):
        return ChunkPlacement(c, 1, offset, lengths[c], pages[c])

    placements = [(), (place("a", 0), place("b", 37)), (place("a", 0),), (place("b", 100),),
                  (place("a", 0), place("b", 37), place("c", 637)), ()]
    own = [(take(n), n) for n in own_lens]
    q = torch.randn(len(own_lens), kv_heads * group, dim, generator=g).to(dtype)
    return q, k_cache.to(DEVICE), v_cache.to(DEVICE), placements, own


def _recomputing(placements):
    """`_segment_step`'s placements with some chunk tokens recomputed (row 2's whole chunk "a" but
    one token, a few of row 4's chunk "b", row 3's first token of "b") and each row's position: row
    1 sits inside chunk "b" (it sees "a" whole and the first 20 keys of "b"), row 3 on the first
    token of "b" (recomputed: it sees no key of "b" at all), the others past every chunk."""
    import dataclasses

    rows = [list(row) for row in placements]
    rows[2][0] = dataclasses.replace(rows[2][0], recomputed=tuple(range(1, 37)))
    rows[3][0] = dataclasses.replace(rows[3][0], recomputed=(0,))
    rows[4][1] = dataclasses.replace(rows[4][1], recomputed=(0, 5, 599))
    positions = [_PAST, 37 + 19, _PAST, 100, _PAST, _PAST]
    return [tuple(row) for row in rows], positions


_PAST = 10_000  # a position past every chunk of `_segment_step`


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target_tasks", [2, 96])  # one split per segment; the long chunk split
@pytest.mark.parametrize("hidden", [False, True])  # every chunk key seen; keys past a row or recomputed hidden
def test_segment_attention_merges_each_rows_chunks_with_its_own_keys(dtype, target_tasks, hidden):
    from kvforge.model.staging import RunReads, SegmentStaging

    g = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, placements, own = _segment_step(g, dtype)
    positions = [_PAST] * len(placements)
    if hidden:
        placements, positions = _recomputing(placements)
    n, heads, dim = q.shape
    q = q.to(DEVICE)
    inv_freq, scale = _inv_freq(dim), dim ** -0.5
    own_out, own_lse, expected = torch.empty_like(q), torch.empty(n, heads), []
    for r, (table, length) in enumerate(own):
        t = torch.tensor(table, device=DEVICE)
        k, v = ops.gather_seq_kv(k_cache, t, length), ops.gather_seq_kv(v_cache, t, length)
        o, lse = ops.attention_with_lse(q[r:r + 1], k, v, None, scale)
        own_out[r], own_lse[r] = o[0].to(dtype), lse[0]
        ks, vs, bias = [k], [v], [torch.zeros(length)]
        for j, p in enumerate(placements[r]):
            pt = torch.tensor(p.page_indices, device=DEVICE)
            ks.append(ops.chunk_keys(k_cache, pt, p.num_tokens, p.offset, inv_freq.to(DEVICE)))
            vs.append(ops.gather_seq_kv(v_cache, pt, p.num_tokens))
            seen = torch.zeros(p.num_tokens)
            seen[positions[r] - p.offset + 1:] = float("-inf")  # keys past the row
            seen[list(p.recomputed)] = float("-inf")
            bias.append(seen)
        expected.append(ops.attention_with_lse(q[r:r + 1], torch.cat(ks), torch.cat(vs),
                                               torch.cat(bias)[None].to(DEVICE), scale)[0][0])
    expected = torch.stack(expected)
    staging = SegmentStaging(8, 256, inv_freq, k_cache.shape[2], torch.device(DEVICE), target_tasks=target_tasks,
                             max_masks=4, max_keys=1024)
    staging.pack([RunReads(r, np.array([positions[r]]), row, positions[r] == _PAST)
                  for r, row in enumerate(placements) if row], n)
    staging.upload()
    batch = staging.batch(n, packed=target_tasks > 2 or hidden)  # an eager step's: only the slots it writes
    assert batch.masked == hidden
    if target_tasks > 2:
        assert int(batch.num_items[0]) > 4  # the long chunk's key range is split
    own_lse = own_lse.to(DEVICE)
    for impl in (ops.segment_attention, tcascade.segment_attention):
        out = torch.full_like(q, float("nan"))
        impl(q, k_cache, v_cache, batch, own_out, own_lse, scale, out)
        torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), **TOL[dtype])
