"""Admission: whether the KV cache can take a request now, and the queue of requests that wait for it.

"Full" is defined against the worst case, so that an admitted request never forces a preemption:

    need(r)   = ceil((prompt_tokens(r) + max_tokens(r) - 1) / block_size)
                (the blocks r may ever hold; its last sampled token is never written to the cache)
    held(r)   = blocks r holds now (0 while it waits in the engine, or after a preemption)
    owed      = sum over requests in the engine (running or waiting) of need(r) - held(r)
    headroom  = cache.num_available_blocks - owed   (free blocks plus cached blocks nobody holds)
    r fits    <=> need(r) <= headroom

need(r) ignores the prefix r may find cached, so "fits" errs on the safe side. For a request composed
from chunks, prompt_tokens(r) counts its private tokens only (the query and the recomputed tokens of
each chunk after the first, ceil(recompute_ratio * chunk length)): the chunks' own KV sits in chunk
pages, outside this accounting, exactly as the engine counts it. The model-length and whole-cache
limits still count the whole composed prompt, as `LLMEngine.add_chunk_request` does.
Registering a chunk takes its blocks only within the headroom (else 503), for the same reason.
A request also has to wait for `max_num_seqs` in the engine's own queue; that is not "full".

Everything here reads the engine, so it runs on the engine loop's thread only.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvforge.config import ceil_div
from kvforge.engine import LLMEngine

T = TypeVar("T")


def blocks_needed(num_prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """need(r) above: the most blocks a request of this size can ever hold."""
    return ceil_div(num_prompt_tokens + max_tokens - 1, block_size)


def headroom(engine: LLMEngine) -> int:
    """Blocks a new request may claim now without ever forcing a preemption (see the module
    docstring). May be negative after a preemption or while the engine runs requests this server did
    not admit. Reads the engine; modifies nothing."""
    cache, sched = engine.cache, engine.scheduler
    bs = cache.block_size
    owed = sum(blocks_needed(s.num_prompt_tokens, s.params.max_tokens, bs) for s in sched.waiting)
    for s in sched.running:
        owed += max(0, blocks_needed(s.num_prompt_tokens, s.params.max_tokens, bs)
                    - len(cache.block_table(s.seq_id)))
    return cache.num_available_blocks - owed


def shrunk_max_tokens(num_prompt_tokens: int, room: int, block_size: int) -> int:
    """The largest max_tokens whose need fits in `room` blocks (< 1 when not even one token fits)."""
    return room * block_size - num_prompt_tokens + 1


@dataclass(order=True)
class _Entry(Generic[T]):
    priority: int
    order: int
    deadline: float = field(compare=False)
    item: T = field(compare=False)


class AdmissionQueue(Generic[T]):
    """Requests waiting for cache room, ordered by priority (lower first), then arrival.

    Only the head is ever admitted (head-of-line), so a large request is not starved by smaller ones
    behind it. Each entry carries the monotonic deadline after which it is given up.
    """

    def __init__(self) -> None:
        self._entries: list[_Entry[T]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        return (e.item for e in self._entries)

    def push(self, item: T, priority: int, deadline: float) -> None:
        """Insert after every queued item of priority <= `priority`. O(n)."""
        bisect.insort(self._entries, _Entry(priority, next(self._order), deadline, item))

    def head(self) -> T | None:
        return self._entries[0].item if self._entries else None

    def pop_head(self) -> T:
        return self._entries.pop(0).item

    def remove(self, item: T) -> bool:
        """Drop `item` if queued; says whether it was."""
        for i, e in enumerate(self._entries):
            if e.item is item:
                del self._entries[i]
                return True
        return False

    def pop_expired(self, now: float) -> list[T]:
        """Remove and return every item whose deadline is <= `now`."""
        expired = [e.item for e in self._entries if e.deadline <= now]
        if expired:
            self._entries = [e for e in self._entries if e.deadline > now]
        return expired

    def next_deadline(self) -> float | None:
        return min((e.deadline for e in self._entries), default=None)
