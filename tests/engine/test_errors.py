"""Bad input gets a clear ValueError, loses nothing, and the engine keeps serving."""

from __future__ import annotations

import pytest

from kvforge import LLM, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=4)


def _still_serves(llm) -> None:
    assert llm.generate("Hello", OK)[0].outputs[0].finish_reason in ("length", "stop")
    llm.engine.check_integrity()
    stats = llm.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.cache.num_used_blocks == 0


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ({"prompt_token_ids": []}, "non-empty list"),
    ({"prompt_token_ids": [1, 49152]}, r"prompt_token_ids\[1\] = 49152 is not a token id; allowed: integers in \[0, 49151\]"),
    ({"prompt_token_ids": [-1]}, "not a token id"),
    ({"prompt_token_ids": ["a"]}, "not a token id"),
    (42, "a prompt is a string or a dict"),
])
def test_bad_prompts_are_refused_and_nothing_leaks(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, OK)
    _still_serves(llm)


def test_one_bad_prompt_in_a_batch_refuses_the_whole_batch_and_keeps_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", "also fine", ""], OK)
    assert not llm.engine.has_unfinished_requests()
    _still_serves(llm)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": -1}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.5}, "temperature must be a number >= 0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be an integer >= -1"),
    ({"stop": [""]}, "stop must be a non-empty string"),
])
def test_bad_sampling_params_name_the_field_and_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_over_max_model_len_is_refused_up_front(llm):
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"over max_model_len={limit}"):
        llm.generate({"prompt_token_ids": [5] * limit}, OK)
    _still_serves(llm)


def test_request_larger_than_the_whole_cache_is_refused_up_front():
    small = LLM("smollm2-135m", num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="needs 5 KV blocks, and one request can hold at most 4 of the cache.s 4"):
        small.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10))
    _still_serves(small)


def test_unknown_model_name_lists_what_is_accepted():
    with pytest.raises(ValueError, match="smollm2-135m"):
        LLM("no-such-model")


def test_unknown_engine_option_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown engine option 'blok_size'; allowed: .*block_size"):
        LLM("smollm2-135m", blok_size=16)


def test_duplicate_request_id_is_refused(llm):
    engine = llm.engine
    engine.add_request("dup", "Hello", OK)
    try:
        with pytest.raises(ValueError, match="request id 'dup' is already in use"):
            engine.add_request("dup", "Hello", OK)
    finally:
        engine.abort_request("dup")
    _still_serves(llm)


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    engine.add_request("a", "Tell me a long story", SamplingParams(max_tokens=100))
    engine.step()
    assert engine.cache.stats().num_used_blocks > 0
    engine.abort_request("a")
    engine.abort_request("a")  # a second abort is a no-op
    _still_serves(llm)
