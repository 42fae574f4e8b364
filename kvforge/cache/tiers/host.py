"""HostTier: values in this process's memory, least recently used evicted first under a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from kvforge.cache.tiers.base import Tier, check_capacity, check_items, check_key, check_keys, check_value, format_size


class HostTier(Tier):
    """An in-process LRU over at most `capacity_bytes` bytes of values (keys are not counted).

    `get` makes a key the most recently used; `contains` does not. A `put` evicts least recently
    used values until the new one fits; a value larger than the whole budget is not stored (and
    drops the key's old value). Never faults. Thread-safe: one lock around every operation.
    """

    kind = "host"
    in_process = True

    def __init__(self, capacity_bytes: int) -> None:
        """Raises ValueError unless `capacity_bytes` is a positive int."""
        self.capacity_bytes = check_capacity(capacity_bytes)
        self.spec = f"host:{format_size(capacity_bytes)}"
        self._values: OrderedDict[bytes, bytes] = OrderedDict()  # least recently used first
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        """Bytes of the values stored."""
        return self._used

    def __len__(self) -> int:
        return len(self._values)

    def contains(self, key: bytes) -> bool:
        check_key(key)
        with self._lock:
            return key in self._values

    def get(self, key: bytes) -> bytes | None:
        check_key(key)
        with self._lock:
            return self._get(key)

    def put(self, key: bytes, value: bytes) -> None:
        check_key(key)
        value = check_value(value)
        with self._lock:
            self._put(key, value)

    def delete(self, key: bytes) -> None:
        check_key(key)
        with self._lock:
            self._delete(key)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        check_keys(keys)
        with self._lock:
            return [key in self._values for key in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        check_keys(keys)
        with self._lock:
            return [self._get(key) for key in keys]

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        items = check_items(items)
        with self._lock:
            for key, value in items:
                self._put(key, value)

    # ---- under the lock ----------------------------------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def _put(self, key: bytes, value: bytes) -> None:
        self._delete(key)
        if len(value) > self.capacity_bytes:
            return
        while self._used + len(value) > self.capacity_bytes:
            _, evicted = self._values.popitem(last=False)
            self._used -= len(evicted)
        self._values[key] = value
        self._used += len(value)

    def _delete(self, key: bytes) -> None:
        old = self._values.pop(key, None)
        if old is not None:
            self._used -= len(old)
