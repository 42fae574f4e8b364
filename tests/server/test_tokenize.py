"""vLLM's POST /tokenize and /detokenize and GET /version: the engine's own tokenizer and chat
template, vLLM's shapes, and a 400 naming the field for a bad body."""

from __future__ import annotations

import pytest

import kvforge

MESSAGES = [{"role": "user", "content": "Hi there"}]


def test_tokenize_a_prompt_as_the_engine_does(http, engine):
    r = http.post("/tokenize", json={"model": "smollm2-135m", "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    ids = engine.tokenizer.encode("Hello world")
    assert r.json() == {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    bare = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()["tokens"]
    assert bare == engine.tokenizer.encode("Hello world", add_special_tokens=False)


def test_tokenize_messages_with_the_chat_template(http, engine):
    got = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert got["tokens"] == engine.tokenize_chat(MESSAGES)["prompt_token_ids"]
    bare = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["tokens"] == engine.tokenize_chat(MESSAGES, add_generation_prompt=False)["prompt_token_ids"]
    assert bare["count"] < got["count"]


def test_detokenize_inverts_tokenize_and_keeps_special_tokens(http, engine):
    ids = http.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": ids}).json() == {
        "prompt": engine.tokenizer.decode(ids, skip_special_tokens=False)}
    eos = engine.tokenizer.eos_token_id
    assert http.post("/detokenize", json={"tokens": [eos]}).json()["prompt"] == engine.tokenizer.id_to_token(eos)


def test_version_is_kvforges(http):
    assert http.get("/version").json() == {"version": kvforge.__version__}


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", b'{"prompt": "ab\\ud800"}', "prompt"),  # a lone surrogate
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("/tokenize", {"prompt": "a", "extra": 1}, "extra"),
    ("/detokenize", {"tokens": [49152]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, "tokens.0"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_bodies_are_a_400_naming_the_field(http, path, body, param):
    r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
