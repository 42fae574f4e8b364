"""Async scheduling: the next step is scheduled and launched before the host reads the tokens of
the step in flight (vLLM's `async_scheduling`, SGLang's overlap scheduler).

`OverlappedDecode` is a base class of `LLMEngine` (one object, one API), kept in its own file; it
uses the engine's state. With it, a step goes like this:

    step k:  reserve slots for step k+1 -> launch k+1 (its decoding sequences' input tokens: step
             k's sampled tokens, gathered on the device; then prompt pieces of running and waiting
             sequences) -> read step k's tokens -> detokenize, stop, build outputs

so the host's share of a step (scheduling, packing, detokenizing, outputs) runs while the device
computes the next one, prefill steps included, and `step()` returns each step's outputs one call
later. A sequence whose step-k token finishes it (EOS, a stop string) has already been launched in
step k+1: that token is dropped when step k+1 lands, and its slot went back with its blocks when it
finished (the device writes it before any later step, in stream order, can reuse the block). A
sequence whose pending token is its last by length is not launched again. A step's prompt blocks
are committed to the prefix cache when it is launched: whatever reads them later runs after it.

Only steps whose every sequence is plain overlap: greedy, no logits processors, no
log-probabilities, one sample per request, no chunk being filled, no speculation; a step that
would have to preempt does not (the admission of waiting sequences and running prompts stop at
the first that does not fit), and a decode that finds no free block for its next slot does not
overlap. Sequences composed from chunks overlap while they decode, alone with plain decodes
(their steps replay a cascade decode graph where one holds them). Any other step first lands the
step in flight and then runs synchronously, exactly as without async scheduling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvforge.cache import KVCacheManager, NoFreeBlocksError
from kvforge import ops
from kvforge.model.runner import DecodeStep, PendingTokens
from kvforge.types import OutputKind, RequestOutput, Sequence, SequenceStatus

if TYPE_CHECKING:
    from kvforge.engine.output import OutputProcessor
    from kvforge.engine.scheduler import Scheduler
    from kvforge.model.runner import ModelRunner


@dataclass(frozen=True)
class InFlightStep:
    """A launched decode step whose tokens the host has not read: `seqs[i]` computed position
    `ends[i] - 1` and sampled `tokens[i]` (int64, on the device); `host` receives them through a
    non-blocking copy that `copied` (None on the CPU) marks done."""

    seqs: list[Sequence]
    ends: list[int]
    tokens: torch.Tensor
    host: torch.Tensor
    copied: torch.cuda.Event | None


def _admissible(seq: Sequence) -> bool:
    """Whether waiting `seq` may be admitted by a step launched ahead: its prompt's K/V goes to its
    own blocks (not composed from chunks) and its first token is a plain argmax."""
    return overlaps(seq) and seq.composition is None


def overlaps(seq: Sequence) -> bool:
    """Whether `seq`'s decode steps may run ahead of its tokens: the next token is the argmax of the
    raw logits and nothing else of the step is needed on the host before the next one starts."""
    return seq.params.plain_greedy and seq.group is None and seq.fills_chunk is None and not seq.draft


class OverlappedDecode:
    """Launching decode steps ahead of their predecessor's tokens (see the module docstring)."""

    cache: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    outputs: OutputProcessor
    max_model_len: int
    _steps: int
    _generation_tokens: int

    def _init_overlap(self, enabled: bool, max_num_seqs: int, device: torch.device) -> None:
        self._overlap = enabled
        self._in_flight: InFlightStep | None = None
        # seq_id -> its block table as the last launch ahead passed it, reused while it still covers
        # the next slot; dropped when a landing's commit puts a cached twin in place of a block, and
        # emptied by every synchronous step (which may preempt, fork or roll back)
        self._tables: dict[int, list[int]] = {}
        # two host buffers for the sampled tokens: one may still be read while the next is filled
        self._pinned = device.type == "cuda"  # known here: is_pinned() asks the CUDA runtime each time
        self._token_buffers = [torch.empty(max_num_seqs, dtype=torch.long, pin_memory=self._pinned) for _ in range(2)]

    def _overlapped_step(self) -> list[RequestOutput] | None:
        """Launch the next decode step ahead and land the one in flight, returning its outputs; or,
        when the next step cannot overlap (see the module docstring), land the step in flight and
        return None with its outputs in `_unreturned`, for the caller to run a synchronous step.
        Raises StepError (from `_fail`) for the requests of a step that failed to launch or land."""
        previous, self._in_flight = self._in_flight, None
        try:
            launched = self._launch_ahead(previous)
        except Exception:
            if previous is not None:
                self._unreturned += self._land(previous)
            raise
        self._in_flight = launched
        landed = self._land(previous) if previous is not None else []
        if launched is None:
            self._tables.clear()
            self._unreturned += landed
            return None
        return landed

    def _launch_ahead(self, previous: InFlightStep | None) -> InFlightStep | None:
        """Reserve the next step's slots and launch it: one token for every running sequence that
        decodes and continues (the input token of each sequence of `previous` taken from its sampled
        tokens on the device), then prompt pieces of running and waiting sequences
        (`Scheduler.schedule_ahead`); None (nothing changed) when the step cannot overlap."""
        sched = self.scheduler
        if sched.waiting and not _admissible(sched.waiting[0]):  # a synchronous step admits it
            return None
        budget = sched.config.max_num_batched_tokens
        pending = {} if previous is None else {seq.seq_id: i for i, seq in enumerate(previous.seqs)}
        seqs, rows = [], []
        limit = self.max_model_len
        composed = prefilling = False
        for seq in sched.running:
            row = pending.get(seq.seq_id, -1)
            uncomputed = len(seq.token_ids) - seq.num_computed
            if not overlaps(seq) or (row >= 0) == (uncomputed > 0):  # a pending token or uncomputed ones
                return None
            if uncomputed > 1:  # prefilling: Scheduler.schedule_ahead's
                if seq.composition is not None:
                    return None
                prefilling = True
                continue
            # its pending token is its last: max_tokens or the model length (a composed sequence also
            # spans its reused chunk tokens)
            spans = len(seq.token_ids) if seq.composition is None else seq.total_len
            if row >= 0 and (len(seq.token_ids) + 1 >= len(seq.prompt_token_ids) + seq.params.max_tokens
                             or spans + 1 >= limit):
                continue
            composed = composed or seq.composition is not None
            seqs.append(seq)
            rows.append(row)
        if len(seqs) > budget or (composed and (prefilling or sched.waiting)):  # composed: decodes alone
            return None
        try:
            slots = self.cache.append_decode([seq.seq_id for seq in seqs]) if seqs else []
        except NoFreeBlocksError:  # changed nothing: the synchronous step preempts
            return None
        prompts = sched.schedule_ahead(budget - len(seqs), _admissible)  # none beside composed decodes
        if not seqs and not prompts:
            return None
        launched = seqs + [r.seq for r in prompts]
        try:
            # Each block table is the one last passed while its last block still holds the new slot
            # (nothing but a commit's cached twin changes a decoding sequence's earlier blocks, and
            # that drops it), else the cache's.
            tables, bs, block_tables = self._tables, self.cache.block_size, []
            for seq, slot in zip(seqs, slots):
                table = tables.get(seq.seq_id)
                if table is None or table[-1] != slot // bs:
                    table = tables[seq.seq_id] = self.cache.block_table(seq.seq_id)
                block_tables.append(table)
            positions = [seq.num_computed for seq in seqs]
            known = previous is None or max(rows, default=-1) < 0
            token_ids = [0 if row >= 0 else seq.token_ids[-1] for seq, row in zip(seqs, rows)]  # 0: pending
            step = DecodeStep(token_ids, positions, slots, block_tables,
                              [seq.composition for seq in seqs] if composed else None)
            if not prompts:
                tokens = self.runner.run_decode(step, None if known else PendingTokens(previous.tokens, rows))
            else:  # prompt pieces too: an eager step, the pending tokens gathered on the device
                runs = step.runs() + [self._token_run(r.seq, r.num_tokens, r.slots) for r in prompts]
                tokens = ops.greedy_tokens(self.runner.run(
                    runs, None if known else PendingTokens(previous.tokens, rows + [-1] * len(prompts))))
            sampled = seqs + [r.seq for r in prompts if r.seq.num_computed + r.num_tokens == len(r.seq.token_ids)]
            host = self._token_buffers[self._steps % 2][:len(sampled)]
            host.copy_(tokens, non_blocking=self._pinned)
            copied = None
            if self._pinned:
                copied = torch.cuda.Event()
                copied.record()
        except Exception as e:
            raise self._fail(launched, e) from e
        for seq, position in zip(seqs, positions):
            seq.num_computed = position + 1
        for r in prompts:  # their K/V is final once the step runs (stream order): cache the full blocks
            if self._computed(r.seq, r.num_tokens):
                self._tables.pop(r.seq.seq_id, None)
        self._steps += 1
        return InFlightStep(sampled, [seq.num_computed for seq in sampled], tokens, host, copied)

    def _land(self, step: InFlightStep) -> list[RequestOutput]:
        """Read `step`'s tokens (waiting for them) and do what a synchronous step does after sampling:
        cache the blocks it filled, append each token (detokenize, stop), build the outputs. A
        sequence that ended meanwhile (finished, aborted, failed) is skipped: its token is dropped."""
        if step.copied is not None:
            step.copied.synchronize()
        tokens = step.host.tolist()
        bs = self.cache.block_size
        outputs = []
        now = time.monotonic()
        try:
            for seq, end, token in zip(step.seqs, step.ends, tokens):
                if seq.status is SequenceStatus.FINISHED:  # ended meanwhile: its token is dropped
                    continue
                # this step filled a block: cache it (a cached twin may take its place in the table);
                # a composed sequence's blocks hold tokens at other positions than their own: never
                if end % bs == 0 and seq.composition is None and self.cache.commit(seq.seq_id, seq.token_ids, end):
                    self._tables.pop(seq.seq_id, None)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                self._generation_tokens += 1
                self.outputs.append_token(seq, token, self.max_model_len)
                finished = seq.status is SequenceStatus.FINISHED
                if finished or seq.params.output_kind is not OutputKind.FINAL_ONLY:  # else: no output yet
                    outputs.append(self.outputs.output(seq))
                if finished:
                    self._tables.pop(seq.seq_id, None)
                    self._forget(seq)
        except Exception as e:
            self._unreturned += outputs
            raise self._fail([seq for seq in step.seqs if not seq.finished], e) from e
        return outputs
