"""The tier protocol: a byte store named by byte keys (`contains / get / put / delete`, and batched forms).

A tier moves opaque bytes; what the bytes mean (block headers, checksums) is the codec's business,
and counting, timing and surviving faults is `MeteredTier`'s. A backend is thread-safe (several
background threads call it at once) and raises its natural exceptions on faults (OSError, redis
errors): it never swallows them. It raises ValueError, changing nothing, for a bad key or value.

Keys are `bytes` of 1 to `MAX_KEY_BYTES` bytes (typically 32-byte sha256 block digests). A value
is any bytes, the empty value included; `get` answers None for a miss, never b"".
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Sequence

MAX_KEY_BYTES = 128
FAULT_KINDS = ("connection", "full", "permission", "io", "other")

# name -> bytes, largest first: how a tier writes its byte budget (parse_size reads the same table)
SIZE_UNITS = {
    "TiB": 1 << 40, "TB": 10**12, "GiB": 1 << 30, "GB": 10**9,
    "MiB": 1 << 20, "MB": 10**6, "KiB": 1 << 10, "KB": 10**3, "B": 1,
}

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


class Tier(ABC):
    """A store of bytes under byte keys. `kind` names the backend ("host", "disk", "redis"); `spec`
    says how this one was configured, in `open_tier`'s syntax (secrets redacted), e.g. "host:4GiB".

    Every method is thread-safe. A miss is not an error; a fault raises the backend's exception.
    """

    kind: str
    spec: str
    # Values never leave this process's memory (nothing outside can damage them): readers may skip
    # the integrity checks meant for bytes that crossed a disk or a network.
    in_process: bool = False

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether `key` is stored. Does not refresh its recency or TTL."""

    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The value stored under `key`, or None on a miss. Refreshes its recency (or TTL)."""

    @abstractmethod
    def put(self, key: bytes, value: bytes) -> None:
        """Store `value` under `key`, replacing any value there. A tier with a byte budget may evict
        others to make room, and stores nothing (dropping any old value) if `value` alone exceeds it."""

    @abstractmethod
    def delete(self, key: bytes) -> None:
        """Remove `key`; a no-op when it is not stored."""

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        """`contains` of each key, in order."""
        check_keys(keys)
        return [self.contains(key) for key in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """`get` of each key, in order (None for each miss)."""
        check_keys(keys)
        return [self.get(key) for key in keys]

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """`put` of each (key, value), in order: of a key given twice the last value stays. Checks
        every item before storing any. A fault may leave some of the items stored."""
        for key, value in check_items(items):
            self.put(key, value)

    def close(self) -> None:
        """Release connections or handles; the stored data stays where it lives. No-op by default."""

    def classify_fault(self, exc: Exception) -> str:
        """Which of `FAULT_KINDS` an exception this tier raised is: "connection" (the store cannot
        be reached: retry later), "full" (no space: ENOSPC, quota, the server's maxmemory),
        "permission", "io" (another OSError) or "other". Backends with their own exception types
        extend it."""
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return "connection"
        if isinstance(exc, OSError):
            if exc.errno in _FULL_ERRNOS:
                return "full"
            if isinstance(exc, PermissionError) or exc.errno in _PERMISSION_ERRNOS:
                return "permission"
            return "io"
        return "other"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def check_key(key: bytes) -> None:
    """Raise ValueError unless `key` is bytes of 1 to MAX_KEY_BYTES bytes."""
    if not isinstance(key, bytes):
        raise ValueError(f"a tier key must be bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a tier key must be 1 to {MAX_KEY_BYTES} bytes long, got {len(key)} bytes")


def check_keys(keys: Sequence[bytes]) -> None:
    for key in keys:
        check_key(key)


def check_value(value: bytes) -> bytes:
    """`value` as bytes (a bytearray or memoryview is copied). Raises ValueError for anything else."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"a tier value must be bytes, got {type(value).__name__}")


def check_items(items: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`items` with each key checked and each value as bytes (see `check_key`, `check_value`)."""
    out = []
    for key, value in items:
        check_key(key)
        out.append((key, check_value(value)))
    return out


def check_capacity(capacity_bytes: int) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
        raise ValueError(f"a tier's capacity must be a positive number of bytes, got {capacity_bytes!r}")
    return capacity_bytes


def format_size(n: int) -> str:
    """`n` bytes in the largest unit of SIZE_UNITS that divides it exactly: 4 << 30 -> "4GiB",
    4 * 10**9 -> "4GB", 1536 -> "1536B". `parse_size` reads it back to `n`."""
    if n == 0:
        return "0B"
    for unit, size in SIZE_UNITS.items():
        if n % size == 0:
            return f"{n // size}{unit}"
    raise AssertionError("unreachable: every n is a multiple of 1 B")
