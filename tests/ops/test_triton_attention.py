"""Triton store_kv and paged_attention against their torch references.

Without a CUDA GPU the kernels run in Triton's interpreter on small CPU shapes; on a GPU the same
tests run on cuda tensors at real shapes (32/8 heads, head_dim 64 and 128, contexts to 4096).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton or a kernel module is first imported (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvforge import ops  # noqa: E402
from kvforge.ops.triton import attention as ta  # noqa: E402

GPU = torch.cuda.is_available()


@pytest.fixture
def device() -> str:
    return "cuda" if GPU else "cpu"


def _on_gpu(cpu, cuda):
    """A shape parameter: small when interpreted on CPU, real on a GPU."""
    return cuda if GPU else cpu


# ------------------------------------------------------------------------------------------
# store_kv
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("kv_heads,dim", [(3, 64), (8, 128)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_store_kv_writes_the_same_arena_as_the_reference_and_skips_negative_slots(device, block_size, kv_heads,
                                                                                  dim, slot_dtype, src_dtype):
    tokens = _on_gpu(37, 1000)
    num_blocks = tokens // block_size + 3
    # k and v as strided slices of one fused projection, stored into a bf16 arena.
    qkv = torch.randn(tokens, 5 * kv_heads * dim, device=device).to(src_dtype)
    k = qkv[:, kv_heads * dim:2 * kv_heads * dim].view(tokens, kv_heads, dim)
    v = qkv[:, 3 * kv_heads * dim:4 * kv_heads * dim].view(tokens, kv_heads, dim)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[::5] = -1  # padding rows
    slots = slots.to(slot_dtype)
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, device=device).to(torch.bfloat16) for _ in range(2)]
    expected = [c.clone() for c in caches]
    ops.store_kv(k, v, *expected, slots)
    ta.store_kv(k, v, *caches, slots)
    if src_dtype == torch.bfloat16 or GPU:
        assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    else:  # the interpreter casts float32 -> bf16 by truncation, a GPU (and torch) to nearest
        for got, want in zip(caches, expected):
            torch.testing.assert_close(got, want, atol=0, rtol=2 ** -7)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[slots >= 0].long()] = False
    assert torch.equal(caches[0].view(-1, kv_heads, dim)[untouched], expected[0].view(-1, kv_heads, dim)[untouched])


def test_reference_store_kv_skips_negative_slots():
    cache = torch.zeros(2, 4, 1, 2)
    ops.store_kv(torch.ones(3, 1, 2), torch.ones(3, 1, 2), cache, cache, torch.tensor([5, -1, 0], dtype=torch.int32))
    assert cache.view(8, 2)[:, 0].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]


# ------------------------------------------------------------------------------------------
# paged_attention
# ------------------------------------------------------------------------------------------

def _batch(device, q_lens, seq_lens, *, block_size, kv_heads, group, dim, dtype, padding_rows=2):
    """Random arena and a packed batch: each sequence owns shuffled blocks; table entries past a
    sequence's blocks are 0; `padding_rows` rows past cu[B]. Returns the paged_attention inputs."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq + [1]) + 1, dtype=torch.int32)
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu[-1]) + padding_rows, kv_heads * group, dim, device=device).to(dtype)
    return (q, k_cache, v_cache, cu.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
            tables.to(device))


def _check(q, k_cache, v_cache, cu, seq_lens, tables, *, splits, dtype, with_lse=True, tiles=None):
    scale = q.shape[-1] ** -0.5
    valid = int(cu[-1])
    want_out = torch.zeros_like(q)
    want_lse = torch.zeros(q.shape[:2], device=q.device)
    ops.paged_attention(q, k_cache, v_cache, cu, seq_lens, tables, scale, want_out, want_lse)
    out = torch.full_like(q, float("nan"))  # poisoned: every valid element must be written
    lse = torch.full(q.shape[:2], float("nan"), device=q.device) if with_lse else None
    q_lens = (cu[1:] - cu[:-1]).tolist()
    ta._paged_attention(q, k_cache, v_cache, cu, seq_lens, tables, scale, out, lse, max(q_lens + [1]), splits,
                        tiles)
    assert not out[:valid].isnan().any(), "rows left unwritten"
    assert out[valid:].isnan().all(), "padding rows past cu[B] were written"
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:valid].float(), want_out[:valid].float(), **tol)
    if with_lse:
        assert not lse[:valid].isnan().any()
        torch.testing.assert_close(lse[:valid], want_lse[:valid], **tol)  # -inf rows must match exactly


# (q_lens, seq_lens): decode-only, prefill from scratch, cached-context prefill, and a mix with
# padding sequences (seq_len 0) and an empty one (q_len 0).
DECODE = ([1, 1, 1, 1], [1, 17, 40, 100])
PREFILL = ([5, 23, 1], [5, 23, 1])
CONTEXT = ([7, 30, 3], [50, 45, 3])
MIXED = ([1, 12, 0, 1, 1, 9], [33, 70, 5, 0, 64, 9])
BIG_DECODE = ([1] * 64, [int(x) for x in torch.randint(1, 4097, (64,), generator=torch.Generator().manual_seed(1))])
BIG_MIXED = ([1] * 30 + [300, 0, 1, 700], [int(x) % 4000 + 1 for x in range(37, 37 + 30 * 131, 131)] + [4096, 7, 0, 2000])


@pytest.mark.parametrize("case", ["decode", "prefill", "context", "mixed"])
@pytest.mark.parametrize("splits", [1, 2, 7])
def test_paged_attention_matches_reference_fp32(device, case, splits):
    q_lens, seq_lens = {"decode": DECODE, "prefill": PREFILL, "context": CONTEXT,
                        "mixed": _on_gpu(MIXED, BIG_MIXED)}[case]
    torch.manual_seed(splits)
    kv_heads, group = {"decode": (2, 4), "prefill": (2, 1), "context": (3, 3), "mixed": _on_gpu((2, 3), (8, 4))}[case]
    block_size = 32 if case == "prefill" else 16
    batch = _batch(device, q_lens, seq_lens, block_size=block_size, kv_heads=kv_heads, group=group,
                   dim=_on_gpu(32, 128), dtype=torch.float32)
    _check(*batch, splits=splits, dtype=torch.float32)


@pytest.mark.parametrize("block_size,block_n", [(16, 64), (128, 32), (32, 16)])
def test_paged_attention_key_tile_independent_of_page_size(device, block_size, block_n):
    """BLOCK_N larger and smaller than the page: keys are located through the table per key."""
    torch.manual_seed(block_size)
    batch = _batch(device, *CONTEXT, block_size=block_size, kv_heads=2, group=4, dim=32, dtype=torch.float32)
    tiles = ta.attention_tiles(32, torch.float32, 4, max(CONTEXT[0]))._replace(block_n=block_n)
    _check(*batch, splits=2, dtype=torch.float32, tiles=tiles)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("splits", [1, 7])
def test_paged_attention_matches_reference_bf16_at_model_shapes(device, dim, splits):
    """bf16, the Llama-3.2-1B head layout (32 query heads over 8 KV heads on a GPU; 8 over 2 here)."""
    torch.manual_seed(dim + splits)
    q_lens, seq_lens = _on_gpu(([1, 6, 1], [40, 6, 90]), BIG_DECODE if splits > 1 else BIG_MIXED)
    batch = _batch(device, q_lens, seq_lens, block_size=16, kv_heads=_on_gpu(2, 8), group=4, dim=dim,
                   dtype=torch.bfloat16)
    _check(*batch, splits=splits, dtype=torch.bfloat16)


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_attention_without_lse_and_with_padding_sequences(device, splits):
    """lse=None; a CUDA-graph style padded batch: decode rows of sequences with seq_len 0 get out 0."""
    torch.manual_seed(5)
    q_lens, seq_lens = [1, 1, 1, 1], [20, 0, 7, 0]
    batch = _batch(device, q_lens, seq_lens, block_size=16, kv_heads=1, group=8, dim=32, dtype=torch.float32)
    _check(*batch, splits=splits, dtype=torch.float32, with_lse=False)
    q, *rest = batch
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    ta.paged_attention(q, *rest, 0.1, out, lse, max_query_len=1, num_splits=splits)
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))
    assert torch.isneginf(lse[[1, 3]]).all() and torch.isfinite(lse[[0, 2]]).all()


def test_paged_attention_rejects_mismatched_shapes(device):
    q, k_cache, v_cache, cu, seq_lens, tables = _batch(device, [1], [3], block_size=16, kv_heads=2, group=2, dim=32,
                                                       dtype=torch.float32)
    with pytest.raises(ValueError, match="lse"):
        ta.paged_attention(q, k_cache, v_cache, cu, seq_lens, tables, 1.0, torch.empty_like(q),
                           torch.empty(q.shape[:2], dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="multiple"):
        ta.paged_attention(q[:, :3], k_cache, v_cache, cu, seq_lens, tables, 1.0, torch.empty_like(q[:, :3]))


def test_choose_num_splits_fills_the_gpu_only_when_the_batch_does_not():
    assert ta.choose_num_splits(64, 8, 32768) == 1  # 512 programs already fill 132 SMs
    assert ta.choose_num_splits(1, 8, 32768) == 64  # ~4 programs per SM (66), at most 64 splits
    assert ta.choose_num_splits(1, 8, 600) == 2  # at least 256 keys per split
    assert ta.choose_num_splits(4, 8, 100) == 1
    assert ta.choose_num_splits(1, 1, 10 ** 6) == 64
    assert ta.choose_num_splits(2, 8, 32768) == 33  # 16 programs: 33 splits give ~4 per SM


def test_attention_tiles_pack_the_gqa_group_into_the_tile_rows():
    decode = ta.attention_tiles(64, torch.bfloat16, 4, 1)
    assert decode.block_m == 16 and decode.block_q == 4
    prefill = ta.attention_tiles(64, torch.bfloat16, 4, 512)
    assert prefill.block_m == 128 and prefill.block_q == 32
    odd = ta.attention_tiles(64, torch.float32, 3, 1)
    assert odd.block_q * 3 <= odd.block_m and odd.block_m >= 16
    assert decode.num_stages == 3 and ta.attention_tiles(64, torch.bfloat16, 4, 1, ta.INT4_CHANNELS.value).num_stages == 2
