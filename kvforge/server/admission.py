"""Admission: whether the KV cache can take a request now, and the queue of requests that wait for it.

Two modes (`--admission`), read through `LLMEngine.kv_room()` and the request's sizes:

    need (default, as vLLM):  need(r) = blocks r's prompt takes now, less its cached prefix
                              room    = available - watermark - blocks of prompts waiting in the engine
    reserve:                  need(r) = ceil((prompt_tokens(r) + max_tokens(r) - 1) / block_size),
                                        the most r may ever hold (its last sampled token is never stored)
                              room    = available - sum over requests in the engine of
                                        (their worst case - the blocks they hold)
    r fits  <=>  need(r) <= room

With `need`, running requests grow a block at a time while they decode; when blocks run out the
engine preempts the lowest-priority, newest one (recomputed later, nothing is lost). With
`reserve`, an admitted request never forces a preemption, at the price of far fewer requests
running at once (a chat request without max_tokens reserves the whole model length). For a request
composed from chunks, prompt_tokens(r) counts its private tokens only (the query and the recomputed
chunk tokens): the chunks' own KV sits in chunk pages, outside this accounting. `--on-full` decides
what happens to a request that does not fit: reject (503), wait (queue, by priority then arrival),
or shrink (reserve: lower max_tokens to what fits; need: nothing to shrink, so 503 as reject).

Everything here reads the engine, so it runs on the engine loop's thread only.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kvforge.engine import LLMEngine, PreparedRequest

T = TypeVar("T")


def room(engine: LLMEngine, mode: str) -> int:
    """Blocks a new request may claim now under `mode` (see the module docstring); may be negative.
    Modifies nothing."""
    r = engine.kv_room()
    if mode == "reserve":
        return r.available - r.owed_worst_case
    return r.available - r.watermark - r.waiting_prompts


def need(engine: LLMEngine, prepared: PreparedRequest, mode: str) -> int:
    """need(r) under `mode` (see the module docstring). Modifies nothing."""
    return engine.worst_case_blocks(prepared) if mode == "reserve" else engine.prompt_blocks(prepared)


def shrunk_max_tokens(num_prompt_tokens: int, room_blocks: int, block_size: int) -> int:
    """The largest max_tokens whose worst case fits in `room_blocks` (< 1 when not even one token fits)."""
    return room_blocks * block_size - num_prompt_tokens + 1


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
