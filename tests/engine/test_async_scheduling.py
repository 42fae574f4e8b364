"""Async scheduling (engine/overlap.py) gives what synchronous steps give: the same tokens, texts and
finish reasons, every block accounted for after every step, one request's end or failure touching
no other. On the CPU the overlap saves nothing, but the logic is the GPU's."""

from __future__ import annotations

import pytest

from kvforge import SamplingParams
from kvforge.engine import StepError
from kvforge.types import OutputKind
from tests.conftest import PROMPTS, assert_engine_idle, make_llm

MIXED = [SamplingParams(temperature=0, max_tokens=m) for m in (40, 7, 64, 33)]  # one ends on EOS


@pytest.fixture(scope="module")
def sync_llm():
    return make_llm(async_scheduling=False)


@pytest.fixture(scope="module")
def async_llm():
    return make_llm(async_scheduling=True)


def _completions(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def _spy_pending(monkeypatch, engine) -> list[bool]:
    """Record, for each step launched ahead, whether it went while the step before it was still in
    flight (so some input tokens were still on the device): counted at the engine, whichever path
    (eager, a graph) the runner takes."""
    calls, real = [], engine._launch_ahead

    def launch(previous):
        step = real(previous)
        calls.append(step is not None and previous is not None and bool(previous.seqs))
        return step

    monkeypatch.setattr(engine, "_launch_ahead", launch)
    return calls


def test_overlapped_steps_give_the_synchronous_tokens_texts_and_finish_reasons(sync_llm, async_llm, monkeypatch):
    calls = _spy_pending(monkeypatch, async_llm.engine)
    expected = _completions(sync_llm.generate(PROMPTS, MIXED))
    assert _completions(async_llm.generate(PROMPTS, MIXED)) == expected
    assert {c[2] for c in expected} == {"stop", "length"}
    assert sum(calls) > 50  # the decode steps did run ahead of their inputs
    assert_engine_idle(async_llm.engine)


def test_stop_strings_and_outputs_kinds_match_the_synchronous_engine(sync_llm, async_llm):
    params = [SamplingParams(temperature=0, max_tokens=48, stop=[" the", "\n"]),
              SamplingParams(temperature=0, max_tokens=48, stop=["("], include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=20, output_kind=OutputKind.CUMULATIVE),
              SamplingParams(temperature=0, max_tokens=20, output_kind=OutputKind.FINAL_ONLY)]
    assert _completions(async_llm.generate(PROMPTS, params)) == _completions(sync_llm.generate(PROMPTS, params))
    assert_engine_idle(async_llm.engine)


def test_identical_sequences_sharing_cached_twins_give_the_synchronous_tokens(sync_llm, async_llm):
    """Two copies of a prompt decode in lockstep: each block the second one fills is already cached
    by the first, so committing it swaps in the twin while the next step is in flight."""
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    prompts = [PROMPTS[2], PROMPTS[2], PROMPTS[3]]
    expected = _completions(sync_llm.generate(prompts, params))
    assert expected[0] == expected[1]
    assert _completions(async_llm.generate(prompts, params)) == expected
    assert_engine_idle(async_llm.engine)


def test_every_step_keeps_the_cache_consistent_and_outputs_come_one_step_later(async_llm):
    engine = async_llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"c{i}", prompt, params)
    tokens: dict[str, int] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = len(out.outputs[0].token_ids)
        steps += 1
        engine.check_integrity()
        for seq in engine.scheduler.running:
            assert engine.cache.length(seq.seq_id) == seq.num_computed
    assert tokens == {f"c{i}": 12 for i in range(len(PROMPTS))}
    assert steps == 13  # the prefill, 11 decode launches, and the call that lands the last
    assert_engine_idle(engine)


def test_aborting_a_request_in_flight_leaves_the_others_as_they_were(sync_llm, async_llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _completions(sync_llm.generate(PROMPTS, params))
    engine = async_llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if engine._in_flight is not None and "a1" not in done:
            engine.abort_request("a1")
            done["a1"] = None
            engine.check_integrity()
    assert [_completions([done[f"a{i}"]])[0] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert_engine_idle(engine)


def _staggered(engine, tag: str, params: list[SamplingParams], joins: dict[int, list[int]]) -> list:
    """Run PROMPTS[i] with params[i] through `engine`, the requests of `joins[k]` added after the
    k-th step (those of step 0 first), the cache checked after every step; their completions."""
    for i in joins.get(0, []):
        engine.add_request(f"{tag}{i}", PROMPTS[i], params[i])
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        for i in joins.get(steps, []):
            engine.add_request(f"{tag}{i}", PROMPTS[i], params[i])
        engine.check_integrity()
    assert_engine_idle(engine)
    return [_completions([done[f"{tag}{i}"]])[0] for i in range(len(params))]


def test_a_request_arriving_mid_decode_joins_and_everyone_gets_the_synchronous_tokens(sync_llm, async_llm):
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 4
    expected = _completions(sync_llm.generate(PROMPTS, params))
    assert _staggered(async_llm.engine, "j", params, {0: [0], 3: [1], 5: [2], 9: [3]}) == expected


def test_steps_that_cannot_overlap_run_synchronously(sync_llm, async_llm, monkeypatch):
    """Seeded sampling, penalties and log-probabilities need each step's logits on the host: such
    a batch never runs ahead, and gives what the synchronous engine gives."""
    params = [SamplingParams(temperature=0.8, seed=7, max_tokens=16),
              SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=16, logprobs=2),
              SamplingParams(temperature=0, max_tokens=16)]
    calls = _spy_pending(monkeypatch, async_llm.engine)
    outs = async_llm.generate(PROMPTS, params)
    assert _completions(outs) == _completions(sync_llm.generate(PROMPTS, params))
    assert outs[2].outputs[0].logprobs and len(outs[2].outputs[0].logprobs) == 16
    assert not any(calls)
    assert_engine_idle(async_llm.engine)


def test_sequences_composed_from_chunks_run_ahead_and_give_the_synchronous_tokens(sync_llm, async_llm,
                                                                                   monkeypatch):
    """Composed sequences (with and without recomputed chunk tokens) decode ahead of their inputs
    beside plain ones; their blocks are never committed to the prefix cache."""
    docs = ["The lamp costs 3 coins and is sold on weekdays. ", "The rug costs 17 coins and is blue. "]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for llm in (sync_llm, async_llm):
        engine = llm.engine
        chunks = [llm.register_chunk(d) for d in docs]
        calls = _spy_pending(monkeypatch, engine) if llm is async_llm else []
        for i in range(4):
            engine.add_chunk_request(f"c{i}", chunks[i % 2:] + chunks[:i % 2], f"Question {i}: which costs more?",
                                     params, recompute_ratio=(0.0, 0.5)[i % 2])
        engine.add_request("p", PROMPTS[0], params)
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
        for c in chunks:
            llm.unregister_chunk(c.chunk_id)
        assert_engine_idle(engine)
        results.append(out)
        monkeypatch.undo()
    assert results[1] == results[0] and len(results[0]) == 5
    assert sum(calls) > 15


def test_preemption_under_a_small_arena_gives_the_synchronous_tokens(monkeypatch):
    """Only synchronous steps preempt: a step launched ahead admits and continues prompts only as far
    as blocks allow."""
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    small = {"kv_cache_memory": None, "num_blocks": 10, "block_size": 16}
    expected = _completions(make_llm(async_scheduling=False, **small).generate(PROMPTS, params))
    llm = make_llm(async_scheduling=True, **small)
    sched, ahead = llm.engine.scheduler, []
    real_ahead, real_preempt = sched.schedule_ahead, sched._preempt

    def schedule_ahead(*args):
        ahead.append(True)
        try:
            return real_ahead(*args)
        finally:
            ahead.pop()

    def preempt(seq):
        assert not ahead, "a step launched ahead preempted"
        real_preempt(seq)

    monkeypatch.setattr(sched, "schedule_ahead", schedule_ahead)
    monkeypatch.setattr(sched, "_preempt", preempt)
    assert _completions(llm.generate(PROMPTS, params)) == expected
    assert llm.stats().num_preemptions > 0
    assert_engine_idle(llm.engine)


def test_a_launch_that_fails_ends_its_requests_and_the_engine_keeps_serving(async_llm, monkeypatch):
    engine = async_llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    real, calls = engine.runner.run_decode, []

    def flaky(step, pending=None):
        calls.append(1)
        if len(calls) == 3:  # a decode launched ahead
            raise RuntimeError("boom")
        return real(step, pending)

    monkeypatch.setattr(engine.runner, "run_decode", flaky)
    for i, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(f"f{i}", prompt, params)
    with pytest.raises(StepError, match="boom") as info:
        while engine.has_unfinished_requests():
            engine.step()
            engine.check_integrity()
    assert sorted(info.value.request_ids) == ["f0", "f1"]
    while engine.has_unfinished_requests():  # outputs landed before the failure, if any
        engine.step()
    monkeypatch.undo()
    assert_engine_idle(engine)
    assert async_llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids == \
        make_llm(async_scheduling=False).generate(PROMPTS[0], params)[0].outputs[0].token_ids
    assert_engine_idle(engine)


def test_async_scheduling_is_validated_and_off_by_default_on_the_cpu():
    from kvforge import EngineConfig

    with pytest.raises(ValueError, match="async_scheduling must be True, False or None"):
        EngineConfig(async_scheduling="yes")
    assert make_llm(device="cpu").engine._overlap is False


def test_prompt_pieces_launched_beside_pending_decodes_give_the_synchronous_tokens(monkeypatch):
    """With a small token budget prompts prefill in pieces while other requests decode: those steps
    launch ahead too (prompt pieces and decodes whose input token is still on the device, in one
    step), and everyone gets the synchronous engine's tokens, the cache consistent after each step."""
    small = {"max_num_batched_tokens": 16, "max_num_seqs": 4}
    expected = _completions(make_llm(async_scheduling=False, **small).generate(PROMPTS, MIXED))
    llm = make_llm(async_scheduling=True, **small)
    engine, real, mixed = llm.engine, llm.engine.runner.run, []

    def run(runs, pending=None):
        mixed.append(pending is not None and any(i >= 0 for i in pending.rows) and max(len(r.token_ids) for r in runs) > 1)
        return real(runs, pending)

    monkeypatch.setattr(engine.runner, "run", run)
    assert _staggered(engine, "m", MIXED, {0: [0, 1], 4: [2, 3]}) == expected
    assert sum(mixed) >= 2
