"""The server's options and headers: `--api-key` (through the official client), X-Request-Id,
`--served-model-name`, `--chat-template`, `--kv-cache-dtype` with `--kv-quality-sample`."""

from __future__ import annotations

import httpx
import openai
import pytest

from kvforge.config import EngineConfig
from kvforge.engine import LLMEngine
from kvforge.server import ServerConfig
from tests.conftest import MODEL, engine_kwargs
from tests.server.conftest import client_for, serving

KEY = "sk-kvforge-test"
OK = {"prompt": "Hello", "max_tokens": 1}


def test_an_api_key_guards_every_route_but_the_probes(engine):
    with serving(engine, api_key=KEY) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with pytest.raises(openai.AuthenticationError) as e:
            client_for(server).completions.create(model="smollm2-135m", prompt="Hello", max_tokens=1)
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert keyed.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=1).usage.completion_tokens
        assert [m.id for m in keyed.models.list().data] == ["smollm2-135m"]
        for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY},
                        {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer " + KEY[:-1]}):
            for method, path in (("POST", "/v1/completions"), ("POST", "/tokenize"), ("GET", "/v1/chunks"),
                                 ("GET", "/v1/nothing")):
                r = http.request(method, path, json=OK, headers=headers)
                assert r.status_code == 401, (headers, path)
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        bearer = {"Authorization": "bearer " + KEY}  # the scheme in any case
        assert http.post("/tokenize", json={"prompt": "Hi"}, headers=bearer).status_code == 200
        for path in ("/health", "/version", "/metrics"):
            assert http.get(path).status_code == 200, path


def test_a_request_id_names_the_response_and_comes_back(server, http):
    r = http.post("/v1/completions", json=OK, headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42"
    with http.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": "trace-43"},
                     json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": True}) as s:
        assert s.headers["x-request-id"] == "trace-43"
        assert '"id":"chatcmpl-trace-43"' in next(line for line in s.iter_lines() if line)
    fresh = http.post("/v1/completions", json=OK)
    assert fresh.json()["id"] == "cmpl-" + fresh.headers["x-request-id"]
    assert http.get("/health", headers={"X-Request-Id": "probe"}).headers["x-request-id"] == "probe"
    bad = http.post("/v1/completions", json=OK, headers={"X-Request-Id": "x" * 257})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_a_served_model_name_is_what_clients_see_and_send(engine):
    with serving(engine, served_model_name="my-model") as server:
        client = client_for(server)
        assert [m.id for m in client.models.list().data] == ["my-model"]
        got = client.completions.create(model="my-model", prompt="Hello", max_tokens=1)
        assert got.model == "my-model"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="other", prompt="Hello", max_tokens=1)


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("as_file", [False, True])
def test_a_chat_template_overrides_the_models(engine, tmp_path, as_file):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    with serving(engine, chat_template=str(path) if as_file else TEMPLATE) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        messages = [{"role": "user", "content": "Hi"}]
        expected = engine.tokenizer.encode("<user>Hi\n", add_special_tokens=False)
        assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == expected
        got = client_for(server).chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=1)
        assert got.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("value, message", [
    ("{% for %}", "chat_template: the chat template does not compile"),
    ("no-such-template.jinja", "is neither a file nor a Jinja template"),
    ("", "is neither a file nor a Jinja template"),
])
def test_a_bad_chat_template_is_refused_by_the_config(value, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(chat_template=value)


def test_the_api_key_stays_out_of_the_configs_repr():
    assert KEY not in repr(ServerConfig(api_key=KEY))


def test_a_quantized_cache_serves_and_exports_its_capacity_and_quality():
    engine = LLMEngine(EngineConfig.from_kwargs(model=MODEL, **engine_kwargs(kv_cache_dtype="int8",
                                                                             kv_quality_sample=1.0)))
    with serving(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        text = http.get("/metrics").text
        assert f"kvforge_kv_cache_bytes_per_token {2 * 30 * 3 * 66:.1f}" in text
        assert 'kvforge_kv_quality_kl_bucket{le="+Inf"} 3.0' in text  # the 3 decode steps


def test_serving_in_the_foreground_first_freezes_the_start_up_heap_out_of_the_garbage_collector(engine, monkeypatch):
    import gc

    import uvicorn

    from kvforge.server.serve import Server

    frozen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *args, **kwargs: frozen.append(gc.get_freeze_count()))
    try:
        Server(engine, ServerConfig(port=0, log_level="warning")).run()  # serves (here: returns at once), stops
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 0  # the engine, its model and arena among the frozen objects
