"""`n`, several prompts, logprobs, echo, usage in streams and the vLLM sampling extras, through the
official client against the real server, compared with LLM.generate / LLM.chat."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from kvforge import SamplingParams
from kvforge.server.jobs import OutputStream
from kvforge.types import CompletionOutput, Logprob, RequestOutput

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _by_choice(chunks) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Each choice's streamed text and the finish reasons it got."""
    texts, finishes = defaultdict(str), defaultdict(list)
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += (ch.delta.content or "") if hasattr(ch, "delta") else ch.text
            if ch.finish_reason:
                finishes[ch.index].append(ch.finish_reason)
    return dict(texts), dict(finishes)


def test_n_greedy_choices_each_equal_the_single_answer(client, llm):
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [expected.text] * 2
    assert [c.finish_reason for c in got.choices] == [expected.finish_reason] * 2
    assert got.usage.completion_tokens == 2 * len(expected.token_ids)


def test_n_sampled_chat_choices_equal_llm_chat_and_stream_per_choice(client, llm):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=5, n=3)
    expected = [o.text for o in sorted(llm.chat(MESSAGES, params)[0].outputs, key=lambda o: o.index)]
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=7, n=3)
    whole = client.chat.completions.create(**kw)
    assert [c.message.content for c in whole.choices] == expected
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1, 2]
    texts, finishes = _by_choice(chunks)
    assert [texts[i] for i in range(3)] == expected
    assert finishes == {i: [whole.choices[i].finish_reason] for i in range(3)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_best_of_returns_n_choices_in_one_body_and_cannot_stream(client, http, llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=4, n=1, best_of=3)
    expected = llm.generate(PROMPT, params)[0].outputs[0].text
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3, best_of=3)
    assert [c.text for c in got.choices] == [expected]
    r = http.post("/v1/completions", json={"prompt": PROMPT, "best_of": 3, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_several_prompts_get_their_choices_in_order_streamed_or_not(client, llm):
    prompts = [PROMPT, "def fibonacci(n):"]
    expected = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3))]
    kw = dict(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, n=2)
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert [c.text for c in whole.choices] == [expected[0]] * 2 + [expected[1]] * 2
    assert whole.usage.prompt_tokens == sum(len(llm.get_tokenizer().encode(p)) for p in prompts)
    assert whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, finishes = _by_choice(chunks)
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert all(finishes[i] == ["length"] for i in range(4))
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completion_logprobs_are_the_engines_in_openais_shape(client, llm):
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=2))[0].outputs[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(expected.token_ids, expected.logprobs)],
                                              abs=1e-5)
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert token in top and 2 <= len(top) <= 3  # the top 2 and the sampled token
        assert top[token] == max(top.values())  # greedy: the sampled token is the best
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                              stream=True))
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_have_openais_shape(client):
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert "".join(e.token for e in content) == got.choices[0].message.content
    for e in content:
        assert e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).choices[0].logprobs is None


def test_echo_puts_the_prompt_and_its_logprobs_first(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    plain = client.completions.create(**{**kw, "echo": False}).choices[0].text
    assert client.completions.create(**kw).choices[0].text == PROMPT + plain
    got = client.completions.create(**kw, logprobs=1).choices[0]
    lp = got.logprobs
    assert got.text == PROMPT + plain and "".join(lp.tokens) == got.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:]) and all(len(t) in (1, 2) for t in lp.top_logprobs[1:])
    streamed = list(client.completions.create(**kw, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == got.text
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens


def test_prompt_logprobs_come_in_vllms_shape(http, llm):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    ids = llm.get_tokenizer().encode(PROMPT)
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:]):
        assert str(token) in entry and 1 <= len(entry) <= 2
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())


def test_the_sampling_extras_reach_the_engine(client, llm):
    extras = dict(repetition_penalty=1.3, min_p=0.05, min_tokens=5, bad_words=[" Paris"], top_k=50)
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.5)
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=6, **extras, **penalties)
    expected = llm.generate(PROMPT, params)[0].outputs[0].text
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=11, **penalties,
                                    extra_body=extras)
    assert got.choices[0].text == expected
    token = llm.get_tokenizer().encode(" blue")[-1]
    forced = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == " blue" * 3
    allowed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                        extra_body={"allowed_token_ids": [token], "ignore_eos": True})
    assert allowed.choices[0].text == " blue" * 2
    truncated = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 2})
    assert truncated.usage.prompt_tokens == 2


def test_an_output_stream_maps_completions_and_prompts_to_choices():
    """Choice i is completion i % n of prompt i // n; a single body is woken once, when every prompt is done."""
    def out(rid: str, index: int, text: str, finished: bool = False, reason: str | None = None) -> RequestOutput:
        lp = [{5: Logprob(-0.5, 1)}]
        return RequestOutput(rid, None, [1, 2], [CompletionOutput(index, text, [5], reason, logprobs=lp)], finished)

    async def run():
        stream = OutputStream(n=2, num_prompts=2, wake_each_step=False)
        stream.put(out("a", 1, "x"), 0)
        stream.put(out("b", 0, "y", True, "length"), 1)
        assert not stream._ready.is_set()
        stream.put(out("a", 0, "z", True, "stop"), 0)
        assert stream._ready.is_set()
        d = await stream.get()
        assert {i: (c.text, c.finish_reason, len(c.logprobs)) for i, c in d.choices.items()} == {
            1: ("x", None, 1), 2: ("y", "length", 1), 0: ("z", "stop", 1)}
        assert d.finished and sorted(d.prompts) == [0, 1]
        assert (d.num_prompt_tokens, d.num_output_tokens) == (4, 3)

    asyncio.run(run())
