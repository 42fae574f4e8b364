"""Continuous batching: waiting and running queues, a per-step token budget, preemption by recompute.

Each step, running sequences (oldest first) get their next tokens (one while decoding, or the rest of
a chunked prompt), then waiting sequences join while the token budget, `max_num_seqs` and free blocks
allow. When blocks run out, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue to be recomputed later, so no request fails while any
can progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvforge.cache import KVCacheManager
from kvforge.config import SchedulerConfig, ceil_div
from kvforge.types import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq` from position `seq.num_computed`, with their reserved `slots`."""

    seq: Sequence
    num_tokens: int
    slots: list[int]


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]


class Scheduler:
    """Owns the queues; reserves cache slots for what it schedules (the caller runs them)."""

    def __init__(self, config: SchedulerConfig, cache: KVCacheManager):
        self.config, self.cache = config, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work and reserve its slots in the cache (advances cache lengths;
        the caller advances `seq.num_computed` once the chunk has run)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.cache.can_append(seq.seq_id, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            chunks.append(ScheduledChunk(seq, n, self.cache.append(seq.seq_id, n)))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if ceil_div(n, self.cache.block_size) > self.cache.num_free_blocks:
                break
            self.waiting.popleft()
            self.cache.add_sequence(seq.seq_id, capacity=seq.max_len)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n, self.cache.append(seq.seq_id, n)))
            budget -= n
        return SchedulerOutput(chunks, preempted)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark `seq` finished and free its blocks at once (works from either queue)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.cache.free(seq.seq_id)
        seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, reason, stop_reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
