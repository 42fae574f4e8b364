"""LLM.fork: several continuations of one finished generation, sharing its blocks."""

from __future__ import annotations

import pytest

from kvforge import SamplingParams
from tests.conftest import assert_engine_idle

PROMPT = ("A long report on the harbour: the cranes, the ships that came in this week, the weather over the "
          "bay, and what the dock workers said about the new schedule. It begins:")


def test_greedy_continuations_equal_one_longer_greedy_run_and_reuse_the_context(llm):
    longer = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    first = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    computed = llm.stats().prompt_tokens
    forked = llm.fork(first, n=3, sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    context = len(first.prompt_token_ids) + 20
    assert list(forked.prompt_token_ids) == list(first.prompt_token_ids) + list(first.outputs[0].token_ids)
    assert [list(c.token_ids) for c in forked.outputs] == [list(longer.outputs[0].token_ids[20:])] * 3
    assert forked.num_cached_tokens == context // 16 * 16  # every full block of the context was cached
    assert llm.stats().prompt_tokens - computed == context % 16  # only the partial block is computed
    assert_engine_idle(llm.engine)


def test_regenerating_from_a_point_samples_new_endings(llm):
    first = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    forked = llm.fork(first, n=4, at=5, sampling_params=SamplingParams(temperature=1.0, max_tokens=6, seed=3))
    assert list(forked.prompt_token_ids[-5:]) == list(first.outputs[0].token_ids[:5])
    assert len(forked.outputs) == 4 and len({tuple(c.token_ids) for c in forked.outputs}) > 1
    with pytest.raises(ValueError, match="at must"):
        llm.fork(first, at=13)
    with pytest.raises(ValueError, match="index"):
        llm.fork(first, index=1)
    assert_engine_idle(llm.engine)
