"""Speculative decoding (prompt lookup): greedy output equal to plain decoding token for token, the
cache holding exactly the accepted tokens after every step, preemption and prefix caching alongside,
and the rejection-sampling rule keeping the sampled distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvforge import SamplingParams
from kvforge.config import EngineConfig
from kvforge.engine.spec import propose_ngram
from kvforge.model.sampler import SamplingRow, verify_draft
from tests.conftest import PROMPTS, assert_engine_idle, make_llm, run_checked, run_counted

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
        "step. All that glitters is not gold. Actions speak louder than words.")
EDIT = f"Repeat the following text exactly, word for word:\n\n{TEXT}\n\nRepeated text:\n\n{TEXT[:40]}"
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SPEC = {"method": "ngram", "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def plain():
    return make_llm()


@pytest.fixture(scope="module")
def speculating():
    return make_llm(speculative_config=SPEC)


def test_greedy_output_is_plain_greedy_token_for_token(plain, speculating):
    prompts = [EDIT, *PROMPTS, TEXT * 2]
    expected = run_checked(plain, prompts, GREEDY)
    outputs, drafted, accepted = run_counted(speculating, prompts, GREEDY)
    assert outputs == expected
    assert drafted > 0 and 0 < accepted <= drafted
    assert_engine_idle(speculating.engine)


def test_the_editing_prompt_accepts_most_drafts_and_needs_fewer_steps(plain, speculating):
    steps = plain.stats().num_steps
    run_checked(plain, [EDIT], GREEDY)
    plain_steps = plain.stats().num_steps - steps
    steps = speculating.stats().num_steps
    _, drafted, accepted = run_counted(speculating, [EDIT], GREEDY)
    assert speculating.stats().num_steps - steps < plain_steps / 2
    assert accepted > 0.6 * drafted


def test_speculation_survives_preemption_and_a_small_cache():
    prompts = [EDIT, TEXT, *PROMPTS]
    with make_llm(kv_cache_memory=None, num_blocks=16, speculative_config=SPEC) as llm:
        got = run_checked(llm, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        assert_engine_idle(llm.engine)
    with make_llm(kv_cache_memory=None, num_blocks=16) as llm:
        assert got == run_checked(llm, prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))


def test_sampled_requests_with_a_seed_are_reproducible_and_end_cleanly(speculating):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=7)
    first = run_checked(speculating, [EDIT, TEXT], params)
    assert run_checked(speculating, [EDIT, TEXT], params) == first
    assert_engine_idle(speculating.engine)


@pytest.mark.parametrize("processors", [
    {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3},
    {"min_tokens": 12, "bad_words": ["fox", " dog"], "logit_bias": {11: 2.0}},
], ids=["penalties", "min_tokens-bad_words-bias"])
def test_requests_with_logits_processors_speculate_and_keep_plain_greedy_output(plain, speculating, processors):
    # each verified position is processed as if the drafts before it were out: penalties count them
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=2, **processors)
    prompts = [EDIT, TEXT * 2]
    expected = run_checked(plain, prompts, params)
    outputs, drafted, accepted = run_counted(speculating, prompts, params)
    assert outputs == expected
    assert drafted > 0 and accepted > 0
    assert_engine_idle(speculating.engine)


def test_several_samples_of_a_request_speculate_each(plain, speculating):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=2)
    want = [c.token_ids for c in plain.generate([EDIT], greedy, use_tqdm=False)[0].outputs]
    drafted = speculating.stats().spec_draft_tokens
    got = speculating.generate([EDIT], greedy, use_tqdm=False)[0]
    assert speculating.stats().spec_draft_tokens > drafted
    assert [c.token_ids for c in got.outputs] == want
    best = SamplingParams(temperature=0.7, max_tokens=16, n=2, best_of=3, seed=5)
    [out] = speculating.generate([EDIT], best, use_tqdm=False)
    assert len(out.outputs) == 2 and out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
    assert all(c.cumulative_logprob < 0 for c in out.outputs)  # ranked by the verifying logits' log-probabilities
    assert_engine_idle(speculating.engine)


def test_speculated_tokens_carry_the_logprobs_plain_decoding_gives(plain, speculating):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    [want] = plain.generate([EDIT], params, use_tqdm=False)
    drafted = speculating.stats().spec_draft_tokens
    [got] = speculating.generate([EDIT], params, use_tqdm=False)
    assert speculating.stats().spec_draft_tokens > drafted  # it did speculate
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.outputs[0].logprobs) == len(want.outputs[0].logprobs) == 24
    for g, w in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
        assert g.keys() == w.keys()
        for token in w:
            assert g[token].rank == w[token].rank
            assert abs(g[token].logprob - w[token].logprob) < 1e-3
    assert abs(got.outputs[0].cumulative_logprob - want.outputs[0].cumulative_logprob) < 1e-2
    assert_engine_idle(speculating.engine)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 1, 3) == [7, 1]
    assert propose_ngram([5, 6, 7, 5, 6], 4, 2, 2) == [7, 5, 6]
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert propose_ngram([1, 1], 0, 1, 1) == []


def test_speculative_config_is_validated():
    assert EngineConfig.from_kwargs(speculative_config=SPEC).speculative.num_speculative_tokens == 4
    for bad in ({"method": "draft"}, {"num_speculative_tokens": 0}, {"prompt_lookup_min": 3, "prompt_lookup_max": 2},
                {"k": 3}, "not json", {"method": "draft", "model": "smollm2-135m", "prompt_lookup_max": 3}):
        with pytest.raises(ValueError, match="speculative"):
            EngineConfig.from_kwargs(speculative_config=bad)


# ---------------------------------------------------------------- the acceptance rule, on a tiny model
def test_rejection_sampling_keeps_each_emitted_token_distributed_as_the_target():
    """A 5-token "model" with fixed next-token logits at two positions; drafts [2, 0]. Over many
    seeded trials the first emitted token follows p1 and, when the first draft was accepted, the second
    follows p2 (the draft is a point proposal, so a rejection draws from p without the drafted token)."""
    logits = torch.tensor([[0.5, -1.0, 1.2, 0.0, -0.3], [1.5, 0.2, -0.7, 0.3, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    p1, p2 = logits[0].softmax(-1), logits[1].softmax(-1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    row = SamplingRow(params, gen)
    trials = 20000
    first, second = Counter(), Counter()
    for _ in range(trials):
        out = verify_draft(logits, [2, 0], row)
        first[out[0]] += 1
        if out[0] == 2:
            second[out[1]] += 1
    n2 = sum(second.values())
    for t in range(5):
        assert abs(first[t] / trials - float(p1[t])) < 0.012, (t, first)
        assert abs(second[t] / n2 - float(p2[t])) < 0.02, (t, second)


def test_greedy_acceptance_stops_at_the_first_mismatch():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    row = SamplingRow(SamplingParams(temperature=0))
    assert verify_draft(logits, [1, 0], row) == [1, 0, 2]  # both accepted, then the bonus token
    assert verify_draft(logits, [1, 2], row) == [1, 0]  # the second rejected: the argmax instead
    assert verify_draft(logits, [2, 0], row) == [1]


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_requests_composed_from_chunks_speculate_and_keep_plain_greedy_output(plain, speculating, ratio):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    question = f"\n\nRepeat the text above exactly, word for word:\n\n{TEXT[:30]}"
    outputs = []
    for llm in (plain, speculating):
        system = llm.register_chunk("You repeat texts.", kind="system")
        doc = llm.register_chunk(TEXT)
        drafted = llm.stats().spec_draft_tokens
        outputs.append(llm.generate_from_chunks([system, doc], question, params, recompute_ratio=ratio)
                       .outputs[0].token_ids)
        if llm is speculating:
            assert llm.stats().spec_draft_tokens > drafted
        for chunk in (system, doc):
            llm.unregister_chunk(chunk.chunk_id)
        assert_engine_idle(llm.engine)
    assert outputs[0] == outputs[1]


def test_a_prompt_whose_last_token_verifies_a_draft_is_counted_and_timed():
    # 16 tokens a step: the 17th prompt token is left alone for the next step, where prompt lookup
    # drafts from the repeating prompt and the verify run computes it
    with make_llm(max_num_batched_tokens=16, speculative_config=SPEC) as llm:
        ids = llm.get_tokenizer().encode(TEXT, add_special_tokens=False)[:12]
        prompt = (ids * 3)[:17]
        engine = llm.engine
        engine.add_request("r", {"prompt_token_ids": prompt}, GREEDY)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                first = first or out
        assert llm.stats().spec_draft_tokens > 0
        assert first.metrics.first_token_time is not None
        assert llm.stats().prompt_tokens == 17
        assert_engine_idle(engine)
