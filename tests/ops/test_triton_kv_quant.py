"""Triton kernels over quantized KV pages (int8, int4, fp8_e4m3, fp8_e5m2) against the torch
references: store_kv quantizing as it stores (int4 keys re-quantizing their blocks), and
paged_attention / chunk_attention dequantizing tiles as they load them.

Without a CUDA GPU the kernels run in Triton's interpreter on small CPU shapes, where the stored
codes and scales must equal the reference's bit for bit; on a GPU (fused multiply-adds, other
rounding of the dequantized int4 keys) a code may differ by one and a scale by a float16 ulp. The
real-shape tests need a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton or a kernel module is first imported (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvforge import ops  # noqa: E402
from kvforge.ops.triton import attention as ta  # noqa: E402
from kvforge.ops.triton import cascade as tcascade  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="real shapes need a GPU")
FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")


def _arena(fmt, num_blocks, block_size, kv_heads, dim):
    """Zeroed (k, v, k_scale, v_scale) of `fmt` on the CPU, where the references run."""
    layout = ops.kv_layout(fmt, block_size, kv_heads, dim, torch.float32)
    return layout.allocate(num_blocks, block_size, kv_heads, torch.device("cpu"))


def _on_device(arena):
    """A copy of an arena on DEVICE, for the kernels."""
    return tuple(t.to(DEVICE, copy=True) for t in arena)


def _codes(data: torch.Tensor) -> torch.Tensor:
    """Page data as integers where neighbouring codes differ by 1: int8 values, int4 nibbles, and
    float8 values' ranks on their grid (sign and magnitude bits; +0 and -0 are both 0)."""
    if data.dtype == torch.int8:
        return data.long()
    bits = data.view(torch.uint8).long()
    if data.dtype == torch.uint8:
        return torch.stack((bits & 0xF, bits >> 4), dim=-1)
    return torch.where(bits >= 0x80, -(bits & 0x7F), bits)


def _assert_same_pages(got, want):
    """Two arenas (k, v, k_scale, v_scale) hold the same codes and scales: exactly when interpreted,
    within one code and a float16 ulp on a GPU."""
    for g, w in zip(got, want):
        if g.dtype == torch.float16:
            torch.testing.assert_close(g.cpu(), w.cpu(), atol=0, rtol=2 ** -10 if GPU else 0)
        else:
            assert (_codes(g.cpu()) - _codes(w.cpu())).abs().max() <= (1 if GPU else 0)


def _slots(table, start, count, block_size):
    """Slots of positions start .. start + count - 1 through a block table `[nb]`."""
    pos = torch.arange(start, start + count)
    return table[pos // block_size].long() * block_size + pos % block_size


# ------------------------------------------------------------------------------------------
# store_kv
# ------------------------------------------------------------------------------------------

BS, KVH, D = 4, 2, 16
# Three sequences over shuffled blocks: a prefill from scratch, a prefill after cached context (its
# first block partly filled), then decode steps, one row each; padding rows (-1) in every step.
TABLES = torch.tensor([[7, 2, 9], [4, 0, 5], [3, 8, 1]])
STEPS = [  # (start position, new tokens) per sequence, per step
    [(0, 6), (0, 3), (0, 1)],
    [(6, 1), (3, 6), (1, 1)],
    [(7, 1), (9, 1), (2, 1)],
    [(8, 1), (10, 1), (3, 1)],
]


def _step_rows(step, dtype=torch.float32, seed=0):
    """One step's packed k, v (strided slices of a fused projection) and slots, with padding rows."""
    g = torch.Generator().manual_seed(seed)
    slots = []
    for b, (start, n) in enumerate(step):
        slots += _slots(TABLES[b], start, n, BS).tolist() + [-1]
    tokens = len(slots)
    qkv = (torch.randn(tokens, 4 * KVH * D, generator=g) * torch.rand(tokens, 1, generator=g) * 4).to(dtype)
    k = qkv[:, KVH * D:2 * KVH * D].view(tokens, KVH, D)
    v = qkv[:, 3 * KVH * D:].view(tokens, KVH, D)
    return k.to(DEVICE), v.to(DEVICE), torch.tensor(slots, device=DEVICE)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_quantizes_prefills_and_decodes_like_the_reference(fmt, slot_dtype):
    want = _arena(fmt, 10, BS, KVH, D)
    got = _on_device(want)
    for i, step in enumerate(STEPS):
        k, v, slots = _step_rows(step, seed=i)
        ops.store_kv(k.cpu(), v.cpu(), *want[:2], slots.cpu(), *want[2:])
        ta.store_kv(k, v, *got[:2], slots.to(slot_dtype), *got[2:])
        _assert_same_pages(got, want)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_store_kv_quantizes_bfloat16_rows(fmt):
    want = _arena(fmt, 10, BS, KVH, D)
    got = _on_device(want)
    k, v, slots = _step_rows(STEPS[0], dtype=torch.bfloat16)
    ops.store_kv(k.cpu(), v.cpu(), *want[:2], slots.cpu(), *want[2:])
    ta.store_kv(k, v, *got[:2], slots, *got[2:])
    _assert_same_pages(got, want)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_rounding_is_to_nearest_even_over_the_whole_grid(fp8):
    """Rows whose scale is exactly 1 (their absmax is the format's largest value): every float8
    value, every midpoint between neighbours (ties) and points beside them, subnormals included,
    must land where torch's cast puts them."""
    fmt = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}[fp8]
    top = torch.finfo(fp8).max
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat((grid, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)))
    values = torch.cat((values, -values))
    dim = 32
    rows = torch.cat((values, torch.zeros(-values.numel() % (dim - 1)))).view(-1, dim - 1)
    x = torch.cat((torch.full((rows.shape[0], 1), top), rows), dim=1)[:, None, :]  # [T, 1, dim]
    kc, vc, ks, vs = _on_device(_arena(fmt, rows.shape[0], 1, 1, dim))
    ta.store_kv(x.to(DEVICE), x.to(DEVICE), kc, vc, torch.arange(rows.shape[0], device=DEVICE), ks, vs)
    assert torch.equal(ks.cpu().float(), torch.ones_like(ks.cpu().float()))
    assert torch.equal(kc.cpu().view(torch.uint8).view(x.shape), x.to(fp8).view(torch.uint8))


def test_int4_keys_written_token_by_token_match_the_reference_block_by_block():
    """Decode steps into partly filled blocks: every step re-quantizes the block over its tokens so
    far; the first tokens of a block reused after holding stale, larger values ignore them."""
    g = torch.Generator().manual_seed(3)
    want = _arena("int4", 4, BS, KVH, D)
    want[0].copy_(torch.randint(0, 256, want[0].shape, generator=g, dtype=torch.uint8))  # stale codes
    want[2].copy_(torch.full(want[2].shape, 50.0))
    got = _on_device(want)
    table = torch.tensor([2, 0, 3])
    rows = torch.randn(10, KVH, D, generator=g) * torch.linspace(0.5, 3, 10)[:, None, None]  # ranges widen
    for start, n in [(0, 1), (1, 1), (2, 2), (4, 1), (5, 1), (6, 1), (7, 1), (8, 2)]:
        k = rows[start:start + n]
        slots = _slots(table, start, n, BS)
        ops.store_kv(k, k, *want[:2], slots, *want[2:])
        ta.store_kv(k.to(DEVICE), k.to(DEVICE), *got[:2], slots.to(DEVICE), *got[2:])
        _assert_same_pages(got, want)


def test_int4_key_runs_break_at_block_ends_and_between_sequences():
    """Rows of two sequences whose slots continue across a block boundary (7 -> 8) are two runs;
    a prefill spanning three blocks from mid-block is three."""
    want = _arena("int4", 8, BS, KVH, D)
    g = torch.Generator().manual_seed(4)
    first = torch.randn(2, KVH, D, generator=g)
    ops.store_kv(first, first, want[0], want[1], torch.tensor([20, 21]), want[2], want[3])  # context in block 5
    got = _on_device(want)
    slots = torch.tensor([6, 7, 8, 9, -1, 22, 23, 12, 13, 14, 15, 24, -1])
    k = torch.randn(slots.numel(), KVH, D, generator=g) * 2
    ops.store_kv(k, k, *want[:2], slots, *want[2:])
    ta.store_kv(k.to(DEVICE), k.to(DEVICE), *got[:2], slots.to(DEVICE), *got[2:])
    _assert_same_pages(got, want)


def test_store_kv_rejects_scales_that_do_not_fit_the_pages():
    kc, vc, ks, vs = _on_device(_arena("int8", 4, BS, KVH, D))
    k = torch.randn(2, KVH, D, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="both"):
        ta.store_kv(k, k, kc, vc, slots, ks, None)
    with pytest.raises(ValueError, match="v_scale"):
        ta.store_kv(k, k, kc, vc, slots, ks, vs[:, :2])
    with pytest.raises(ValueError, match="int4"):
        ta.store_kv(k, k, kc.view(torch.uint8), vc.view(torch.uint8), slots, ks, vs)  # int4 scales are per channel


# ------------------------------------------------------------------------------------------
# paged_attention
# ------------------------------------------------------------------------------------------

def _attention_batch(fmt, q_lens, seq_lens, *, block_size, kv_heads, group, dim, dtype, seed):
    """A quantized arena filled by the reference store (each sequence over shuffled blocks; table
    entries past its blocks 0) and a packed query batch with two padding rows."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    kc, vc, ks, vs = _arena(fmt, num_blocks, block_size, kv_heads, dim)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq + [1]) + 1, dtype=torch.int32)
    for b, (nb, n) in enumerate(zip(blocks_per_seq, seq_lens)):
        tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)
        kv = torch.randn(2, n, kv_heads, dim, generator=g)
        ops.store_kv(kv[0], kv[1], kc, vc, _slots(tables[b], 0, n, block_size), ks, vs)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu[-1]) + 2, kv_heads * group, dim, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (q, kc, vc, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, ks, vs)]


def _rope(dim, theta=10000.0):
    """A rope table: int4 pages hold keys before RoPE, and their readers rotate them with it."""
    return ops.rope_table(ops.rope_inv_freq(dim, theta).float(), 16384)


def _check_attention(q, kc, vc, cu, seq_lens, tables, ks, vs, *, splits, tol):
    """Triton paged_attention over the quantized pages against the reference on the same pages."""
    scale = q.shape[-1] ** -0.5
    valid = int(cu[-1])
    rope = _rope(q.shape[-1], 500000.0)
    want_out, want_lse = torch.zeros_like(q).cpu(), torch.zeros(q.shape[:2])
    ops.paged_attention(q.cpu(), kc.cpu(), vc.cpu(), cu.cpu(), seq_lens.cpu(), tables.cpu(), scale, want_out,
                        want_lse, k_scale=ks.cpu(), v_scale=vs.cpu(), rope_table=rope)
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    q_lens = (cu[1:] - cu[:-1]).tolist()
    ta.paged_attention(q, kc, vc, cu, seq_lens, tables, scale, out, lse, max(q_lens), splits, ks, vs,
                       rope.to(q.device))
    assert out[valid:].isnan().all(), "padding rows past cu[B] were written"
    torch.testing.assert_close(out[:valid].cpu().float(), want_out[:valid].float(), **tol)
    torch.testing.assert_close(lse[:valid].cpu(), want_lse[:valid], **tol)


F32 = dict(atol=2e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)
# decode rows, a cached-context prefill, a prefill from scratch, a padding sequence (seq_len 0)
MIXED = ([1, 7, 1, 5, 1], [40, 30, 1, 5, 0])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_attention_over_quantized_pages_matches_the_reference(fmt, splits):
    """GQA (3 query heads per kv head), decodes and prefills in one batch, split-K."""
    batch = _attention_batch(fmt, *MIXED, block_size=16, kv_heads=2, group=3, dim=32, dtype=torch.float32,
                             seed=splits)
    _check_attention(*batch, splits=splits, tol=F32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_paged_attention_over_quantized_pages_with_bfloat16_queries(fmt):
    """bf16 queries: the dequantized tiles are rounded to bf16 for the products."""
    batch = _attention_batch(fmt, [1, 6, 1], [40, 6, 21], block_size=16, kv_heads=2, group=4, dim=64,
                             dtype=torch.bfloat16, seed=7)
    _check_attention(*batch, splits=2, tol=BF16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_steps_store_then_attend_like_the_reference(fmt):
    """Prefill and decode steps of three sequences, every step stored and attended by the Triton
    kernels on one arena and by the references on another: the same pages, the same outputs."""
    want = _arena(fmt, 10, BS, KVH, D)
    got = _on_device(want)
    group = 2
    for i, step in enumerate(STEPS):
        k, v, slots = _step_rows(step, seed=10 + i)
        ops.store_kv(k.cpu(), v.cpu(), want[0], want[1], slots.cpu(), want[2], want[3])
        ta.store_kv(k, v, *got[:2], slots, *got[2:])
        q_lens = [n for _, n in step]
        cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor([s + n for s, n in step], dtype=torch.int32)
        q = torch.randn(int(cu[-1]), KVH * group, D, generator=torch.Generator().manual_seed(i))
        want_out, out = torch.empty_like(q), torch.empty_like(q, device=DEVICE)
        ops.paged_attention(q, want[0], want[1], cu, seq_lens, TABLES.int(), 0.3, want_out, None, k_scale=want[2],
                            v_scale=want[3], rope_table=_rope(D))
        ta.paged_attention(q.to(DEVICE), *got[:2], cu.to(DEVICE), seq_lens.to(DEVICE), TABLES.int().to(DEVICE), 0.3,
                           out, None, max(q_lens), 2, got[2], got[3], _rope(D).to(DEVICE))
        _assert_same_pages(got, want)
        tol = dict(atol=5e-2, rtol=5e-2) if GPU else F32  # a GPU may store some codes one step apart
        torch.testing.assert_close(out.cpu(), want_out, **tol)


def test_paged_attention_rejects_half_a_pair_of_scales():
    q, kc, vc, cu, seq_lens, tables, ks, vs = _attention_batch("int8", [1], [3], block_size=16, kv_heads=2, group=2,
                                                               dim=32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="both"):
        ta.paged_attention(q, kc, vc, cu, seq_lens, tables, 1.0, torch.empty_like(q), k_scale=ks)


def test_int4_pages_need_a_rope_table_to_be_read():
    """int4 keys are stored before RoPE: reading them without the table that rotates them is refused."""
    q, kc, vc, cu, seq_lens, tables, ks, vs = _attention_batch("int4", [1], [3], block_size=16, kv_heads=2, group=2,
                                                               dim=32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="rope_table"):
        ta.paged_attention(q, kc, vc, cu, seq_lens, tables, 1.0, torch.empty_like(q), None, 1, 1, ks, vs)
    with pytest.raises(ValueError, match="rope_table"):
        ta.paged_attention(q, kc, vc, cu, seq_lens, tables, 1.0, torch.empty_like(q), None, 1, 1, ks, vs,
                           _rope(16).to(DEVICE))  # a table of another head_dim


# ------------------------------------------------------------------------------------------
# chunk_attention
# ------------------------------------------------------------------------------------------

def _quantized_chunk(fmt, g, num_tokens, page, kv_heads, dim):
    """A chunk's K/V quantized by the reference store on shuffled pages, the rest of the arena
    holding random codes (never read: the table has one page more than the chunk needs)."""
    pages = max(1, math.ceil(num_tokens / page))
    kc, vc, ks, vs = _arena(fmt, pages + 3, page, kv_heads, dim)
    for t in (kc, vc):
        t.view(torch.uint8).copy_(torch.randint(0, 0x70, t.shape, generator=g, dtype=torch.uint8))
    table = torch.randperm(pages + 3, generator=g)[:pages + 1].to(torch.int32)
    kv = torch.randn(2, num_tokens, kv_heads, dim, generator=g)
    ops.store_kv(kv[0], kv[1], kc, vc, _slots(table, 0, num_tokens, page), ks, vs)
    return [t.to(DEVICE) for t in (kc, vc, table, ks, vs)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset,splits", [(0, 1), (5000, 3)])
def test_chunk_attention_over_quantized_pages_matches_the_reference(fmt, offset, splits):
    """Keys dequantized, then re-rotated by `offset`; a bias hiding every key from one row; GQA."""
    g = torch.Generator().manual_seed(offset + splits)
    n, kv_heads, group, dim, num_tokens = 5, 2, 2, 32, 150
    kc, vc, table, ks, vs = _quantized_chunk(fmt, g, num_tokens, 16, kv_heads, dim)
    q = torch.randn(n, kv_heads * group, dim, generator=g)
    bias = torch.zeros(n, num_tokens).masked_fill_(torch.rand(n, num_tokens, generator=g) < 0.4, float("-inf"))
    bias[1] = float("-inf")
    inv_freq = ops.rope_inv_freq(dim, 10000.0).float()
    rope = _rope(dim)
    out, lse = tcascade._chunk_attention(q.to(DEVICE), kc, vc, table, num_tokens, offset, inv_freq, bias.to(DEVICE),
                                         0.2, num_splits=splits, k_scale=ks, v_scale=vs, rope_table=rope.to(DEVICE))
    want_out, want_lse = ops.chunk_attention(q, kc.cpu(), vc.cpu(), table.cpu(), num_tokens, offset, inv_freq, bias,
                                             0.2, ks.cpu(), vs.cpu(), rope)
    torch.testing.assert_close(out.cpu(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[1]).all()


def _check_bf16_chunk(fmt, seed, num_tokens, kv_heads, dim, rows, heads, offset, theta, scale):
    """Triton chunk_attention of `rows` bf16 query rows over a quantized chunk against the reference."""
    g = torch.Generator().manual_seed(seed)
    kc, vc, table, ks, vs = _quantized_chunk(fmt, g, num_tokens, 16, kv_heads, dim)
    q = torch.randn(rows, heads, dim, generator=g).bfloat16()
    inv_freq = ops.rope_inv_freq(dim, theta).float()
    rope = _rope(dim, theta)
    out, lse = tcascade.chunk_attention(q.to(DEVICE), kc, vc, table, num_tokens, offset, inv_freq, None, scale, ks, vs,
                                        rope.to(DEVICE))
    want_out, want_lse = ops.chunk_attention(q.float(), kc.cpu(), vc.cpu(), table.cpu(), num_tokens, offset, inv_freq,
                                             None, scale, ks.cpu(), vs.cpu(), rope)
    torch.testing.assert_close(out.cpu(), want_out, **BF16)
    torch.testing.assert_close(lse.cpu(), want_lse, **BF16)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_chunk_attention_over_quantized_pages_with_bfloat16_queries(fmt):
    _check_bf16_chunk(fmt, 9, num_tokens=40, kv_heads=1, dim=32, rows=3, heads=2, offset=700, theta=10000.0, scale=0.2)


# ------------------------------------------------------------------------------------------
# the custom ops
# ------------------------------------------------------------------------------------------

def test_custom_ops_take_the_scales_and_trace_in_one_graph():
    """kvforge::store_kv mutates the scales with the pages; both ops trace under torch.compile with
    them (on CPU the ops run the torch references, on a GPU the Triton kernels)."""

    def step(k, v, q, kc, vc, ks, vs, slots, cu, lens, tables, rope):
        torch.ops.kvforge.store_kv(k, v, kc, vc, slots, ks, vs)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        torch.ops.kvforge.paged_attention(q, kc, vc, cu, lens, tables, 0.35, out, lse, 3, 1, ks, vs, rope)
        return out, lse

    def inputs():
        g = torch.Generator().manual_seed(0)
        k, v = torch.randn(2, 4, KVH, D, generator=g)
        q = torch.randn(4, 2 * KVH, D, generator=g)
        arena = _on_device(_arena("int4", 6, BS, KVH, D))
        slots = torch.tensor([2, 3, 4, 14], dtype=torch.int32)
        cu = torch.tensor([0, 3, 4], dtype=torch.int32)
        lens = torch.tensor([5, 3], dtype=torch.int32)
        tables = torch.tensor([[0, 1], [3, 5]], dtype=torch.int32)
        return [t.to(DEVICE) for t in (k, v, q, *arena, slots, cu, lens, tables, _rope(D))]

    eager, compiled = inputs(), inputs()
    want = step(*eager)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w)
    for g_, w in zip(compiled[3:7], eager[3:7]):  # pages and scales written in place
        assert torch.equal(g_, w)
    assert compiled[5].abs().sum() > 0


# ------------------------------------------------------------------------------------------
# real shapes
# ------------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_real_shape_store_kv_of_prefills_then_a_decode_step(fmt):
    """Llama-3.2-1B's kv layout (8 kv heads, D 64), pages of 16, bf16 rows: 64 sequences prefill
    ~1000 rows after cached contexts of 0-40 tokens, then decode one row each (a CUDA-graph step
    with 16 padding rows)."""
    block_size, kv_heads, dim, seqs = 16, 8, 64, 64
    g = torch.Generator().manual_seed(1)
    tables = torch.randperm(seqs * 6, generator=g).view(seqs, 6)
    context = torch.randint(0, 41, (seqs,), generator=g)
    new = torch.randint(1, 31, (seqs,), generator=g)
    prefill = torch.cat([_slots(tables[b], int(context[b]), int(new[b]), block_size) for b in range(seqs)])
    decode = torch.cat([_slots(tables[b], int(context[b] + new[b]), 1, block_size) for b in range(seqs)]
                       + [torch.full((16,), -1)])
    want = _arena(fmt, seqs * 6, block_size, kv_heads, dim)
    ops.store_kv(*torch.randn(2, seqs * 6 * block_size, kv_heads, dim, generator=g), want[0], want[1],
                 torch.arange(seqs * 6 * block_size), want[2], want[3])  # stale pages
    got = _on_device(want)
    for slots in (prefill, decode):
        k, v = (torch.randn(2, slots.numel(), kv_heads, dim, generator=g) * 3).bfloat16()
        ops.store_kv(k, v, *want[:2], slots, *want[2:])
        ta.store_kv(k.to(DEVICE), v.to(DEVICE), *got[:2], slots.to(DEVICE), *got[2:])
        _assert_same_pages(got, want)


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("splits", [1, 8])
def test_real_shape_paged_attention_over_quantized_pages(fmt, splits):
    """bf16, 32 query heads over 8 kv heads, D 64: 30 decodes to 4096 keys and a 300-token prefill."""
    g = torch.Generator().manual_seed(splits)
    seq_lens = [int(x) for x in torch.randint(1, 4097, (30,), generator=g)] + [600]
    batch = _attention_batch(fmt, [1] * 30 + [300], seq_lens, block_size=16, kv_heads=8, group=4, dim=64,
                             dtype=torch.bfloat16, seed=splits)
    _check_attention(*batch, splits=splits, tol=BF16)


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_real_shape_chunk_attention_over_quantized_pages(fmt):
    """64 bf16 decoding rows over a 4096-token quantized chunk re-rotated by 5000."""
    _check_bf16_chunk(fmt, 2, num_tokens=4096, kv_heads=8, dim=64, rows=64, heads=32, offset=5000, theta=500000.0,
                      scale=0.125)
