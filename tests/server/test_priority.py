"""Priority order without a model: the scheduler's waiting queue and the server's admission queue.
(The scheduler tests could move to tests/engine/test_scheduler.py.)"""

from __future__ import annotations

import pytest

from kvforge.cache import KVCacheManager
from kvforge.config import SchedulerConfig
from kvforge.engine.scheduler import Scheduler
from kvforge.engine import blocks_for
from kvforge.server.admission import AdmissionQueue, shrunk_max_tokens
from kvforge.types import SamplingParams, Sequence


def _seq(i: int, prompt_len: int = 4) -> Sequence:
    return Sequence(i, f"r{i}", None, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4), 0.0)


def _waiting(sched: Scheduler) -> list[int]:
    return [s.seq_id for s in sched.waiting]


def test_lower_priority_value_waits_ahead_and_equal_priorities_keep_arrival_order():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(num_blocks=64, block_size=4))
    for i, p in enumerate([0, 5, 0, -1, 5, 0]):
        sched.add(_seq(i), priority=p)
    assert _waiting(sched) == [3, 0, 2, 5, 1, 4]


def test_the_default_priority_is_first_come_first_served():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(num_blocks=64, block_size=4))
    for i in range(4):
        sched.add(_seq(i))
    assert _waiting(sched) == [0, 1, 2, 3]


def test_preempted_sequences_go_back_to_the_front_ahead_of_every_priority():
    cache = KVCacheManager(num_blocks=2, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=100), cache)
    a, b = _seq(0), _seq(1)
    sched.add(a, priority=3)
    sched.add(b, priority=3)
    for c in sched.schedule().runs:  # both prompts fill both blocks
        c.seq.num_computed += c.num_tokens
        c.seq.token_ids.append(7)
    out = sched.schedule()  # a needs a third block: b is preempted
    assert out.preempted == [b]
    sched.add(_seq(2), priority=-10)
    sched.add(_seq(3), priority=3)
    assert _waiting(sched) == [1, 2, 3]
    cache.check_integrity()


def test_finishing_a_waiting_sequence_forgets_it():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(num_blocks=8, block_size=4))
    a, b = _seq(0), _seq(1)
    sched.add(a, priority=1)
    sched.add(b, priority=2)
    sched.finish(a, "abort")
    sched.add(_seq(2), priority=1)
    assert _waiting(sched) == [2, 1]


@pytest.mark.parametrize("priority", [1.5, "1", True, None])
def test_a_priority_that_is_not_an_integer_is_refused_and_nothing_is_queued(priority):
    sched = Scheduler(SchedulerConfig(), KVCacheManager(num_blocks=8, block_size=4))
    with pytest.raises(ValueError, match="priority must be an integer"):
        sched.add(_seq(0), priority=priority)
    assert not sched.has_unfinished


def test_the_admission_queue_orders_by_priority_then_arrival_and_expires_by_deadline():
    q: AdmissionQueue[str] = AdmissionQueue()
    q.push("a", 0, deadline=10)
    q.push("b", 5, deadline=1)
    q.push("c", 0, deadline=2)
    q.push("d", -1, deadline=10)
    assert list(q) == ["d", "a", "c", "b"] and q.head() == "d" and q.next_deadline() == 1
    assert q.pop_expired(now=2) == ["c", "b"]
    assert q.remove("a") and not q.remove("a")
    assert q.pop_head() == "d" and len(q) == 0 and q.next_deadline() is None


def test_blocks_needed_never_counts_the_last_sampled_token():
    assert blocks_for(8, 33, 8) == 5  # 40 positions stored
    assert blocks_for(8, 34, 8) == 6
    assert blocks_for(1, 1, 16) == 1
    assert shrunk_max_tokens(8, 3, 8) == 17 and blocks_for(8, 17, 8) == 3
    assert shrunk_max_tokens(30, 3, 8) < 1
