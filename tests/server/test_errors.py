"""Every caller mistake is a 400 in OpenAI's error shape; none is a 500, none leaves anything in the
engine, and the server keeps serving. (Chunk mistakes: test_chunks.py.)"""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import assert_idle_and_intact

OK = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_a_400(http, content):
    err = _error(http.post("/v1/completions", content=content, headers={"content-type": "application/json"}))
    assert "JSON" in err["message"]


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", {**OK, "model": "gpt-4"}, "model", "model 'gpt-4' is not served here"),
    ("/v1/completions", {**OK, "temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
    ("/v1/completions", {**OK, "top_p": 0}, "top_p", r"top_p must be in (0, 1]"),
    ("/v1/completions", {**OK, "top_p": 1.5}, "top_p", r"top_p must be in (0, 1]"),
    ("/v1/completions", {**OK, "top_k": -2}, "top_k", "top_k must be an integer >= -1"),
    ("/v1/completions", {**OK, "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1"),
    ("/v1/completions", {**OK, "max_tokens": "many"}, "max_tokens", "valid integer"),
    ("/v1/completions", {**OK, "stop": [""]}, "stop", "stop must be a non-empty string"),
    ("/v1/completions", {**OK, "stop_token_ids": [-1]}, "stop_token_ids", "non-negative integers"),
    ("/v1/completions", {**OK, "cache_salt": ""}, "cache_salt", "cache_salt must be a non-empty string"),
    ("/v1/completions", {**OK, "priority": "high"}, "priority", "valid integer"),
    ("/v1/completions", {**OK, "n": 0}, "n", "n must be an integer in [1, 128]"),
    ("/v1/completions", {**OK, "n": 129}, "n", "n must be an integer in [1, 128]"),
    ("/v1/completions", {**OK, "n": 2, "best_of": 1}, "best_of", "best_of must be None or an integer in [n, 128]"),
    ("/v1/completions", {**OK, "best_of": 2, "stream": True}, "best_of", "for DELTA outputs (streaming)"),
    ("/v1/completions", {**OK, "prompt": ["a"] * 129}, "prompt", "at most 128"),
    ("/v1/completions", {**OK, "prompt": ["a", ""]}, "prompt", "prompt is empty"),
    ("/v1/completions", {**OK, "prompt": [[5, 6], [5] * 8200]}, "prompt", "over max_model_len=8192"),
    ("/v1/completions", {**OK, "prompt": ""}, "prompt", "prompt is empty"),
    ("/v1/completions", {**OK, "prompt": []}, "prompt", "prompt is empty"),
    ("/v1/completions", {**OK, "prompt": [1, 49152]}, "prompt", "prompt_token_ids[1] = 49152 is not a token id"),
    ("/v1/completions", {**OK, "prompt": [5] * 8200}, "prompt", "over max_model_len=8192"),
    ("/v1/completions", {**OK, "prompt": [5] * 8000, "max_tokens": 500}, "max_tokens", "over max_model_len"),
    ("/v1/completions", {**OK, "prompt": [5] * 2000}, "max_tokens", "more than one request can hold"),
    ("/v1/completions", {**OK, "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20]"),
    ("/v1/completions", {**OK, "logprobs": -1}, "logprobs", "logprobs must be an integer in [0, 20]"),
    ("/v1/completions", {**OK, "prompt_logprobs": 21}, "prompt_logprobs", "must be an integer in [0, 20]"),
    ("/v1/completions", {**OK, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available when stream"),
    ("/v1/completions", {**OK, "echo": "loud"}, "echo", "valid boolean"),
    ("/v1/completions", {**OK, "suffix": "x"}, "suffix", "suffix is not supported"),
    ("/v1/completions", {**OK, "echo": True, "logprobs": 0, "chunks": ["c"]}, "echo", "echo with logprobs"),
    ("/v1/completions", {**OK, "presence_penalty": 2.5}, "presence_penalty", "in [-2, 2]"),
    ("/v1/completions", {**OK, "frequency_penalty": -3}, "frequency_penalty", "in [-2, 2]"),
    ("/v1/completions", {**OK, "repetition_penalty": 0}, "repetition_penalty", "must be a number > 0"),
    ("/v1/completions", {**OK, "min_p": 1.5}, "min_p", "min_p must be a number in [0, 1]"),
    ("/v1/completions", {**OK, "min_tokens": 5}, "min_tokens", "min_tokens must be <= max_tokens (2)"),
    ("/v1/completions", {**OK, "logit_bias": {"x": 1}}, "logit_bias", "logit_bias maps token ids"),
    ("/v1/completions", {**OK, "logit_bias": {"5": "lots"}}, "logit_bias.5", "valid number"),
    ("/v1/completions", {**OK, "logit_bias": {"49152": 1}}, "logit_bias", "outside the vocabulary"),
    ("/v1/completions", {**OK, "bad_words": [""]}, "bad_words", "bad_words must be a list"),
    ("/v1/completions", {**OK, "allowed_token_ids": [5, 49152]}, "allowed_token_ids", "outside the vocabulary"),
    ("/v1/completions", {**OK, "allowed_token_ids": []}, "allowed_token_ids", "non-empty list"),
    ("/v1/completions", {**OK, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "integer >= 1"),
    ("/v1/completions", {**OK, "skip_special_tokens": "maybe"}, "skip_special_tokens", "valid boolean"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
    ("/v1/completions", {**OK, "max_tokenz": 3}, "max_tokenz", "Extra inputs are not permitted"),
    ("/v1/completions", {"model": "smollm2-135m"}, "prompt", "Field required"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", "at least 1 item"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, "messages.0.role", "Field required"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", ""),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 9000}, "max_tokens", "over max_model_len"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 1600}]}, "messages",
     "leaves no room for a reply"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools", "tools are not supported"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "in [0, 20]"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 5}, "logprobs", "valid boolean"),
    ("/v1/chat/completions", {**CHAT, "n": 2, "presence_penalty": "x"}, "presence_penalty", "valid number"),
    ("/v1/chat/completions", {**CHAT, "model": "other"}, "model", "is not served here"),
])
def test_bad_requests_are_400_naming_the_field(server, http, path, body, param, message):
    err = _error(http.post(path, json=body))
    assert err["param"] == param and message in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert_idle_and_intact(server)


def test_an_unknown_model_is_a_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_a_prompt_over_the_model_length_is_a_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2-135m", prompt=[5] * 8192, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_unknown_routes_and_methods_keep_the_error_shape(http):
    assert _error(http.get("/v1/nothing"), 404)["type"] == "not_found_error"
    assert _error(http.get("/v1/completions"), 405)["message"] == "Method Not Allowed"


def test_after_every_bad_request_nothing_is_left_and_the_server_still_serves(server, client):
    assert_idle_and_intact(server)
    got = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=2)
    assert got.usage.completion_tokens == 2
    assert_idle_and_intact(server)
