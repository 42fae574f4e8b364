"""Tier specs: one string names a storage tier (for configuration and the command line).

    | form                           | example                          | tier                      |
    | host:<size>                    | host:4GiB                        | HostTier(4 << 30)         |
    | disk:<path>:<size>             | disk:/var/cache/kvforge:50GiB    | DiskTier(path, 50 << 30)  |
    | redis://host:port/db[?ttl=S]   | redis://127.0.0.1:6379/0?ttl=600 | RedisTier(url)            |

A disk path may itself contain ':' (the size follows the last one) and may start with '~'. Redis
also takes rediss:// (TLS), unix:///path/to/redis.sock and valkey:// / valkeys://. Sizes are read
by `parse_size`. Kinds live in a small registry, so an unknown spec is answered with every form.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kvforge.cache.tiers.base import SIZE_UNITS, Tier
from kvforge.cache.tiers.disk import DiskTier
from kvforge.cache.tiers.host import HostTier
from kvforge.cache.tiers.redis import RedisTier, parse_redis_url

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_UNITS = {unit.lower(): size for unit, size in SIZE_UNITS.items()}
_UNIT_NAMES = "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024)"
REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")


def parse_size(text: str) -> int:
    """Bytes from "4GiB", "50 GB", "1.5MiB", "4096" (a plain number is bytes). Units, any case:
    B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024); a fraction of a byte is
    dropped ("1.5KiB" = 1536). Raises ValueError for anything else (a negative, an unknown unit, a
    fraction of plain bytes)."""
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    unit = _UNITS.get(m[2].lower() or "b") if m else None
    if unit is None or (unit == 1 and "." in m[1]):
        raise ValueError(f"bad size {text!r}: give a number of bytes with an optional unit ({_UNIT_NAMES}), "
                         f"e.g. 4GiB or 500MB")
    return int(Decimal(m[1]) * unit)


@dataclass(frozen=True)
class TierKind:
    """One kind of tier in the registry: `form` shows its syntax by example; `parse(spec)` checks a
    spec of this kind without opening anything and returns the arguments of `make`."""

    name: str
    form: str
    parse: Callable[[str], dict[str, Any]]
    make: Callable[..., Tier]


def _parse_capacity(text: str) -> int:
    capacity = parse_size(text)
    if capacity <= 0:
        raise ValueError(f"a tier's size must be positive, got {text!r}")
    return capacity


def _parse_host(spec: str) -> dict[str, Any]:
    return {"capacity_bytes": _parse_capacity(spec.partition(":")[2])}


def _parse_disk(spec: str) -> dict[str, Any]:
    path, sep, size = spec.partition(":")[2].rpartition(":")
    if not sep or not path.strip():
        raise ValueError("a disk tier names a directory and a size")
    return {"path": os.path.expanduser(path), "capacity_bytes": _parse_capacity(size)}


def _parse_redis(spec: str) -> dict[str, Any]:
    parse_redis_url(spec)
    return {"url": spec}


KINDS: dict[str, TierKind] = {kind.name: kind for kind in (
    TierKind("host", "host:<size> (e.g. host:4GiB)", _parse_host, HostTier),
    TierKind("disk", "disk:<path>:<size> (e.g. disk:/var/cache/kvforge:50GiB)", _parse_disk, DiskTier),
    TierKind("redis", "redis://<host>:<port>/<db>[?ttl=<seconds>] (e.g. redis://127.0.0.1:6379/0; also "
             "rediss://, unix:///path/to/redis.sock, valkey://)", _parse_redis, RedisTier),
)}


def _parse(spec: str) -> tuple[TierKind, dict[str, Any]]:
    forms = "; ".join(kind.form for kind in KINDS.values())
    if not isinstance(spec, str):
        raise ValueError(f"a tier spec must be a str, got {type(spec).__name__}; the forms are: {forms}")
    spec = spec.strip()
    scheme, sep, _ = spec.partition("://")
    if sep and scheme.lower() in REDIS_SCHEMES:
        name = "redis"
    else:
        name = spec.partition(":")[0].lower()
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown tier spec {spec!r}: the forms are: {forms}")
    try:
        return kind, kind.parse(spec)
    except ValueError as e:
        raise ValueError(f"bad tier spec {spec!r}: {e}; the form is {kind.form}") from None


def validate_tier_spec(spec: str) -> None:
    """Check `spec`'s syntax (see the module docstring) without opening anything: no directory is
    created, no server contacted. Raises ValueError naming the problem and the valid forms."""
    _parse(spec)


def open_tier(spec: str) -> Tier:
    """The tier `spec` names, opened (a disk directory is created; a Redis server is not contacted
    until the first operation). Not wrapped: wrap it in `MeteredTier` to count and absorb faults.
    Raises ValueError for a bad spec (as `validate_tier_spec`) or one the backend refuses (e.g. a
    disk path that is a file)."""
    kind, args = _parse(spec)
    return kind.make(**args)
