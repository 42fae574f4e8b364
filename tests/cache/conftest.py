"""Factories for tiny caches. Every manager a test builds is integrity-checked at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from kvforge.cache import KVCache, KVCacheManager, PrefixMatch

ManagerFactory = Callable[..., KVCacheManager]

A = list(range(100, 110))  # a 10-token prompt: two full blocks of 4 and two more tokens
B = list(range(200, 212))  # a 12-token prompt: three full blocks, nothing shared with A


@pytest.fixture
def make_manager() -> Iterator[ManagerFactory]:
    """`make_manager(num_blocks=10, block_size=4, bytes_per_block=0, **options)` (options:
    enable_prefix_caching, max_pinned_fraction, max_kv_events); check_integrity() runs on every
    manager made, after the test."""
    made: list[KVCacheManager] = []

    def factory(num_blocks: int = 10, block_size: int = 4, bytes_per_block: int = 0, **options) -> KVCacheManager:
        manager = KVCacheManager(num_blocks, block_size, bytes_per_block, **options)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        manager.check_integrity()


@pytest.fixture
def manager(make_manager: ManagerFactory) -> KVCacheManager:
    """10 blocks of 4 slots."""
    return make_manager()


def prefill(m: KVCacheManager, seq_id: int, tokens: list[int], capacity: int = 40, extra: bytes = b"",
            commit: bool = True) -> PrefixMatch:
    """What the engine does for a new request: match its prompt, register it from the match, append
    the uncached rest and (by default) commit the prompt. Returns the match."""
    match = m.match_prefix(tokens, extra)
    m.add_sequence(seq_id, capacity, prefix=match, extra=extra)
    m.append(seq_id, len(tokens) - match.num_tokens)
    if commit:
        m.commit(seq_id, tokens)
    return match


def free_ids(m: KVCacheManager) -> list[int]:
    """The free queue, head (next allocated) first."""
    return [b.block_id for b in m.pool.free_queue.get_all_free_blocks()]


def refs(m: KVCacheManager) -> list[int]:
    """Every block's ref count, in id order."""
    return [b.ref_cnt for b in m.pool.blocks]


@pytest.fixture
def make_kv_cache() -> Callable[..., KVCache]:
    def factory(num_layers: int = 2, num_blocks: int = 6, block_size: int = 4, num_kv_heads: int = 2,
                head_dim: int = 8, dtype: torch.dtype = torch.float32) -> KVCache:
        return KVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype)

    return factory
