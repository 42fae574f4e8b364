"""Chunks over HTTP: POST / GET / DELETE /v1/chunks, the `chunks` and `recompute_ratio` fields of
completions and chat completions (greedy outputs equal to LLM.generate_from_chunks, streamed or not),
admission on a chunk request's private tokens, errors in OpenAI's shape (never a 500), the chunk-pool
metrics, and no block left behind."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from kvforge import SamplingParams
from tests.server.conftest import assert_idle_and_intact, serving
from tests.server.test_admission import BIG, Blocker, _queued, _wait_for
from tests.server.test_concurrency import _metrics

MODEL = "smollm2-135m"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant who answers from the documents.<|im_end|>\n"
DOC1 = "Document one: The library opens at nine in the morning and closes at eight in the evening on weekdays."
DOC2 = "Document two: On weekends the library opens at ten and closes at four, except on public holidays."
QUERY = "Question: When does the library open on Saturday? Answer:"
MESSAGES = [{"role": "user", "content": "When does the library open on Saturday?"}]


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _engine_idle(server) -> None:
    _wait_for(lambda: server.call(lambda e: e.stats().num_running + e.stats().num_waiting) == 0)


@pytest.fixture
def register(server, http):
    """register(**body) -> the chunk object; every chunk registered this way is deleted afterwards,
    and then no chunk and no block is left."""
    made: list[str] = []

    def register(**body) -> dict:
        r = http.post("/v1/chunks", json=body)
        assert r.status_code == 200, r.text
        made.append(r.json()["id"])
        return r.json()

    yield register
    _engine_idle(server)
    for chunk_id in made:
        assert http.delete(f"/v1/chunks/{chunk_id}").status_code in (200, 404)
    assert server.call(lambda e: e.list_chunks()) == []
    assert_idle_and_intact(server)


@pytest.fixture
def offline_chunks(llm):
    """The same chunks registered on the offline LLM (unregistered afterwards)."""
    made = []
    yield lambda text, kind="context": made.append(llm.register_chunk(text, kind)) or made[-1]
    for chunk in made:
        llm.unregister_chunk(chunk.chunk_id)


# ---- the /v1/chunks resource --------------------------------------------------------------------

def test_register_list_and_delete(server, http, register):
    before = http.get("/v1/chunks").json()
    assert before == {"object": "list", "data": []}
    n = len(server.engine.tokenizer.encode(DOC1))
    doc = register(text=DOC1, id="doc-1")
    assert doc["id"] == "doc-1" and doc["object"] == "chunk" and doc["kind"] == "context"
    assert doc["num_tokens"] == n and doc["num_pages"] == -(-n // server.engine.cache.block_size)
    assert doc["model"] == MODEL and abs(doc["created"] - time.time()) < 60
    system = register(text=SYSTEM, kind="system", id="sys")
    assert system["kind"] == "system"
    assert http.get("/v1/chunks").json() == {"object": "list", "data": [doc, system]}
    # The same content under the same id again: the registered chunk, nothing new.
    assert register(text=DOC1, id="doc-1") == doc
    assert server.call(lambda e: e.stats().cache.num_chunks) == 2
    r = http.delete("/v1/chunks/doc-1")
    assert r.status_code == 200 and r.json() == {"id": "doc-1", "object": "chunk", "deleted": True}
    assert http.get("/v1/chunks").json()["data"] == [system]
    assert _error(http.delete("/v1/chunks/doc-1"), 404)["code"] == "chunk_not_found"


def test_the_default_id_names_the_content(server, register):
    a = register(text=DOC2)
    assert a["id"].startswith("chunk-")
    assert register(text=DOC2) == a
    ids = server.engine.tokenizer.encode(DOC2)
    assert register(token_ids=ids) == a  # the same tokens, the same chunk
    assert register(text=DOC2, kind="system")["id"] != a["id"]


def test_a_chunk_id_taken_by_other_content_is_a_400(http, register):
    register(text=DOC1, id="taken")
    err = _error(http.post("/v1/chunks", json={"text": DOC2, "id": "taken"}))
    assert err["param"] == "id" and err["code"] == "chunk_id_taken" and "other content" in err["message"]
    err = _error(http.post("/v1/chunks", json={"text": DOC1, "kind": "system", "id": "taken"}))
    assert err["code"] == "chunk_id_taken"


@pytest.mark.parametrize("body, param, message", [
    ({}, "text", "exactly one of text or token_ids"),
    ({"text": "a", "token_ids": [1]}, "text", "exactly one of text or token_ids"),
    ({"text": ""}, "text", "text is empty"),
    ({"token_ids": []}, "token_ids", "token_ids is empty"),
    ({"token_ids": [1, 49152]}, "token_ids", "token_ids[1] = 49152 is not a token id"),
    ({"token_ids": [True]}, "token_ids.0", "valid integer"),
    ({"token_ids": "1 2 3"}, "token_ids", "valid list"),
    ({"text": 5}, "text", "valid string"),
    ({"text": "a", "kind": "document"}, "kind", "kind must be one of system, context"),
    ({"text": "a", "id": ""}, "id", "not a valid chunk id"),
    ({"text": "a", "id": "a/b"}, "id", "not a valid chunk id"),
    ({"text": "a", "id": "x" * 129}, "id", "not a valid chunk id"),
    ({"text": "a", "id": 7}, "id", "valid string"),
    ({"text": "a", "model": "gpt-4"}, "model", "is not served here"),
    ({"text": "a", "name": "doc"}, "name", "Extra inputs are not permitted"),
    ({"token_ids": [5] * 8200}, "token_ids", "over max_model_len"),
])
def test_bad_chunk_bodies_are_400_naming_the_field(server, http, body, param, message):
    err = _error(http.post("/v1/chunks", json=body))
    assert err["param"] == param and message in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert server.call(lambda e: e.list_chunks()) == []
    assert_idle_and_intact(server)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1]"])
def test_a_malformed_chunk_body_is_a_400(http, content):
    err = _error(http.post("/v1/chunks", content=content, headers={"content-type": "application/json"}))
    assert "JSON" in err["message"]


def test_deleting_an_unknown_chunk_is_a_404_through_the_client(client, http):
    err = _error(http.delete("/v1/chunks/nothing-here"), 404)
    assert err == {"message": "no chunk 'nothing-here' is registered", "type": "not_found_error", "param": "id",
                   "code": "chunk_not_found"}
    with pytest.raises(openai.NotFoundError):
        client.delete("/chunks/nothing-here", cast_to=object)


# ---- completions from chunks --------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [None, 0.0, 1.0])
def test_a_completion_from_chunks_equals_llm_generate_from_chunks(client, register, offline_chunks, llm, ratio):
    ids = [register(text=SYSTEM, kind="system")["id"], register(text=DOC1)["id"], register(text=DOC2)["id"]]
    offline = [offline_chunks(SYSTEM, "system"), offline_chunks(DOC1), offline_chunks(DOC2)]
    expected = llm.generate_from_chunks(offline, QUERY, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                        **({} if ratio is None else {"recompute_ratio": ratio}))
    extra = {"chunks": ids, "ignore_eos": True, **({} if ratio is None else {"recompute_ratio": ratio})}
    got = client.completions.create(model=MODEL, prompt=QUERY, max_tokens=10, temperature=0, extra_body=extra)
    assert got.choices[0].text == expected.outputs[0].text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.prompt_tokens == sum(len(llm.get_tokenizer().encode(t)) for t in (SYSTEM, DOC1, DOC2, QUERY))
    assert got.usage.completion_tokens == 10
    assert got.usage.prompt_tokens_details.cached_tokens == expected.num_cached_tokens > 0


def test_the_same_request_from_chunks_gives_the_same_text_twice(client, register):
    ids = [register(text=DOC1)["id"], register(text=DOC2)["id"]]
    kw = dict(model=MODEL, prompt=QUERY, max_tokens=8, temperature=0, extra_body={"chunks": ids})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_a_completion_from_token_ids_and_chunks(client, register, llm):
    ids = [register(text=DOC1)["id"]]
    query = llm.get_tokenizer().encode(QUERY)
    by_text = client.completions.create(model=MODEL, prompt=QUERY, max_tokens=6, temperature=0,
                                        extra_body={"chunks": ids})
    by_ids = client.completions.create(model=MODEL, prompt=query, max_tokens=6, temperature=0,
                                       extra_body={"chunks": ids})
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens


def test_a_chat_completion_from_chunks_uses_the_rendered_messages_as_the_query(client, register, offline_chunks,
                                                                              llm):
    ids = [register(text=DOC1)["id"], register(text=DOC2)["id"]]
    offline = [offline_chunks(DOC1), offline_chunks(DOC2)]
    tok = llm.get_tokenizer()
    query = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)
    expected = llm.generate_from_chunks(offline, query, SamplingParams(temperature=0, max_tokens=10))
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                         extra_body={"chunks": ids, "recompute_ratio": 0.15})
    assert got.choices[0].message.content == expected.outputs[0].text
    assert got.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.prompt_tokens_details.cached_tokens == expected.num_cached_tokens


def test_streams_from_chunks_add_up_to_the_whole_answer(client, register):
    ids = [register(text=SYSTEM, kind="system")["id"], register(text=DOC1)["id"]]
    kw = dict(model=MODEL, prompt=QUERY, max_tokens=10, temperature=0, extra_body={"chunks": ids})
    whole = client.completions.create(**kw)
    pieces = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == whole.choices[0].text
    assert pieces[-1].choices == [] and pieces[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert pieces[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens_details.cached_tokens > 0

    chat = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"chunks": ids})
    whole = client.chat.completions.create(**chat)
    pieces = list(client.chat.completions.create(**chat, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == whole.choices[0].message.content


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_chunk_id_is_a_400_through_the_client(server, client, register, path):
    known = register(text=DOC1)["id"]
    with pytest.raises(openai.BadRequestError) as e:
        if path == "/v1/completions":
            client.completions.create(model=MODEL, prompt=QUERY, max_tokens=2,
                                      extra_body={"chunks": [known, "no-such-chunk"]})
        else:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2,
                                           extra_body={"chunks": ["no-such-chunk"]})
    assert e.value.param == "chunks" and e.value.code == "chunk_not_found"
    assert "unknown chunk id 'no-such-chunk'" in e.value.message and known in e.value.message
    assert_idle_and_intact_but_chunks(server)


OK = {"model": MODEL, "prompt": QUERY, "max_tokens": 2}


@pytest.mark.parametrize("body, param, message", [
    ({**OK, "chunks": []}, "chunks", "chunks is empty"),
    ({**OK, "chunks": "doc"}, "chunks", "valid list"),
    ({**OK, "chunks": [1]}, "chunks.0", "valid string"),
    ({**OK, "chunks": ["DOC"], "recompute_ratio": 1.5}, "recompute_ratio", "must be a number in [0, 1]"),
    ({**OK, "chunks": ["DOC"], "recompute_ratio": -0.1}, "recompute_ratio", "must be a number in [0, 1]"),
    ({**OK, "chunks": ["DOC"], "recompute_ratio": True}, "recompute_ratio", "not a boolean"),
    ({**OK, "chunks": ["DOC"], "recompute_ratio": "all"}, "recompute_ratio", "valid number"),
    ({**OK, "recompute_ratio": 0.5}, "recompute_ratio", "only applies to a request with chunks"),
    ({**OK, "chunks": ["DOC", "SYS"]}, "chunks", "a system chunk must come first"),
    ({**OK, "chunks": ["SYS", "SYS"]}, "chunks", "a system chunk must come first"),
    ({**OK, "chunks": ["DOC"], "prompt": ""}, "prompt", "prompt is empty"),
    ({**OK, "chunks": ["DOC"], "max_tokens": 8192}, "max_tokens", "over max_model_len"),
])
def test_bad_chunk_fields_are_400_naming_the_field(server, http, register, body, param, message):
    names = {"DOC": register(text=DOC1)["id"], "SYS": register(text=SYSTEM, kind="system")["id"]}
    if isinstance(body.get("chunks"), list):
        body = {**body, "chunks": [names.get(c, c) for c in body["chunks"]]}
    err = _error(http.post("/v1/completions", json=body))
    assert err["param"] == param and message in err["message"], err
    assert_idle_and_intact_but_chunks(server)


def assert_idle_and_intact_but_chunks(server) -> None:
    """Nothing runs and every block but the chunks' is free."""
    _engine_idle(server)
    stats = server.call(lambda e: (e.check_integrity(), e.stats())[1])
    assert stats.cache.num_used_blocks == stats.cache.num_chunk_blocks and stats.cache.num_sequences == 0


def test_a_chunk_in_use_cannot_be_deleted_until_its_request_ends(server, http, register):
    doc = register(text=DOC1)["id"]
    body = {"model": MODEL, "prompt": QUERY, "max_tokens": 500, "temperature": 0, "ignore_eos": True,
            "chunks": [doc], "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as streamer:
        with streamer.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            err = _error(http.delete(f"/v1/chunks/{doc}"), 409)
            assert err["code"] == "chunk_in_use" and "in use by 1 request" in err["message"]
        # The client has gone: its request is aborted, its blocks and its use of the chunk end.
    _wait_for(lambda: http.delete(f"/v1/chunks/{doc}").status_code == 200)
    assert_idle_and_intact(server)


def test_chunk_metrics_are_exported_and_move(server, http, register):
    before = _metrics(http)
    assert before["kvforge_chunks"] == 0 and before["kvforge_chunk_blocks"] == 0
    assert before["kvforge_chunk_budget_blocks"] == server.engine.cache.chunk_budget > 0
    a, b = register(text=DOC1), register(text=DOC2)
    during = _metrics(http)
    assert during["kvforge_chunks"] == 2
    assert during["kvforge_chunk_blocks"] == a["num_pages"] + b["num_pages"]
    assert during["kvforge_kv_cache_used_blocks"] == during["kvforge_chunk_blocks"]
    http.post("/v1/completions", json={**OK, "chunks": [a["id"], b["id"]]}).raise_for_status()
    after_request = _metrics(http)
    assert after_request["kvforge_prompt_tokens_total"] - before["kvforge_prompt_tokens_total"] \
        == a["num_tokens"] + b["num_tokens"] + len(server.engine.tokenizer.encode(QUERY))
    assert http.delete(f"/v1/chunks/{a['id']}").status_code == 200
    after = _metrics(http)
    assert after["kvforge_chunks"] == 1 and after["kvforge_chunk_blocks"] == b["num_pages"]
    assert after["kvforge_requests_total{endpoint=/v1/chunks,status=200}"] \
        - before.get("kvforge_requests_total{endpoint=/v1/chunks,status=200}", 0) == 3


# ---- admission on the tiny engine (8 blocks of 8 tokens, a chunk budget of 2 blocks) -------------

CHUNK16 = list(range(2000, 2016))  # 16 tokens: the whole chunk budget, 2 blocks


def _register(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/chunks", json=body, timeout=60)


def _delete_all(server) -> None:
    _engine_idle(server)
    for c in server.call(lambda e: e.list_chunks()):
        assert httpx.delete(f"{server.url}/v1/chunks/{c.chunk_id}").status_code == 200


def test_a_chunk_over_the_chunk_budget_is_a_400(tiny_engine):
    with serving(tiny_engine, admission="reserve") as server:
        assert server.engine.cache.chunk_budget == 2
        err = _error(_register(server.url, token_ids=list(range(2000, 2017))))
        assert err["code"] == "chunk_budget_exceeded" and err["param"] == "token_ids"
        assert "needs 3 blocks but the chunk budget is 2" in err["message"]
        ok = _register(server.url, token_ids=CHUNK16)
        assert ok.status_code == 200 and ok.json()["num_pages"] == 2
        err = _error(_register(server.url, text="one more"))
        assert err["code"] == "chunk_budget_exceeded" and "and 2 are taken" in err["message"]
        _delete_all(server)


def test_a_chunk_the_cache_has_no_room_for_now_is_a_503_with_retry_after(tiny_engine):
    with serving(tiny_engine, admission="reserve", retry_after=3) as server:
        blocker = Blocker(server.url, {**BIG, "max_tokens": 48})  # may hold ceil(55 / 8) = 7 of 8 blocks
        r = _register(server.url, token_ids=CHUNK16)
        err = _error(r, 503)
        assert r.headers["retry-after"] == "3" and err["code"] == "kv_cache_full"
        assert "no room for the chunk now" in err["message"]
        assert blocker.result.result() == "length"
        assert _register(server.url, token_ids=CHUNK16).status_code == 200
        _delete_all(server)


def test_a_chunk_request_is_admitted_on_its_private_tokens(tiny_engine):
    """With the chunk's 2 blocks held, 6 are free. 16 chunk tokens + 8 query tokens + max_tokens 32
    would need ceil(55 / 8) = 7 blocks; the request's own tokens need only ceil(39 / 8) = 5."""
    with serving(tiny_engine, admission="reserve", on_full="reject") as server:
        chunk = _register(server.url, token_ids=CHUNK16).json()["id"]
        body = {**BIG, "chunks": [chunk]}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        use = r.json()["usage"]
        assert use["prompt_tokens"] == 24 and use["prompt_tokens_details"]["cached_tokens"] == 16
        assert use["completion_tokens"] == 32
        _delete_all(server)


def test_shrink_fits_a_chunk_request_on_its_private_tokens(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="shrink") as server:
        chunk = _register(server.url, token_ids=CHUNK16).json()["id"]
        blocker = Blocker(server.url, BIG)  # 5 blocks: 1 left
        r = httpx.post(server.url + "/v1/completions", json={**BIG, "chunks": [chunk]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 1  # 8 query tokens + 1 fit in one block
        assert r.json()["choices"][0]["finish_reason"] == "length"
        blocker.result.result()
        _delete_all(server)


def test_a_chunk_named_by_a_queued_request_is_in_use(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="wait") as server:
        chunk = _register(server.url, token_ids=CHUNK16).json()["id"]
        blocker = Blocker(server.url, BIG)  # 5 blocks + the chunk's 2: 1 left, the next request waits
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.post, server.url + "/v1/completions", json={**BIG, "chunks": [chunk]},
                                  timeout=60)
            _wait_for(lambda: _queued(server) == 1)
            err = _error(httpx.delete(f"{server.url}/v1/chunks/{chunk}"), 409)
            assert err["code"] == "chunk_in_use" and "waiting for cache room" in err["message"]
            assert blocker.result.result() == "length"
            r = waiting.result()
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 16
        _delete_all(server)


@pytest.mark.parametrize("with_chunks", [False, True])
def test_a_chat_without_max_tokens_fits_beside_registered_chunks(tiny_engine, with_chunks):
    """The default max_tokens (as many as fit) counts only the blocks that chunks do not hold: else
    the request would need every block of the cache and could never be admitted while a chunk is
    registered."""
    with serving(tiny_engine, admission="reserve", on_full="wait", queue_timeout=5) as server:
        chunk = _register(server.url, token_ids=CHUNK16).json()["id"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
                "ignore_eos": True, **({"chunks": [chunk]} if with_chunks else {})}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        use = r.json()["usage"]
        # 6 blocks of 8 are left to the request: its own prompt tokens and its reply fill them.
        own = use["prompt_tokens"] - use["prompt_tokens_details"]["cached_tokens"]
        assert own + use["completion_tokens"] == 6 * 8 + 1
        assert r.json()["choices"][0]["finish_reason"] == "length"
        _delete_all(server)
