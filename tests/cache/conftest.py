"""Factories for tiny caches. Every manager a test builds is integrity-checked at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from kvforge.cache import KVCache, KVCacheManager

ManagerFactory = Callable[..., KVCacheManager]


@pytest.fixture
def make_manager() -> Iterator[ManagerFactory]:
    """`make_manager(num_blocks=10, block_size=4, bytes_per_block=0)`; check_integrity() runs on
    every manager made, after the test."""
    made: list[KVCacheManager] = []

    def factory(num_blocks: int = 10, block_size: int = 4, bytes_per_block: int = 0) -> KVCacheManager:
        manager = KVCacheManager(num_blocks, block_size, bytes_per_block)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        manager.check_integrity()


@pytest.fixture
def manager(make_manager: ManagerFactory) -> KVCacheManager:
    """10 blocks of 4 slots."""
    return make_manager()


@pytest.fixture
def make_kv_cache() -> Callable[..., KVCache]:
    def factory(num_layers: int = 2, num_blocks: int = 6, block_size: int = 4, num_kv_heads: int = 2,
                head_dim: int = 8, dtype: torch.dtype = torch.float32) -> KVCache:
        return KVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype)

    return factory
