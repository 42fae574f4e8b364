"""Many clients share one continuous batch; a client that goes away frees its blocks at once;
/metrics parses and moves."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import assert_idle_and_intact

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The three laws of"]


def _metrics(http) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_sixteen_concurrent_streams_share_the_batch_and_free_every_block(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    steps_before = server.call(lambda e: e.stats().num_steps)

    async def one(i: int) -> tuple[str, int, str]:
        stream = await client.completions.create(model="smollm2-135m", prompt=PROMPTS[i % 4], max_tokens=16,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        pieces, finish = [], None
        async for c in stream:
            pieces.append(c.choices[0].text)
            finish = c.choices[0].finish_reason or finish
        return "".join(pieces), len(pieces), finish

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    assert all(finish == "length" for _, _, finish in results)
    # Greedy: the same prompt gives the same text whatever else shares the batch.
    for i in range(4):
        assert len({results[j][0] for j in range(i, 16, 4)}) == 1
    steps = server.call(lambda e: e.stats().num_steps) - steps_before
    assert steps < 16 * 16 / 2, f"{steps} steps for 16 x 16 tokens: the requests did not share the batch"
    assert_idle_and_intact(server)


def test_a_client_that_disconnects_mid_stream_frees_its_blocks_at_once(server, http):
    before = _metrics(http).get("kvforge_request_finished_total{reason=abort}", 0)
    body = {"model": "smollm2-135m", "prompt": PROMPTS[0], "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert next(line for line in lines if line).startswith("data: ")
        held = server.call(lambda e: e.stats())
        assert held.num_running == 1 and held.cache.num_used_blocks > 0
    start = time.monotonic()
    assert_idle_and_intact(server, timeout=5)
    assert time.monotonic() - start < 2, "the aborted request's blocks were not freed promptly"
    assert _metrics(http)["kvforge_request_finished_total{reason=abort}"] == before + 1


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_blocks_at_once(server):
    body = {"model": "smollm2-135m", "prompt": PROMPTS[1], "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    start = time.monotonic()
    assert_idle_and_intact(server, timeout=5)
    assert time.monotonic() - start < 2, "the abandoned request's blocks were not freed promptly"


def test_metrics_parse_and_counters_move_with_requests(server, client, http):
    before = _metrics(http)
    # long enough to fill a block, so the prefix cache holds one whatever ran before
    client.completions.create(model="smollm2-135m", prompt=" ".join(PROMPTS), max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    list(client.completions.create(model="smollm2-135m", prompt=PROMPTS[2], max_tokens=5, stream=True,
                                   extra_body={"ignore_eos": True}))
    http.post("/v1/completions", json={"prompt": "x", "temperature": -1})
    after = _metrics(http)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved("kvforge_requests_total{endpoint=/v1/completions,status=200}") == 2
    assert moved("kvforge_requests_total{endpoint=/v1/completions,status=400}") == 1
    assert moved("kvforge_request_finished_total{reason=length}") == 2
    assert moved("kvforge_generation_tokens_total") == 10
    assert moved("kvforge_prompt_tokens_total") > 0
    assert moved("kvforge_time_to_first_token_seconds_count") == 2
    assert moved("kvforge_inter_token_latency_seconds_count") == 8
    assert moved("kvforge_engine_steps_total") >= 5
    for name in ("kvforge_num_requests_running", "kvforge_num_requests_waiting", "kvforge_num_requests_queued",
                 "kvforge_kv_cache_usage", "kvforge_kv_cache_used_blocks"):
        assert after[name] == 0, name
    assert after["kvforge_kv_cache_blocks"] == (after["kvforge_kv_cache_free_blocks"]
                                                + after["kvforge_prefix_cache_evictable_blocks"]) > 0
    assert after["kvforge_prefix_cache_blocks"] > 0
    assert moved("kvforge_prefix_cache_queries_total") > 0
    for name in ("kvforge_prefix_cache_hits_total", "kvforge_prefix_cache_pinned_blocks",
                 "kvforge_kv_cache_evictions_total", "kvforge_num_preemptions_total"):
        assert name in after, name
