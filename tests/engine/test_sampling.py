"""Sampling parameters and stop conditions as vLLM users expect them."""

from __future__ import annotations

import pytest

from kvforge import SamplingParams
from kvforge.types import InvalidRequestError
from tests.conftest import PROMPTS, assert_engine_idle


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(llm):
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], p)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=16)
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [noisy, p, noisy])[1].outputs[0].token_ids
    assert alone == batched


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    top1 = llm.generate(PROMPTS[3], SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True))
    assert greedy[0].outputs[0].token_ids == top1[0].outputs[0].token_ids


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5
    assert out.outputs[0].finish_reason == "length"
    assert out.finished


def test_stop_string_truncates_text_and_is_reported(llm):
    full = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = text.split()[3]
    cut = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, stop=[stop], ignore_eos=True))[0]
    c = cut.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:text.index(stop)]
    kept = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, stop=stop, ignore_eos=True,
                                                   include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[:text.index(stop) + len(stop)]


def test_stop_token_id_finishes_with_that_reason(llm):
    full = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    target = full.outputs[0].token_ids[3]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[target]))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == target
    ids = full.outputs[0].token_ids
    assert out.outputs[0].token_ids == ids[:ids.index(target) + 1]


def test_chat_uses_the_template_and_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=48))[0]
    assert "<|im_start|>assistant" in llm.get_tokenizer().decode(out.prompt_token_ids, skip_special_tokens=False)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_prompt_token_ids_and_text_prompts_agree(llm):
    tok = llm.get_tokenizer()
    p = SamplingParams(temperature=0, max_tokens=8)
    by_text = llm.generate(PROMPTS[0], p)[0]
    by_ids = llm.generate({"prompt_token_ids": tok.encode(PROMPTS[0])}, p)[0]
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == tok.decode(by_text.outputs[0].token_ids)


def test_stream_yields_the_same_text_as_generate(llm):
    p = SamplingParams(temperature=0, max_tokens=24)
    pieces = list(llm.stream(PROMPTS[2], p))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate(PROMPTS[2], p)[0].outputs[0].text
    llm.engine.check_integrity()


def test_min_tokens_holds_back_eos(llm):
    chat = [{"role": "user", "content": "Hi!"}]
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20  # the model ends its turn early
    eos = set(llm.get_tokenizer().eos_token_ids)
    held = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64, min_tokens=20), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= 20 and not eos & set(held.token_ids[:19])


def test_logit_bias_bans_and_forces_tokens(llm):
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    first = greedy.token_ids[0]
    banned = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logit_bias={first: -100}),
                          use_tqdm=False)[0].outputs[0]
    assert banned.token_ids[0] != first
    forced = llm.generate(PROMPTS[0], SamplingParams(temperature=0.7, seed=1, max_tokens=3, logit_bias={42: 100}),
                          use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [42, 42, 42]


def test_bad_words_keep_a_word_out_of_the_output(llm):
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert "Paris" in greedy.text
    clean = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, bad_words=["Paris"]),
                         use_tqdm=False)[0].outputs[0]
    assert "Paris" not in clean.text


def test_allowed_token_ids_restrict_the_output_and_are_checked_against_the_vocabulary(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=3, max_tokens=8, allowed_token_ids=[7, 9]),
                       use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= {7, 9}
    vocab = llm.engine.model_config.vocab_size
    for field, value in (("allowed_token_ids", [vocab]), ("logit_bias", {vocab + 5: 1.0})):
        with pytest.raises(InvalidRequestError) as e:
            llm.generate(PROMPTS[1], SamplingParams(**{field: value}), use_tqdm=False)
        assert e.value.param == field
    assert_engine_idle(llm.engine)


def test_a_repetition_penalty_repeats_less(llm):
    prompt = "one two three one two three one two three one two"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    penalised = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.5),
                             use_tqdm=False)[0].outputs[0]
    seen = set(llm.get_tokenizer().encode(prompt))
    assert sum(t in seen for t in penalised.token_ids) < sum(t in seen for t in plain.token_ids)
