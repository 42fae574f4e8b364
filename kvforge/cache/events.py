"""KV events: what the prefix cache stored and dropped, for an external router to mirror.

The manager records an event for every change of the set of cached blocks, in order; a consumer
calls `KVCacheManager.take_events()` to get and clear them. The buffer is bounded: it keeps the
newest `max_events` events and counts the older ones it dropped (`num_dropped`), so a manager that
nobody drains never grows; a consumer that sees `num_dropped` rise has missed events and should
resynchronise (e.g. treat it as AllBlocksCleared and relearn). `max_events=0` records nothing.
Events are built when taken, not when recorded: recording stays cheap on the allocation path, and
dropped events are never built. What is recorded must therefore not change before it is taken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks of one sequence were cached, in prefix order: `block_hashes[0]`
    follows `parent_hash` (None: it starts a sequence), and `token_ids` holds
    `len(block_hashes) * block_size` tokens."""

    block_hashes: tuple[bytes, ...]
    parent_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """These cached blocks were evicted (their KV slots will be reused), in eviction order."""

    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """`reset_prefix_cache()` emptied the cache: forget every block hash seen so far."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBuffer:
    """The newest `max_events` events, oldest first; older ones are dropped and counted."""

    def __init__(self, max_events: int):
        if max_events < 0:
            raise ValueError(f"max_kv_events must be >= 0 (0 records no events), got {max_events}")
        self.max_events = max_events
        self._pending: deque[tuple[Callable[..., KVEvent], tuple[Any, ...]]] = deque(maxlen=max_events)
        self.num_dropped = 0

    @property
    def enabled(self) -> bool:
        return self.max_events > 0

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, make: Callable[..., KVEvent], *args: Any) -> None:
        """Append the event `make(*args)` (built when taken; `args` must not change until then),
        dropping the oldest when full. A no-op when `max_events` is 0."""
        if not self.max_events:
            return
        if len(self._pending) == self.max_events:
            self.num_dropped += 1
        self._pending.append((make, args))

    def take(self) -> list[KVEvent]:
        """Return the buffered events, oldest first, and clear the buffer."""
        out = [make(*args) for make, args in self._pending]
        self._pending.clear()
        return out
