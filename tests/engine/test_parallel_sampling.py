"""n and best_of: several samples of one prompt, computed once and forked on the paged cache."""

from __future__ import annotations

import pytest

from kvforge import OutputKind, SamplingParams
from kvforge.types import InvalidRequestError
from tests.conftest import PROMPTS, assert_engine_idle, make_llm

SEEDED = SamplingParams(n=4, seed=7, temperature=1.0, max_tokens=10, ignore_eos=True)


def texts(out) -> list[str]:
    return [c.text for c in out.outputs]


def test_n_seeded_samples_are_different_reproducible_and_share_one_prefill(llm):
    engine = llm.engine
    before = engine.stats().prompt_tokens
    out = llm.generate(PROMPTS[0], SEEDED)[0]
    prompt_len = len(out.prompt_token_ids)
    assert engine.stats().prompt_tokens - before == prompt_len  # the prompt was computed once
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len(set(texts(out))) == 4 and all(len(c.token_ids) == 10 for c in out.outputs)
    again = llm.generate(PROMPTS[0], SEEDED)[0]
    assert texts(again) == texts(out)
    assert_engine_idle(engine)


def test_greedy_samples_are_all_the_greedy_completion(llm):
    one = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8))[0]
    three = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=0, max_tokens=8))[0]
    assert texts(three) == texts(one) * 3


def test_best_of_returns_the_n_most_likely_samples_best_first(llm):
    params = SamplingParams(n=2, best_of=5, seed=3, temperature=1.0, max_tokens=8, ignore_eos=True)
    out = llm.generate(PROMPTS[2], params)[0]
    assert [c.index for c in out.outputs] == [0, 1]
    assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    every = llm.generate(PROMPTS[2], SamplingParams(n=5, seed=3, temperature=1.0, max_tokens=8, ignore_eos=True,
                                                    logprobs=0))[0]
    ranked = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    assert texts(out) == [c.text for c in ranked]
    assert out.outputs[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=1e-4)


def test_delta_outputs_of_several_samples_add_up_per_index(llm):
    engine = llm.engine
    engine.add_request("deltas", PROMPTS[3], SamplingParams(n=3, seed=11, max_tokens=6, ignore_eos=True,
                                                           output_kind=OutputKind.DELTA))
    pieces, finished = {0: "", 1: "", 2: ""}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                pieces[c.index] += c.text
            finished.append(out.finished)
    assert finished[-1] and not any(finished[:-1])
    whole = llm.generate(PROMPTS[3], SamplingParams(n=3, seed=11, max_tokens=6, ignore_eos=True))[0]
    assert [pieces[i] for i in range(3)] == texts(whole)


def test_cumulative_outputs_show_every_sample(llm):
    engine = llm.engine
    engine.add_request("cumulative", PROMPTS[0], SamplingParams(n=2, seed=5, max_tokens=4, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert all([c.index for c in o.outputs] == [0, 1] for o in outs)
    assert [len(c.token_ids) for c in outs[-1].outputs] == [4, 4] and outs[-1].finished


def test_aborting_a_request_with_several_samples_frees_them_all(llm):
    engine = llm.engine
    engine.add_request("abort-n", PROMPTS[1], SamplingParams(n=3, seed=1, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 3
    engine.abort_request("abort-n")
    assert_engine_idle(engine)


def test_samples_survive_preemption_and_a_full_running_queue():
    """A tiny cache preempts samples and a two-sequence batch leaves the forks waiting: the seeded
    outputs stay those of a roomy engine."""
    params = SamplingParams(n=3, seed=9, temperature=0.9, max_tokens=24, ignore_eos=True)
    roomy = make_llm().generate(PROMPTS[:2], params)
    tight = make_llm(num_blocks=3, max_num_seqs=2)
    squeezed = tight.generate(PROMPTS[:2], params)
    assert [texts(o) for o in squeezed] == [texts(o) for o in roomy]
    assert tight.engine.stats().num_preemptions > 0
    assert_engine_idle(tight.engine)


def test_samples_of_a_prompt_composed_from_chunks(llm):
    chunk = llm.register_chunk("Paris is the capital and largest city of France.")
    try:
        params = SamplingParams(n=3, seed=2, max_tokens=6, ignore_eos=True)
        out = llm.generate_from_chunks([chunk.chunk_id], " Question: what is Paris?", params, recompute_ratio=0)
        again = llm.generate_from_chunks([chunk.chunk_id], " Question: what is Paris?", params, recompute_ratio=0)
        assert len(out.outputs) == 3 and texts(out) == texts(again)
        assert llm.engine.cache.chunk_users(chunk.chunk_id) == 0
        assert_engine_idle(llm.engine)
    finally:
        llm.unregister_chunk(chunk.chunk_id)


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=0), "n"), (dict(n=2, best_of=1), "best_of"), (dict(n=1000), "n"),
    (dict(best_of=3, output_kind=OutputKind.DELTA), "best_of"),
])
def test_bad_sample_counts_are_refused_naming_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
