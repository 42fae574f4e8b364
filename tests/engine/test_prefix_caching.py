"""Automatic prefix caching through the engine: same outputs, exact hit counts, salts, pins, reset."""

from __future__ import annotations

import pytest

from kvforge import SamplingParams
from kvforge.cache import AllBlocksCleared, BlockStored
from tests.conftest import make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SYSTEM = ("You are a careful assistant. Answer briefly and precisely, cite the rule you rely on, and say "
          "when you do not know. The library opens at nine and closes at eight on weekdays.")
QUESTIONS = ["When does the library open?", "When does it close?", "Is it open on weekdays?",
             "What should you say when you do not know?"]


def _prompts(llm) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(SYSTEM + " Question: " + q) for q in QUESTIONS]


def test_greedy_outputs_are_identical_with_and_without_prefix_caching():
    cached, plain = make_llm(), make_llm(enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p in _prompts(cached)]
    # One after another, so later requests hit what earlier ones cached.
    with_cache = [cached.generate(p, GREEDY)[0] for p in prompts]
    without = [plain.generate(p, GREEDY)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in with_cache] == [o.outputs[0].token_ids for o in without]
    assert with_cache[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens >= 32 for o in with_cache[1:])
    assert all(o.num_cached_tokens == 0 for o in without)
    cached.engine.check_integrity()


def test_identical_outputs_under_eviction_pressure_with_a_tiny_pool():
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    big = make_llm(enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p in _prompts(big)] * 2
    expected = [o.outputs[0].token_ids for o in big.generate(prompts, params)]
    tiny = make_llm(num_blocks=10, block_size=16)
    outs = tiny.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = tiny.stats().cache
    assert stats.num_evictions > 0
    assert stats.num_used_blocks == 0
    tiny.engine.check_integrity()


def test_num_cached_tokens_counts_whole_blocks_of_the_shared_prefix_and_never_the_last_token(llm):
    llm.reset_prefix_cache()
    shared = list(range(1000, 1040))  # 40 tokens: 2 full blocks of 16 and 8 more
    first = llm.generate({"prompt_token_ids": shared + [7, 8]}, GREEDY)[0]
    second = llm.generate({"prompt_token_ids": shared + [9, 10]}, GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32
    # The same 32-token prompt again: its last token must be computed, so only one block is reused.
    exact = list(range(2000, 2032))
    llm.generate({"prompt_token_ids": exact}, GREEDY)
    again = llm.generate({"prompt_token_ids": exact}, GREEDY)[0]
    assert again.num_cached_tokens == 16
    stats = llm.stats().cache
    assert stats.prefix_hit_tokens >= 48 and 0 < stats.prefix_hit_rate < 1
    llm.engine.check_integrity()


def test_requests_with_different_salts_never_share_blocks(llm):
    ids = list(range(3000, 3050))
    salted = SamplingParams(temperature=0, max_tokens=4, cache_salt="tenant-a")
    assert llm.generate({"prompt_token_ids": ids}, salted)[0].num_cached_tokens == 0
    other = SamplingParams(temperature=0, max_tokens=4, cache_salt="tenant-b")
    assert llm.generate({"prompt_token_ids": ids}, other)[0].num_cached_tokens == 0
    assert llm.generate({"prompt_token_ids": ids}, GREEDY)[0].num_cached_tokens == 0
    # The per-request argument overrides the params' salt; the same salt shares.
    by_prompt = llm.generate({"prompt_token_ids": ids, "cache_salt": "tenant-a"}, GREEDY)[0]
    assert by_prompt.num_cached_tokens == 48
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt_token_ids": ids, "cache_salt": ""}, GREEDY)
    llm.engine.check_integrity()


def test_a_pinned_prefix_survives_pressure_and_unpinned_blocks_go_first():
    llm = make_llm(num_blocks=12, block_size=16, max_pinned_fraction=0.5)
    system = list(range(4000, 4064))  # 4 blocks
    handle = llm.pin_prefix(system)
    assert handle.num_tokens == 64
    assert llm.stats().cache.num_pinned_blocks == 4
    # Fill the rest of the pool with other prompts many times over.
    for i in range(6):
        llm.generate({"prompt_token_ids": list(range(5000 + 100 * i, 5000 + 100 * i + 100))}, GREEDY)
    assert llm.stats().cache.num_evictions > 0
    hit = llm.generate({"prompt_token_ids": system + [1, 2, 3]}, GREEDY)[0]
    assert hit.num_cached_tokens == 64
    llm.unpin(handle)
    llm.unpin(handle)  # a second unpin is a no-op
    assert llm.stats().cache.num_pinned_blocks == 0
    llm.engine.check_integrity()


def test_pins_over_the_budget_are_refused_with_the_budget_named():
    llm = make_llm(num_blocks=12, block_size=16, max_pinned_fraction=0.25)  # 3 blocks
    with pytest.raises(ValueError, match="budget"):
        llm.pin_prefix(list(range(100, 164)))  # 4 blocks
    with pytest.raises(ValueError, match="fills no block"):
        llm.pin_prefix([1, 2, 3])
    llm.engine.check_integrity()


def test_reset_is_refused_while_blocks_are_in_use_and_clears_the_cache_after():
    llm = make_llm()
    llm.generate({"prompt_token_ids": list(range(600, 650))}, GREEDY)
    llm.take_events()
    engine = llm.engine
    engine.add_request("busy", {"prompt_token_ids": list(range(700, 760))}, SamplingParams(max_tokens=50))
    engine.step()
    with pytest.raises(ValueError, match="in use"):
        llm.reset_prefix_cache()
    engine.abort_request("busy")
    llm.reset_prefix_cache()
    assert llm.stats().cache.num_cached_blocks == 0
    events = llm.take_events()
    assert any(isinstance(e, BlockStored) for e in events)
    assert isinstance(events[-1], AllBlocksCleared)
    assert llm.generate({"prompt_token_ids": list(range(600, 650))}, GREEDY)[0].num_cached_tokens == 0
    engine.check_integrity()


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    big = make_llm(enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p in _prompts(big)]
    expected = [o.outputs[0].token_ids for o in big.generate(prompts, params)]
    tiny = make_llm(num_blocks=9, block_size=16)
    outs = tiny.generate(prompts, params)
    assert tiny.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    tiny.engine.check_integrity()
