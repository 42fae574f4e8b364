"""The OpenAI routes through the official client: streamed and whole answers, greedy outputs equal to
LLM.generate / LLM.chat, usage with cached tokens, models, health. Chunks: test_chunks.py."""

from __future__ import annotations

import httpx

from kvforge import SamplingParams

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_completion_greedy_equals_llm_generate(client, llm):
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    got = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.choices[0].text == expected.outputs[0].text
    assert got.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.usage.prompt_tokens_details.cached_tokens == expected.num_cached_tokens


def test_completion_from_token_ids_equals_llm_generate(client, llm):
    ids = llm.get_tokenizer().encode("def fibonacci(n):")
    expected = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=10))[0]
    got = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=10, temperature=0)
    assert got.choices[0].text == expected.outputs[0].text
    assert got.usage.prompt_tokens == len(ids)


def test_seeded_sampling_equals_llm_generate(client, llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234, max_tokens=10)
    expected = llm.generate(PROMPT, params)[0].outputs[0].text
    got = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=10, temperature=0.9,
                                    top_p=0.9, seed=1234, extra_body={"top_k": 40})
    assert got.choices[0].text == expected


def test_chat_greedy_equals_llm_chat(client, llm):
    expected = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    got = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_completion_tokens=12,
                                         temperature=0, user="someone")
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected.outputs[0].text
    assert got.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_chat_adds_up_to_the_whole_answer_and_reports_usage_last(client):
    kw = dict(model="smollm2-135m", messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_adds_up_and_ends_with_done(server, client):
    kw = dict(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    with httpx.stream("POST", server.url + "/v1/completions", json={**kw, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_a_stop_string_is_never_streamed_even_in_part(client):
    kw = dict(model="smollm2-135m", prompt="Paris, Rome, Madrid, Berlin, Lisbon,", max_tokens=24, temperature=0,
              stop=[", Vienna", "\n\n"], extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == whole.choices[0].text
    assert ", Vienna" not in streamed and "\n\n" not in streamed


def test_stop_token_ids_and_ignore_eos_are_honoured(client, llm):
    ids = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].token_ids
    got = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=6, temperature=0,
                                    extra_body={"stop_token_ids": [ids[2]], "ignore_eos": True})
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == 3


def test_priority_and_cache_salt_are_accepted(client):
    got = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=3, temperature=0,
                                    extra_body={"priority": -5, "cache_salt": "tenant-a"})
    assert got.usage.completion_tokens == 3


def test_models_lists_the_served_model(client):
    [model] = client.models.list().data
    assert model.id == "smollm2-135m" and model.owned_by == "kvforge"


def test_health_is_ok(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
