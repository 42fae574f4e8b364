"""Scheduler on a real KVCacheManager, with no model: budgets, admission order, preemption."""

from __future__ import annotations

from kvforge.cache import KVCacheManager
from kvforge.config import SchedulerConfig
from kvforge.engine.scheduler import Scheduler
from kvforge.types import SamplingParams, Sequence, SequenceStatus


def _seq(i: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(i, f"r{i}", None, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), 0.0)


def _run(sched: Scheduler, out) -> None:
    """What the engine does after a step: mark the run computed; sampled sequences get a token."""
    for c in out.runs:
        c.seq.num_computed += c.num_tokens
        if c.seq.num_computed == len(c.seq.token_ids):
            c.seq.token_ids.append(7)


def test_new_requests_join_under_the_token_budget_and_a_long_prompt_is_prefilled_in_pieces():
    cache = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), cache)
    a, b = _seq(0, 6), _seq(1, 9)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in out.runs] == [(0, 6), (1, 4)]
    _run(sched, out)
    out = sched.schedule()  # a decodes one token, b finishes its prompt
    assert [(c.seq.seq_id, c.num_tokens) for c in out.runs] == [(0, 1), (1, 5)]
    assert cache.length(1) == 9
    cache.check_integrity()


def test_max_num_seqs_caps_the_running_batch():
    cache = KVCacheManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), cache)
    for i in range(3):
        sched.add(_seq(i, 3))
    out = sched.schedule()
    assert [c.seq.seq_id for c in out.runs] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2]


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted_and_requeued_first():
    cache = KVCacheManager(num_blocks=3, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), cache)
    a, b, c = _seq(0, 4), _seq(1, 4), _seq(2, 4)
    for s in (a, b, c):
        sched.add(s)
    _run(sched, sched.schedule())  # all three prompts fill the three blocks
    assert cache.num_free_blocks == 0
    out = sched.schedule()  # a needs a 4th block for its next token: c (newest) goes
    assert out.preempted == [c, b]
    assert [ch.seq.seq_id for ch in out.runs] == [0]
    assert [s.seq_id for s in sched.waiting] == [1, 2]
    assert c.status is SequenceStatus.WAITING and c.num_computed == 0 and c.num_preemptions == 1
    assert sched.num_preemptions == 2
    cache.check_integrity()


def test_finish_frees_blocks_at_once():
    cache = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(), cache)
    a = _seq(0, 10)
    sched.add(a)
    _run(sched, sched.schedule())
    assert cache.num_free_blocks == 5
    sched.finish(a, "stop")
    assert cache.num_available_blocks == 8 and not sched.has_unfinished
    assert a.finished and a.finish_reason == "stop"
    cache.check_integrity()


def test_when_blocks_run_out_the_lowest_priority_newest_sequence_is_preempted_even_if_already_scheduled():
    cache = KVCacheManager(num_blocks=3, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, watermark=0), cache)
    low, high_a, high_b = _seq(0, 4), _seq(1, 4), _seq(2, 4)
    sched.add(low, priority=5)
    sched.add(high_a, priority=0)
    sched.add(high_b, priority=0)
    _run(sched, sched.schedule())  # high_a, high_b, then low: each prompt fills one block
    assert [s.seq_id for s in sched.running] == [1, 2, 0]
    out = sched.schedule()  # each needs a second block, and none is free
    # high_a takes the block of the low-priority sequence (though high_b is newer); high_b then
    # finds none and gives way itself (among equal priorities, the newest goes first).
    assert out.preempted == [low, high_b]
    assert [r.seq.seq_id for r in out.runs] == [1]
    assert [s.seq_id for s in sched.waiting] == [2, 0]
    assert low.status is SequenceStatus.WAITING and low.num_computed == 0
    cache.check_integrity()


def test_a_preempted_sequence_that_was_already_scheduled_this_step_gives_back_its_tokens():
    cache = KVCacheManager(num_blocks=3, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100, watermark=0), cache)
    old_low, new_high = _seq(0, 4), _seq(1, 4)
    sched.add(old_low, priority=5)
    _run(sched, sched.schedule())
    sched.add(new_high, priority=0)
    _run(sched, sched.schedule())  # old_low takes its second block, new_high its first
    # old_low is scheduled first (it runs first, and fits), then new_high needs a block: old_low,
    # the lower priority, is preempted and its already reserved slot is given back.
    out = sched.schedule()
    assert out.preempted == [old_low]
    assert [(r.seq.seq_id, r.num_tokens) for r in out.runs] == [(1, 1)]
    cache.check_integrity()


def test_admission_keeps_the_watermark_available_while_others_run():
    cache = KVCacheManager(num_blocks=100, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1000, watermark=0.1), cache)
    first, second = _seq(0, 4 * 85), _seq(1, 4 * 10)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()  # the first is admitted alone (nothing runs); the second would leave 5 < 10
    assert [r.seq.seq_id for r in out.runs] == [0] and list(sched.waiting) == [second]
    cache.check_integrity()
