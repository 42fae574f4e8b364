"""What a step hands out: DELTA outputs carry only what is new, FINAL_ONLY one output, text that may
start a stop string is held back until it cannot; the detokenizer starts from the prompt's context."""

from __future__ import annotations

import dataclasses

from kvforge import LLM, OutputKind, SamplingParams
from tests.conftest import assert_engine_idle

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPT = "The three laws of thermodynamics are"


def _drain(engine, request_id: str) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def test_delta_outputs_carry_only_the_new_tokens_and_add_up_to_the_cumulative_output(llm):
    engine = llm.engine
    whole = llm.generate(PROMPT, GREEDY)[0].outputs[0]
    engine.add_request("delta", PROMPT, dataclasses.replace(GREEDY, output_kind=OutputKind.DELTA))
    outs = _drain(engine, "delta")
    assert [len(o.outputs[0].token_ids) for o in outs] == [1] * GREEDY.max_tokens
    assert [t for o in outs for t in o.outputs[0].token_ids] == whole.token_ids
    assert "".join(o.outputs[0].text for o in outs) == whole.text
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert_engine_idle(engine)


def test_final_only_gives_one_output_when_the_request_finishes(llm):
    engine = llm.engine
    engine.add_request("final", PROMPT, dataclasses.replace(GREEDY, output_kind=OutputKind.FINAL_ONLY))
    outs = _drain(engine, "final")
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == GREEDY.max_tokens


def test_text_that_may_start_a_stop_string_is_held_back_until_it_cannot(llm):
    whole = llm.generate(PROMPT, GREEDY)[0].outputs[0].text
    # A stop string that starts like the text at some point but never matches whole: every
    # piece handed out must be a prefix of the final text, and the held-back part is released.
    word = whole.split()[3]
    stop = word + "\u2603never"
    params = dataclasses.replace(GREEDY, stop=[stop], output_kind=OutputKind.DELTA)
    llm.engine.add_request("hold", PROMPT, params)
    seen = ""
    for o in _drain(llm.engine, "hold"):
        seen += o.outputs[0].text
        assert whole.startswith(seen)
        if not o.finished:  # the last len(stop) - 1 characters so far are always held back
            assert len(seen) <= len(whole) - (len(stop) - 1)
    assert seen == whole


def test_offline_stream_never_shows_a_stop_string_it_later_cuts(llm):
    whole = llm.generate(PROMPT, GREEDY)[0].outputs[0].text
    cut = whole.index(whole.split()[5])  # stop at the sixth word: its text must never be streamed
    stop = whole[cut:cut + 6]
    pieces = list(llm.stream(PROMPT, dataclasses.replace(GREEDY, stop=[stop])))
    streamed = "".join(pieces)
    assert streamed == whole[:cut]
    assert stop not in streamed
    assert_engine_idle(llm.engine)


def test_the_first_token_keeps_its_leading_space(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    tok = llm.get_tokenizer()
    prompt_ids = tok.encode("The capital of France is")
    expected = tok.decode(prompt_ids + out.token_ids)[len(tok.decode(prompt_ids)):]
    assert out.text == expected and out.text.startswith(" ")


def test_a_preempted_requests_readmission_does_not_count_prefix_hits_twice():
    small = LLM("smollm2-135m", num_blocks=12, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    shared = list(range(1000, 1024))  # three full blocks
    small.generate({"prompt_token_ids": shared + [5]}, SamplingParams(max_tokens=1))  # cache them
    before = small.stats().cache
    prompts = [{"prompt_token_ids": shared + [6 + i]} for i in range(3)]
    outs = small.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    after = small.stats()
    assert after.num_preemptions > 0
    queried = after.cache.prefix_query_tokens - before.prefix_query_tokens
    hit = after.cache.prefix_hit_tokens - before.prefix_hit_tokens
    assert queried == 3 * 25 and hit == 3 * 24  # one lookup per request, however often re-admitted
    assert sum(o.num_cached_tokens for o in outs) == 3 * 24
    assert_engine_idle(small.engine)


def test_a_chunk_registration_is_a_prefill_of_the_running_batch(llm):
    engine = llm.engine
    engine.add_request("decoding", PROMPT, GREEDY)
    engine.step()
    registration = engine.add_chunk_registration("register", "A document about the Moon and its phases.")
    assert registration.chunk is None and not engine.list_chunks() or registration.chunk_id not in \
        [c.chunk_id for c in engine.list_chunks()]
    outs = engine.step()  # the registration's prefill runs beside the decode
    assert {o.request_id for o in outs} == {"decoding", "register"}
    done = next(o for o in outs if o.request_id == "register")
    assert done.finished and done.outputs == []
    chunk = engine.chunk(registration.chunk_id)
    assert chunk.num_tokens == len(done.prompt_token_ids)
    while engine.has_unfinished_requests():
        engine.step()
    engine.unregister_chunk(chunk.chunk_id)
    assert_engine_idle(engine)


def test_aborting_a_chunk_registration_frees_its_pages(llm):
    engine = llm.engine
    before = engine.stats().cache.num_used_blocks
    registration = engine.add_chunk_registration("register-then-abort", "Some text to register " * 20)
    assert engine.stats().cache.num_used_blocks > before
    engine.abort_request("register-then-abort")
    assert engine.stats().cache.num_used_blocks == before
    assert registration.chunk_id not in [c.chunk_id for c in engine.list_chunks()]
    assert_engine_idle(engine)
