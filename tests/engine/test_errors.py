"""Bad input gets a clear ValueError, loses nothing, and the engine keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvforge import LLM, SamplingParams
from kvforge.engine import StepError
from kvforge.types import InvalidRequestError
from tests.conftest import assert_engine_idle

OK = SamplingParams(temperature=0, max_tokens=4)


def _still_serves(llm) -> None:
    assert_engine_idle(llm.engine)
    assert llm.generate("Hello", OK)[0].outputs[0].finish_reason in ("length", "stop")
    assert_engine_idle(llm.engine)


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ({"prompt_token_ids": []}, "non-empty list"),
    ({"prompt_token_ids": [1, 49152]}, r"prompt_token_ids\[1\] = 49152 is not a token id; allowed: integers in \[0, 49151\]"),
    ({"prompt_token_ids": [-1]}, "not a token id"),
    ({"prompt_token_ids": ["a"]}, "not a token id"),
    ({"prompt_token_ids": [5, 1.0]}, r"prompt_token_ids\[1\] = 1.0 is not a token id"),
    ({"prompt_token_ids": [5, 6, True]}, r"prompt_token_ids\[2\] = True is not a token id"),
    ({"prompt_token_ids": [0, 1, False]}, r"prompt_token_ids\[2\] = False is not a token id"),
    ({"prompt_token_ids": [5, 1 << 70]}, r"prompt_token_ids\[1\] = \d+ is not a token id"),
    (42, "a prompt is a string or a dict"),
    ("ab\ud800cd", r"prompt holds a lone surrogate \('\\ud800' at index 2\)"),
    ({"prompt_token_ids": [1, 2], "prompt": 5}, "prompt must be a str"),
])
def test_bad_prompts_are_refused_and_nothing_leaks(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, OK)
    _still_serves(llm)


def test_numpy_integer_token_ids_are_token_ids(llm):
    ids = [np.int64(5), np.int32(17), 99]
    assert llm.engine.tokenize({"prompt_token_ids": ids}) == (None, [5, 17, 99])
    out = llm.generate({"prompt_token_ids": ids}, OK)[0]
    assert out.prompt_token_ids == [5, 17, 99]
    assert out.outputs[0].token_ids == llm.generate({"prompt_token_ids": [5, 17, 99]}, OK)[0].outputs[0].token_ids
    _still_serves(llm)


def test_one_bad_prompt_in_a_batch_refuses_the_whole_batch_and_keeps_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", "also fine", ""], OK)
    assert not llm.engine.has_unfinished_requests()
    _still_serves(llm)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": -1}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
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
    with pytest.raises(ValueError, match="needs 5 KV blocks, more than one request can hold: at most 4 of the cache.s 4"):
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


def test_a_chat_message_with_a_lone_surrogate_is_refused(llm):
    with pytest.raises(ValueError, match=r"messages\[0\].content holds a lone surrogate"):
        llm.chat([{"role": "user", "content": "hi \udfff"}], OK)
    _still_serves(llm)


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": 2 ** 64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"),
    ({"seed": -(2 ** 63) - 1}, "seed must be an integer in"),
    ({"stop": ["x"] * 65}, "stop takes at most 64 strings"),
    ({"stop": "y" * 1025}, "of at most 1024 characters"),
    ({"stop": 5}, "stop must be a non-empty string or a list"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids takes at most 1024 ids"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
])
def test_out_of_range_sampling_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        SamplingParams(**kwargs)
    assert e.value.param == next(iter(kwargs))


def test_the_extreme_seeds_torch_accepts_are_accepted(llm):
    for seed in (2 ** 64 - 1, -(2 ** 63)):
        assert llm.generate("Hi", SamplingParams(max_tokens=2, seed=seed))[0].outputs[0].token_ids
    _still_serves(llm)


def test_a_failing_step_ends_only_its_requests_and_the_engine_keeps_serving(llm, monkeypatch):
    engine = llm.engine
    engine.add_request("in-step-a", "Hello there", OK)
    engine.add_request("in-step-b", "General Kenobi", OK)
    calls = []

    def broken(runs):
        calls.append(len(runs))
        raise RuntimeError("injected kernel failure")

    monkeypatch.setattr(engine.runner, "run", broken)
    with pytest.raises(StepError) as e:
        engine.step()
    assert sorted(e.value.request_ids) == ["in-step-a", "in-step-b"] and calls == [2]
    assert isinstance(e.value.cause, RuntimeError)
    monkeypatch.undo()
    _still_serves(llm)


def test_a_request_outside_a_failing_step_is_untouched(monkeypatch):
    small = LLM("smollm2-135m", kv_cache_memory=64 << 20, max_num_seqs=1)
    engine = small.engine
    engine.add_request("first", "Hello there", OK)
    engine.add_request("second", "General Kenobi", OK)  # waits: one sequence at a time
    real = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda runs: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(StepError) as e:
        engine.step()
    assert e.value.request_ids == ["first"]
    monkeypatch.setattr(engine.runner, "run", real)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(outs) == ["second"]
    alone = small.generate("General Kenobi", OK)[0]
    assert outs["second"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert_engine_idle(engine)


SAMPLING_FIELDS = {
    "n": st.integers(-1, 4), "best_of": st.none() | st.integers(0, 5),
    "presence_penalty": st.floats(-3, 3) | st.just(float("nan")), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "min_p": st.floats(-0.5, 1.5), "min_tokens": st.integers(-1, 4),
    "logit_bias": st.none() | st.dictionaries(st.integers(-2, 49160), st.floats(-200, 200), max_size=3),
    "bad_words": st.none() | st.lists(st.text(max_size=6), max_size=3),
    "allowed_token_ids": st.none() | st.lists(st.integers(-1, 49160), max_size=3),
    "prompt_logprobs": st.none() | st.integers(-2, 3), "logprobs": st.none() | st.integers(-1, 2),
    "truncate_prompt_tokens": st.none() | st.integers(-1, 6), "temperature": st.sampled_from([0, 0.7, 1.0]),
    "top_k": st.integers(-1, 5), "seed": st.none() | st.integers(0, 3),
    "skip_special_tokens": st.booleans() | st.just(1),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({}, optional=SAMPLING_FIELDS), min_size=1, max_size=3))
def test_random_sampling_options_run_or_are_refused_and_nothing_leaks(llm, options):
    """Any mix of the sampling options, in one batch: each request is refused naming one of its
    fields, or runs to the end with as many completions as it asked for."""
    engine = llm.engine
    added = {}
    for i, kwargs in enumerate(options):
        try:
            params = SamplingParams(max_tokens=3, **kwargs)
            engine.add_request(f"fuzz-{i}", "Hi there", params)
        except InvalidRequestError as e:
            assert e.param in kwargs, (e.param, kwargs)
        else:
            added[f"fuzz-{i}"] = params
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert set(done) == set(added)
    for rid, out in done.items():
        assert len(out.outputs) == added[rid].n
        assert (out.prompt_logprobs is not None) == (added[rid].prompt_logprobs is not None)
    assert_engine_idle(engine)
