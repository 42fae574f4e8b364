"""No request can stop the server or leave state behind: strange input is a 4xx, a failing step or
preparation fails only its own requests (500) and the server keeps serving, /health tells the truth,
a client that goes away (before the first byte, mid-stream) or reads slowly costs nobody anything."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from kvforge.engine import StepError
from kvforge.server.jobs import OutputStream
from kvforge.types import CompletionOutput, RequestOutput
from tests.server.conftest import assert_idle_and_intact, serving

OK = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _serves(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json=OK)
    assert r.status_code == 200, r.text
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"prompt": "ab\\ud800cd", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 2, "stream": true}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}',
     "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "hi"}], "max_tokens": 2}', "messages"),
    ("/v1/chunks", b'{"text": "a document \\udc00"}', "text"),
    ("/v1/completions", b'{"prompt": "Hi", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field_and_the_server_keeps_serving(server, http, path, raw, param):
    err = _error(http.post(path, content=raw, headers={"content-type": "application/json"}), 400)
    assert "lone surrogate" in err["message"] and err["param"] == param, err
    _serves(http)
    assert_idle_and_intact(server)


@pytest.mark.parametrize("body, param, message", [
    ({**OK, "seed": 2 ** 64}, "seed", "seed must be an integer in [-2**63, 2**64 - 1]"),
    ({**OK, "seed": -(2 ** 63) - 1}, "seed", "seed must be an integer in"),
    ({**OK, "stop": ["x"] * 65}, "stop", "stop takes at most 64 strings"),
    ({**OK, "stop": "y" * 2000}, "stop", "of at most 1024 characters"),
    ({**OK, "stop_token_ids": list(range(2000))}, "stop_token_ids", "stop_token_ids takes at most 1024 ids"),
    ({**OK, "max_tokens": 2 ** 70}, "max_tokens", "over max_model_len"),
])
def test_out_of_range_values_are_a_400_and_leave_nothing(server, http, body, param, message):
    err = _error(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param and message in err["message"], err
    assert_idle_and_intact(server)


def test_a_chunk_request_with_a_bad_seed_leaves_the_chunk_free_to_delete(server, http):
    chunk = http.post("/v1/chunks", json={"text": "A short document about tides.", "id": "seed-doc"})
    assert chunk.status_code == 200, chunk.text
    err = _error(http.post("/v1/completions", json={**OK, "chunks": ["seed-doc"], "seed": 2 ** 64}), 400)
    assert err["param"] == "seed"
    assert http.delete("/v1/chunks/seed-doc").status_code == 200
    assert_idle_and_intact(server)


@pytest.mark.parametrize("raw", [b'{"prompt": "Hi", "temperature": NaN}', b'{"prompt": "Hi", "top_p": Infinity}',
                                 b'{"prompt": "Hi", "max_tokens": -Infinity}', b"[" * 100_000 + b"]" * 100_000])
def test_nan_infinity_and_deep_nesting_are_not_json_here(server, http, raw):
    err = _error(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in err["message"]
    _serves(http)


def test_a_body_over_the_limit_is_a_413_whether_its_length_is_declared_or_not(engine):
    with serving(engine, max_body_bytes=4096) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        big = {**OK, "prompt": "x" * 5000}
        err = _error(http.post("/v1/completions", json=big), 413)
        assert "over the limit of 4096 bytes" in err["message"]

        def chunked():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        err = _error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                     413)
        assert "over the limit" in err["message"]
        _serves(http)


def test_the_default_body_limit_is_4_mib(server, http):
    assert server.config.max_body_bytes == 4 << 20
    err = _error(http.post("/v1/chunks", json={"text": "z" * (5 << 20)}), 413)
    assert err["code"] == "request_too_large"


def test_a_failing_step_is_a_500_for_its_requests_only_and_the_server_keeps_serving(engine, monkeypatch):
    with serving(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        real = engine.runner.run
        monkeypatch.setattr(engine.runner, "run", _fail_call(real, 1, "injected kernel failure"))
        err = _error(http.post("/v1/completions", json=OK), 500)
        assert err["type"] == "internal_server_error" and "injected" in err["message"]
        assert http.get("/health").status_code == 200  # intact, and one failure is not a pattern
        _serves(http)
        metrics = http.get("/metrics").text
        assert "kvforge_engine_step_failures_total 1.0" in metrics


def test_health_is_503_while_steps_keep_failing_and_recovers_when_they_succeed(engine, monkeypatch):
    with serving(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        real = engine.runner.run

        def always(runs):
            raise RuntimeError("injected: the device is gone")

        monkeypatch.setattr(engine.runner, "run", always)
        for _ in range(3):
            _error(http.post("/v1/completions", json=OK), 500)
        assert _error(http.get("/health"), 503)["type"] == "server_unhealthy"
        monkeypatch.setattr(engine.runner, "run", real)
        _serves(http)  # the step succeeds: healthy again
        assert_idle_and_intact(server)


def test_a_stream_whose_step_fails_ends_with_an_error_event(engine, monkeypatch):
    with serving(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        real = engine.runner.run
        monkeypatch.setattr(engine.runner, "run", _fail_call(real, 3, "injected mid-stream"))
        with http.stream("POST", "/v1/completions", json={**OK, "max_tokens": 8, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"internal_server_error"' in lines[-2] and lines[-1] == "data: [DONE]"
        monkeypatch.setattr(engine.runner, "run", real)
        _serves(http)
        assert_idle_and_intact(server)


def test_an_unexpected_error_while_preparing_fails_that_request_alone(engine, monkeypatch):
    with serving(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        real = engine.prepare_request

        def broken(request_id, prompt, *args, **kwargs):
            if prompt.get("prompt") == "poison":
                raise KeyError("injected")
            return real(request_id, prompt, *args, **kwargs)

        monkeypatch.setattr(engine, "prepare_request", broken)
        err = _error(http.post("/v1/completions", json={**OK, "prompt": "poison"}), 500)
        assert "KeyError" in err["message"]
        _serves(http)
        assert_idle_and_intact(server)


def test_an_abort_that_raises_does_not_stop_the_loop(engine, monkeypatch):
    with serving(engine) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        real = engine.abort_request
        monkeypatch.setattr(engine, "abort_request", lambda rid: (_ for _ in ()).throw(RuntimeError("injected")))
        server.loop.abort(_FakeJob())  # a running job whose abort raises
        server.call(lambda e: None)  # handled after the abort: the loop is past it
        monkeypatch.setattr(engine, "abort_request", real)
        _serves(http)


def test_a_disconnect_before_the_first_byte_aborts_the_request_and_frees_its_blocks(server, http):
    finished = _aborts(http)
    body = b'{"prompt": [' + b",".join([b"1000"] * 1000) + b'], "max_tokens": 64, "stream": true, "ignore_eos": true}'
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.2)  # the request is admitted and prefilling: no byte has been sent yet
    _wait_for(lambda: _aborts(http) == finished + 1)
    assert_idle_and_intact(server)


def test_a_slow_reader_gets_the_whole_text_and_costs_no_backlog(server, http):
    body = {**OK, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        text, events = "", 0
        for line in r.iter_lines():
            time.sleep(0.05)  # slower than the engine produces tokens
            if line.startswith("data: {"):
                events += 1
                text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
    assert text == whole
    assert_idle_and_intact(server)


def test_an_output_stream_coalesces_what_the_reader_has_not_taken():
    """However many outputs arrive while nobody reads, the stream holds one pending delta."""
    import asyncio

    async def run():
        stream = OutputStream()
        for i in range(1000):
            stream.put(RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, f"{i % 10}", [i], None)], False))
        stream.put(RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "!", [7], "stop")], True, 1))
        d = await stream.get()
        [c] = d.choices.values()
        assert d.finished and len(c.token_ids) == 1001 and d.num_output_tokens == 1001 and len(c.text) == 1001
        assert c.finish_reason == "stop" and d.num_prompt_tokens == 3 and d.num_cached_tokens == 1
        assert stream._pending is None

    asyncio.run(run())


def test_kv_events_are_drained_by_an_endpoint(server, http):
    http.get("/v1/kv_events")  # drain what earlier tests left
    r = http.post("/v1/completions", json={**OK, "prompt": [1000 + i for i in range(40)], "max_tokens": 1})
    assert r.status_code == 200
    events = http.get("/v1/kv_events").json()
    stored = [e for e in events["data"] if e["type"] == "BlockStored"]
    assert stored and sum(len(e["block_hashes"]) for e in stored) == 40 // 16
    assert stored[0]["token_ids"][:3] == [1000, 1001, 1002] and events["dropped"] == 0
    assert http.get("/v1/kv_events").json()["data"] == []


# ---- helpers -------------------------------------------------------------------------------------

def _fail_call(real, n: int, message: str):
    """`real` (the runner's run), except that its `n`-th call raises RuntimeError(message)."""
    calls = []

    def run(runs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(message)
        return real(runs)

    return run


class _FakeJob:
    request_id, state = "no-such-request", "running"


def _aborts(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('kvforge_request_finished_total{reason="abort"}'):
            return float(line.split()[-1])
    return 0.0


def _wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_step_error_names_the_requests_it_ended():
    e = StepError(["a", "b"], ValueError("x"))
    assert e.request_ids == ["a", "b"] and "2 request(s)" in str(e)


def test_a_cache_salt_with_a_lone_surrogate_is_a_400_naming_it(server, http):
    raw = b'{"prompt": "Hi", "max_tokens": 1, "cache_salt": "tenant-\\ud800"}'
    err = _error(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
    assert err["param"] == "cache_salt" and "lone surrogate" in err["message"]
    assert_idle_and_intact(server)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected death
def test_a_handler_does_not_wait_forever_on_an_engine_loop_that_died():
    """Should the loop thread ever die (here: something no `except Exception` catches), a waiting
    handler answers 503 within a second and /health says so; nothing hangs."""
    from kvforge.config import EngineConfig
    from kvforge.engine import LLMEngine
    from kvforge.server import ServerConfig
    from kvforge.server.serve import Server
    from tests.conftest import MODEL

    engine = LLMEngine(EngineConfig.from_kwargs(model=MODEL, kv_cache_memory=16 << 20, max_model_len=64))

    def die():
        raise SystemExit("injected: the loop thread ends")

    engine.step = die
    server = Server(engine, ServerConfig(port=0, log_level="critical")).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            start = time.monotonic()
            err = _error(http.post("/v1/completions", json=OK), 503)
            assert "engine loop has stopped" in err["message"] and time.monotonic() - start < 5
            assert http.get("/health").status_code == 503
            assert _error(http.get("/metrics"), 503)["type"] == "server_unhealthy"
    finally:
        server.stop()
