"""Continuous batching: waiting and running queues, a per-step token budget, preemption by recompute.

Each step, running sequences (oldest first) get their next tokens (one while decoding, or the next
piece of a prompt prefilled in pieces), then waiting sequences join while the token budget,
`max_num_seqs` and free blocks allow. Admission is by need, as vLLM does: a waiting sequence joins
when the blocks its prompt needs now (less its cached prefix: prefix caching) fit above a small
watermark (`SchedulerConfig.watermark` of the pool, kept for running sequences to grow into); it
then grows a block at a time while it decodes. When blocks run out, the lowest-priority running
sequence is preempted (the newest among equals): its blocks are freed and it goes back to the front
of the waiting queue to be recomputed later, so no request fails while any can progress.

The waiting queue is ordered by priority (lower runs first; equal priorities first come, first
served), except that preempted sequences go back to the very front, ahead of every priority:

    waiting = [preempted..., then by (priority, arrival)]

A decoding sequence with a speculative `draft` asks for 1 + len(draft) tokens (its last token and the
drafted ones, verified in one forward); without budget or blocks for them the draft is dropped,
never a sequence preempted for it.

A chunk registration (`seq.fills_chunk`) is scheduled like any prefill, but its K/V goes to the
chunk's pages, which it holds from the start: it needs no block and is never preempted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvforge.cache import KVCacheManager, NoFreeBlocksError
from kvforge.config import SchedulerConfig
from kvforge.types import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledRun:
    """`num_tokens` tokens of `seq` from position `seq.num_computed`, with their reserved `slots`."""

    seq: Sequence
    num_tokens: int
    slots: list[int]


@dataclass(frozen=True)
class SchedulerOutput:
    runs: list[ScheduledRun]
    preempted: list[Sequence]


def computes_whole_prompt(seq: Sequence) -> bool:
    """Whether `seq` must compute its whole prompt (prompt log-probabilities, not yet all collected)
    instead of starting from a cached prefix."""
    return seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens


class Scheduler:
    """Owns the queues; reserves cache slots for what it schedules (the caller runs them)."""

    def __init__(self, config: SchedulerConfig, cache: KVCacheManager):
        self.config, self.cache = config, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.watermark_blocks = int(config.watermark * cache.num_blocks)
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
        the caller advances `seq.num_computed` once the run is computed)."""
        budget = self.config.max_num_batched_tokens
        preempted: list[Sequence] = []
        runs = self._schedule_decodes()
        if runs:
            budget -= len(runs)
        else:
            scheduled: dict[int, ScheduledRun] = {}  # seq_id -> run, in running order
            for seq in list(self.running):
                if budget <= 0:
                    break
                if seq.status is not SequenceStatus.RUNNING:  # preempted for an earlier one this step
                    continue
                n = min(seq.num_uncomputed, budget)
                if seq.draft:  # a decoding sequence (one uncomputed token): as much of it as fits
                    n = min(1 + len(seq.draft), budget)
                    seq.draft = seq.draft[:n - 1]
                    if not seq.draft or not self._can_reserve(seq, n):
                        seq.draft, n = [], 1  # no room to verify a draft: decode plainly rather than preempt
                while not self._can_reserve(seq, n):
                    victim = self._victim()
                    self._preempt(victim)
                    preempted.append(victim)
                    dropped = scheduled.pop(victim.seq_id, None)
                    if dropped is not None:  # its slots went with its blocks
                        budget += dropped.num_tokens
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                scheduled[seq.seq_id] = ScheduledRun(seq, n, self._reserve(seq, n))
                budget -= n
            runs = list(scheduled.values())
        if not preempted:
            self._admit(runs, budget)
        return SchedulerOutput(runs, preempted)

    def schedule_ahead(self, budget: int, admissible: Callable[[Sequence], bool]) -> list[ScheduledRun]:
        """The prompt work of a step launched before the tokens in flight are read (async
        scheduling), within `budget` tokens: the next piece of each running sequence that is still
        prefilling (more than one uncomputed token; the caller schedules the decoding ones), then
        waiting sequences, admitted as `schedule` admits them while `admissible` holds for the next
        one. Never preempts: a running sequence whose blocks do not fit ends the list (a synchronous
        step preempts for it). Reserves the runs' slots, as `schedule` does."""
        runs: list[ScheduledRun] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_uncomputed <= 1:
                continue
            n = min(seq.num_uncomputed, budget)
            if not self._can_reserve(seq, n):
                return runs
            runs.append(ScheduledRun(seq, n, self._reserve(seq, n)))
            budget -= n
        self._admit(runs, budget, admissible)
        return runs

    def _admit(self, runs: list[ScheduledRun], budget: int,
               admissible: Callable[[Sequence], bool] | None = None) -> None:
        """Admit waiting sequences, in queue order, while `budget` tokens, `max_num_seqs` and free
        blocks allow (and `admissible` holds), appending their first runs (slots reserved) to `runs`."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if admissible is not None and not admissible(seq):
                break
            if seq.fills_chunk is None:
                # Every token of a waiting sequence is uncomputed; a cached prefix skips its full blocks.
                # (A composed sequence's private tokens are not a prefix, and prompt log-probabilities
                # need the whole prompt computed: nothing is matched.)
                whole = seq.composition or computes_whole_prompt(seq)
                self.cache.read_through(() if whole else seq.token_ids, seq.cache_extra)  # tiers -> cached blocks
                prefix = self.cache.match_prefix(() if whole else seq.lookup_ids, seq.cache_extra)
                n = min(len(seq.token_ids) - prefix.num_tokens, budget)
                keep = self.watermark_blocks if self.running else 0
                if not self.cache.can_admit(prefix, n, keep):
                    break
                # A re-admission after preemption was counted at the first admission.
                self.cache.add_sequence(seq.seq_id, capacity=seq.max_len, prefix=prefix, extra=seq.cache_extra,
                                        count_stats=seq.num_preemptions == 0)
                seq.num_computed = prefix.num_tokens
                if seq.num_cached_tokens is None:  # the first admission is what the request reports
                    seq.num_cached_tokens = min(prefix.num_tokens, seq.num_prompt_tokens)
            else:
                n = min(len(seq.token_ids), budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            runs.append(ScheduledRun(seq, n, self._reserve(seq, n)))
            budget -= n

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Start `child`, a new sequence whose tokens are a copy of running `parent`'s (plus, perhaps,
        a token of its own), at `parent`'s priority. When the running queue has room and the cache a
        block for the copy, it runs from the next step on `parent`'s blocks (`KVCacheManager.fork`:
        the full ones shared) with `parent`'s computed tokens, and the block copy the caller must make
        in the arena is returned; otherwise it waits at the front of the waiting queue like a
        preempted sequence (recomputed when admitted, cached prefixes sparing most of it) and None
        is returned."""
        priority = self._priority[parent.seq_id]
        self._priority[child.seq_id] = priority
        if len(self.running) < self.config.max_num_seqs:
            try:
                copy = self.cache.fork(parent.seq_id, child.seq_id)
            except NoFreeBlocksError:
                pass
            else:
                child.num_computed, child.status = parent.num_computed, SequenceStatus.RUNNING
                self.running.append(child)
                return copy
        child.num_computed, child.status = 0, SequenceStatus.WAITING
        self.waiting.appendleft(child)
        return None

    def _schedule_decodes(self) -> list[ScheduledRun]:
        """The common step in one cache call: when every running sequence decodes one token within
        the budget and the blocks they need are available, reserve all their slots with
        `append_decode` and return their runs; otherwise schedule nothing and return [] (the
        per-sequence path then preempts as needed)."""
        running = self.running
        if not running or len(running) > self.config.max_num_batched_tokens \
                or any(seq.num_uncomputed != 1 or seq.fills_chunk is not None or seq.draft for seq in running):
            return []
        try:
            slots = self.cache.append_decode([seq.seq_id for seq in running])
        except NoFreeBlocksError:  # raised having changed nothing
            return []
        return [ScheduledRun(seq, 1, [slot]) for seq, slot in zip(running, slots)]

    def _can_reserve(self, seq: Sequence, n: int) -> bool:
        return seq.fills_chunk is not None or self.cache.can_append(seq.seq_id, n)

    def _reserve(self, seq: Sequence, n: int) -> list[int]:
        """The slots of `seq`'s next `n` tokens: its chunk's pages for a registration, else blocks
        appended to its block table."""
        if seq.fills_chunk is not None:
            return self.cache.chunk_slot_mapping(seq.fills_chunk, seq.num_computed, seq.num_computed + n)
        return self.cache.append(seq.seq_id, n)

    def _victim(self) -> Sequence:
        """The running sequence to preempt: the lowest priority (highest number), newest among equals.
        Chunk registrations hold no preemptible blocks and are never chosen."""
        candidates = [s for s in self.running if s.fills_chunk is None]
        assert candidates, "only a sequence that needs blocks preempts, and it is a candidate itself"
        return max(candidates, key=lambda s: (self._priority[s.seq_id], s.seq_id))

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
        seq.draft = []
        self.cache.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
