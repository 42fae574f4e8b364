"""Continuous batching: waiting and running queues, a per-step token budget, preemption by recompute.

Each step, running sequences (oldest first) get their next tokens (one while decoding, or the rest of
a chunked prompt), then waiting sequences join while the token budget, `max_num_seqs` and free blocks
allow. A joining sequence starts from the longest cached prefix of its tokens (prefix caching): only
the rest is computed. When blocks run out, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue to be recomputed later, so no request fails while any
can progress.

The waiting queue is ordered by priority (lower runs first; equal priorities first come, first
served), except that preempted sequences go back to the very front, ahead of every priority:

    waiting = [preempted..., then by (priority, arrival)]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvforge.cache import KVCacheManager, NoFreeBlocksError
from kvforge.config import SchedulerConfig
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
        self._priority: dict[int, int] = {}  # seq_id -> priority, for every unfinished sequence

    def add(self, seq: Sequence, priority: int = 0) -> None:
        """Queue `seq` after every waiting sequence of priority <= `priority` (lower runs first, equal
        priorities in arrival order), never ahead of a preempted one. O(1) when every priority is equal.
        Raises ValueError, changing nothing, when `priority` is not an integer."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer (lower runs first), got {priority!r}")
        seq.status = SequenceStatus.WAITING
        self._priority[seq.seq_id] = priority
        i = len(self.waiting)
        while i > 0:
            ahead = self.waiting[i - 1]
            if ahead.num_preemptions > 0 or self._priority[ahead.seq_id] <= priority:
                break
            i -= 1
        self.waiting.insert(i, seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Choose this step's work and reserve its slots in the cache (advances cache lengths;
        the caller advances `seq.num_computed` once the chunk has run)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        i = self._schedule_decodes(chunks)
        budget -= i
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
            # Every token of a waiting sequence is uncomputed; a cached prefix skips its full blocks.
            # (A composed sequence's private tokens are not a prefix: nothing is matched.)
            prefix = self.cache.match_prefix(seq.token_ids if seq.composition is None else (), seq.cache_extra)
            n = min(len(seq.token_ids) - prefix.num_tokens, budget)
            if not self.cache.can_admit(prefix, n):
                break
            self.waiting.popleft()
            self.cache.add_sequence(seq.seq_id, capacity=seq.max_len, prefix=prefix, extra=seq.cache_extra)
            seq.num_computed = prefix.num_tokens
            if seq.num_cached_tokens is None:  # the first admission is what the request reports
                seq.num_cached_tokens = min(prefix.num_tokens, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n, self.cache.append(seq.seq_id, n)))
            budget -= n
        return SchedulerOutput(chunks, preempted)

    def _schedule_decodes(self, chunks: list[ScheduledChunk]) -> int:
        """The common step in one cache call: when every running sequence decodes one token within
        the budget and the blocks they need are available, reserve all their slots with
        `append_decode` and return how many were scheduled; otherwise schedule nothing and return 0
        (the per-sequence path then preempts as needed)."""
        running = self.running
        if not running or len(running) > self.config.max_num_batched_tokens \
                or any(seq.num_uncomputed != 1 for seq in running):
            return 0
        try:
            slots = self.cache.append_decode([seq.seq_id for seq in running])
        except NoFreeBlocksError:  # raised having changed nothing
            return 0
        chunks.extend(ScheduledChunk(seq, 1, [slot]) for seq, slot in zip(running, slots))
        return len(running)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark `seq` finished and free its blocks at once (works from either queue)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.cache.free(seq.seq_id)
        self._priority.pop(seq.seq_id, None)
        seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, reason, stop_reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
