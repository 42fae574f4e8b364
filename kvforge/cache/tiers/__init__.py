"""Storage tiers below the KV arena: a tiny protocol over bytes (`Tier`: contains / get / put /
delete and batched forms) with three backends (process memory, a directory, a Redis server), the
`MeteredTier` wrapper that counts their work and absorbs their faults, and specs that name them
("host:4GiB", "disk:/var/cache/kvforge:50GiB", "redis://127.0.0.1:6379/0").

What the bytes mean (block headers, checksums) is `codec.py`'s business, kept apart from transport;
`store.py` puts the two together over the arena for the cache manager.
"""

from kvforge.cache.tiers.base import FAULT_KINDS, MAX_KEY_BYTES, Tier
from kvforge.cache.tiers.codec import BlockFormat, BlockRejected, decode_block, encode_block
from kvforge.cache.tiers.disk import DiskTier
from kvforge.cache.tiers.host import HostTier
from kvforge.cache.tiers.metered import MeteredTier, TierStats
from kvforge.cache.tiers.redis import RedisTier
from kvforge.cache.tiers.spec import open_tier, parse_size, validate_tier_spec
from kvforge.cache.tiers.store import StoredBlock, StoreStats, TieredStore

__all__ = [
    "BlockFormat",
    "BlockRejected",
    "StoreStats",
    "StoredBlock",
    "TieredStore",
    "decode_block",
    "encode_block",
    "FAULT_KINDS",
    "MAX_KEY_BYTES",
    "DiskTier",
    "HostTier",
    "MeteredTier",
    "RedisTier",
    "Tier",
    "TierStats",
    "open_tier",
    "parse_size",
    "validate_tier_spec",
]
