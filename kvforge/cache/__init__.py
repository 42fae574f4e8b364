"""The paged KV cache: blocks and their pool, the tensor arena, and the manager the engine uses.

Usable with no model and no server; imports only torch, the stdlib and `kvforge.config`.
"""

from kvforge.cache.blocks import Block, BlockPool, FreeBlockQueue, NoFreeBlocksError
from kvforge.cache.kv_cache import KVCache
from kvforge.cache.manager import CacheOverflowError, CacheStats, KVCacheManager, UnknownSequenceError

__all__ = [
    "Block",
    "BlockPool",
    "CacheOverflowError",
    "CacheStats",
    "FreeBlockQueue",
    "KVCache",
    "KVCacheManager",
    "NoFreeBlocksError",
    "UnknownSequenceError",
]
