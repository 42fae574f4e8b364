"""Storage tiers below the KV arena: a tiny protocol over bytes (`Tier`: contains / get / put /
delete and batched forms) with three backends (process memory, a directory, a Redis server), the
`MeteredTier` wrapper that counts their work and absorbs their faults, and specs that name them
("host:4GiB", "disk:/var/cache/kvforge:50GiB", "redis://127.0.0.1:6379/0").

Transport only: what the bytes mean (block headers, checksums) is the codec's business.
"""

from kvforge.cache.tiers.base import FAULT_KINDS, MAX_KEY_BYTES, Tier
from kvforge.cache.tiers.disk import DiskTier
from kvforge.cache.tiers.host import HostTier
from kvforge.cache.tiers.metered import MeteredTier, TierStats
from kvforge.cache.tiers.redis import RedisTier
from kvforge.cache.tiers.spec import open_tier, parse_size, validate_tier_spec

__all__ = [
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
