"""KVCache: the fixed arena layout, its byte sizes, and `store` writing to the right slots."""

from __future__ import annotations

import pytest
import torch

from kvforge.cache import KVCache


def test_each_layer_has_k_and_v_of_the_fixed_layout(make_kv_cache):
    cache = make_kv_cache(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8)
    assert len(cache.k) == len(cache.v) == 3
    for t in cache.k + cache.v:
        assert t.shape == (6, 4, 2, 8)  # [num_blocks, block_size, num_kv_heads, head_dim]
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.is_contiguous()
        assert not t.any()
    # every tensor is its own storage
    ptrs = {t.data_ptr() for t in cache.k + cache.v}
    assert len(ptrs) == 6


def test_byte_sizes_count_k_and_v_over_all_layers(make_kv_cache):
    cache = make_kv_cache(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8)
    assert cache.bytes_per_block == 2 * 3 * 4 * 2 * 8 * 4 == 1536
    assert cache.bytes_per_token == 384
    assert cache.nbytes == 6 * 1536 == sum(t.nbytes for t in cache.k + cache.v)


def test_block_bytes_sizes_a_pool_before_allocating():
    assert KVCache.block_bytes(30, 16, 3, 64, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4
    assert KVCache.block_bytes(30, 16, 3, 64, torch.bfloat16) == 2 * 30 * 16 * 3 * 64 * 2


def test_bfloat16_arena(make_kv_cache):
    cache = make_kv_cache(dtype=torch.bfloat16)
    assert cache.k[0].dtype == torch.bfloat16
    assert cache.nbytes == sum(t.nbytes for t in cache.k + cache.v)


def test_store_writes_each_token_to_block_id_times_block_size_plus_offset(make_kv_cache):
    cache = make_kv_cache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8)
    k = torch.randn(3, 2, 8)
    v = torch.randn(3, 2, 8)
    slots = [5 * 4 + 3, 2 * 4 + 0, 0 * 4 + 1]  # (block 5, offset 3), (block 2, 0), (block 0, 1)
    cache.store(1, k, v, torch.tensor(slots))
    for i, (block, offset) in enumerate([(5, 3), (2, 0), (0, 1)]):
        assert torch.equal(cache.k[1][block, offset], k[i])
        assert torch.equal(cache.v[1][block, offset], v[i])
    assert int((cache.k[1] != 0).any(dim=(2, 3)).sum()) == 3  # nothing else written
    assert not cache.k[0].any() and not cache.v[0].any()  # other layers untouched


def test_store_accepts_a_list_and_casts_to_the_arena_dtype(make_kv_cache):
    cache = make_kv_cache(dtype=torch.bfloat16)
    k = torch.full((1, 2, 8), 1.5, dtype=torch.float32)
    cache.store(0, k, -k, [7])
    assert torch.equal(cache.k[0][1, 3], torch.full((2, 8), 1.5, dtype=torch.bfloat16))
    assert torch.equal(cache.v[0][1, 3], torch.full((2, 8), -1.5, dtype=torch.bfloat16))


def test_store_overwrites_a_slot(make_kv_cache):
    cache = make_kv_cache()
    cache.store(0, torch.ones(1, 2, 8), torch.ones(1, 2, 8), [4])
    cache.store(0, torch.full((1, 2, 8), 2.0), torch.full((1, 2, 8), 3.0), [4])
    assert torch.equal(cache.k[0][1, 0], torch.full((2, 8), 2.0))
    assert torch.equal(cache.v[0][1, 0], torch.full((2, 8), 3.0))


def test_store_rejects_mismatched_shapes_and_layers(make_kv_cache):
    cache = make_kv_cache()
    with pytest.raises(ValueError, match=r"k, v \[T, 2, 8\]"):
        cache.store(0, torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), [0, 1])
    with pytest.raises(ValueError, match="slot_mapping"):
        cache.store(0, torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), [0])
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        cache.store(2, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), [0])


@pytest.mark.parametrize("field", ["num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"])
def test_every_dimension_must_be_positive(field):
    dims = dict(num_layers=1, num_blocks=1, block_size=1, num_kv_heads=1, head_dim=1)
    dims[field] = 0
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        KVCache(**dims)
