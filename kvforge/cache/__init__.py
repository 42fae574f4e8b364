"""The paged KV cache: blocks and their pool, block hashing, the prefix index, the tensor arena,
and the manager the engine uses.

Usable with no model and no server; imports only torch, numpy, the stdlib and `kvforge.ops`.
"""

from kvforge.cache.blocks import Block, BlockPool, FreeBlockQueue, NoFreeBlocksError
from kvforge.cache.chunks import ChunkBudgetError
from kvforge.cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvforge.cache.hashing import extra_keys, hash_block
from kvforge.cache.kv_cache import KVCache
from kvforge.cache.manager import KVCacheManager
from kvforge.cache.pins import PinHandle
from kvforge.cache.radix import PrefixMatch, token_array
from kvforge.cache.sequence import CacheOverflowError, UnknownSequenceError
from kvforge.cache.stats import CacheStats

__all__ = [
    "AllBlocksCleared",
    "Block",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "CacheOverflowError",
    "CacheStats",
    "ChunkBudgetError",
    "FreeBlockQueue",
    "KVCache",
    "KVCacheManager",
    "KVEvent",
    "NoFreeBlocksError",
    "PinHandle",
    "PrefixMatch",
    "UnknownSequenceError",
    "extra_keys",
    "hash_block",
    "token_array",
]
