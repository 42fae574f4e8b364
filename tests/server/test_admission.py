"""Admission when the KV cache is full (--on-full reject | wait | shrink, --max-queue) and priority
order, on the tiny engine: 8 blocks of 8 tokens, one running sequence at a time, with
`--admission reserve` (each request's worst case is reserved; admission by need: test_preemption.py).

A request of 8 prompt tokens and max_tokens=32 may hold ceil(39 / 8) = 5 blocks, so while one runs
the headroom is 3 blocks and a second such request does not fit.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import client_for, serving

BIG = {"model": "smollm2-135m", "prompt": list(range(1000, 1008)), "max_tokens": 32, "temperature": 0,
       "ignore_eos": True}


class Blocker:
    """A streaming request that holds its blocks until it finishes; `started` once it has a token."""

    def __init__(self, url: str, body: dict):
        self.started, self.pool = threading.Event(), ThreadPoolExecutor(1)
        self.result: Future = self.pool.submit(self._run, url, {**body, "stream": True})
        assert self.started.wait(30), "the blocking request did not start"

    def _run(self, url: str, body: dict) -> str:
        finish = None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                self.started.set()
                if line.startswith("data: {") and '"finish_reason":"' in line:
                    finish = line.split('"finish_reason":"')[1].split('"')[0]
        return finish


def _post(url: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def _queued(server) -> int:
    return server.loop.snapshot().result(10)[1]


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_reject_answers_503_with_retry_after_and_serves_once_there_is_room(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="reject", retry_after=2) as server:
        blocker = Blocker(server.url, BIG)
        r = _post(server.url, BIG)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        err = r.json()["error"]
        assert "KV cache is full" in err["message"] and err["code"] == "kv_cache_full"
        assert blocker.result.result() == "length"
        assert _post(server.url, BIG).status_code == 200


def test_reject_through_the_client_is_a_503(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="reject") as server:
        blocker = Blocker(server.url, BIG)
        with pytest.raises(openai.APIStatusError) as e:
            client_for(server).completions.create(**{k: v for k, v in BIG.items() if k != "ignore_eos"})
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        blocker.result.result()


def test_wait_queues_the_request_until_there_is_room(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="wait") as server:
        blocker = Blocker(server.url, BIG)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_post, server.url, BIG)
            _wait_for(lambda: _queued(server) == 1)
            assert blocker.result.result() == "length"
            r = waiting.result()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32


def test_wait_gives_up_after_the_queue_timeout_with_a_503(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="wait", queue_timeout=0.3) as server:
        blocker = Blocker(server.url, BIG)
        start = time.monotonic()
        r = _post(server.url, BIG)
        assert r.status_code == 503 and "retry-after" in r.headers
        assert "timed out after 0.3 s waiting for KV cache room" in r.json()["error"]["message"]
        assert 0.25 < time.monotonic() - start < 5
        blocker.result.result()
        assert _queued(server) == 0


def test_over_max_queue_is_a_429(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="wait", max_queue=1) as server:
        blocker = Blocker(server.url, BIG)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(_post, server.url, BIG)
            _wait_for(lambda: _queued(server) == 1)
            r = _post(server.url, BIG)
            assert r.status_code == 429 and "retry-after" in r.headers
            assert "admission queue is full" in r.json()["error"]["message"]
            blocker.result.result()
            assert queued.result().status_code == 200


def test_a_client_that_gives_up_while_queued_leaves_the_queue(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="wait") as server:
        blocker = Blocker(server.url, BIG)
        with pytest.raises(httpx.ReadTimeout):
            _post(server.url, BIG, timeout=0.3)
        _wait_for(lambda: _queued(server) == 0, timeout=3)
        blocker.result.result()


def test_shrink_lowers_max_tokens_to_what_fits_and_finishes_with_length(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="shrink") as server:
        blocker = Blocker(server.url, BIG)
        r = _post(server.url, {**BIG, "prompt": list(range(1000, 1030))})  # 30 prompt tokens cannot fit
        assert r.status_code == 503 and "retry-after" in r.headers
        r = _post(server.url, BIG)  # 3 blocks of 8 are left: 8 prompt tokens + 17 - 1 = 24 slots
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 17
        assert r.json()["choices"][0]["finish_reason"] == "length"
        blocker.result.result()


def _finish_order(server, bodies: dict[str, dict], in_flight) -> list[str]:
    """Send `bodies` one after the other (each arrives before the next is sent, while the blocker
    runs), wait until `in_flight(server)` says they are all held back, return the order they end in."""
    order: list[str] = []

    def send(name: str) -> None:
        assert _post(server.url, bodies[name]).status_code == 200
        order.append(name)

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = []
        for n, name in enumerate(bodies, start=1):
            futures.append(pool.submit(send, name))
            _wait_for(lambda n=n: in_flight(server) == n)
        for f in futures:
            f.result()
    return order


def test_priority_orders_the_admission_queue_lower_first_then_first_come(tiny_engine):
    with serving(tiny_engine, admission="reserve", on_full="wait") as server:
        blocker = Blocker(server.url, {**BIG, "max_tokens": 33})
        short = {**BIG, "prompt": list(range(3000, 3032)), "max_tokens": 2}  # 32 + 2 - 1 tokens: 5 blocks
        bodies = {"b5": {**short, "priority": 5}, "c0": {**short, "priority": 0},
                  "d5": {**short, "priority": 5}, "e-1": {**short, "priority": -1}}
        order = _finish_order(server, bodies, _queued)
        blocker.result.result()
    assert order == ["e-1", "c0", "b5", "d5"]


def test_priority_orders_the_engines_waiting_queue(tiny_engine):
    # Each small request needs 1 block, so all are admitted at once and wait for the one running slot.
    small = {**BIG, "prompt": list(range(2000, 2004)), "max_tokens": 4}
    with serving(tiny_engine, admission="reserve", on_full="reject") as server:
        blocker = Blocker(server.url, {**BIG, "max_tokens": 25})
        bodies = {"b5": {**small, "priority": 5}, "c0": {**small, "priority": 0}, "d5": {**small, "priority": 5},
                  "e-1": {**small, "priority": -1}}
        order = _finish_order(server, bodies, lambda s: s.call(lambda e: e.stats().num_waiting))
        blocker.result.result()
    assert order == ["e-1", "c0", "b5", "d5"]
