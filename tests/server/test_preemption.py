"""Admission by need (the default, as vLLM): a request joins when its prompt fits, grows while it
decodes, and the lowest-priority, newest request is preempted (recomputed) when blocks run out."""

from __future__ import annotations

import asyncio
import threading

import openai

from kvforge.config import EngineConfig
from kvforge.engine import LLMEngine
from tests.conftest import MODEL
from tests.server.conftest import assert_idle_and_intact, serving

CAPITALS = ["France", "Japan", "Italy", "Spain", "Brazil", "Egypt", "India", "Canada"]


def _conversations(n: int) -> list[list[dict]]:
    """Short questions whose greedy replies end within 3 to 12 tokens (measured), so no request
    runs on towards the model length."""
    questions = [[f"Is {10 + i} an even number? Answer yes or no.",
                  f"What is {i} plus {i + 3}? Reply with the number only.",
                  f"What is the capital of {CAPITALS[i % 8]}? Answer in one short sentence."][i % 3] for i in range(n)]
    return [[{"role": "user", "content": q}] for q in questions]


class _PeakRunning:
    """Polls the engine's running count from a thread while requests run."""

    def __init__(self, server):
        self.server, self.peak, self._stop = server, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.call(lambda e: e.stats().num_running))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


async def _chat_all(url: str, conversations: list[list[dict]], **kwargs) -> list:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        return await asyncio.gather(*(client.chat.completions.create(model=MODEL, messages=m, temperature=0, **kwargs)
                                      for m in conversations))
    finally:
        await client.close()


def test_32_chats_without_max_tokens_run_at_once_on_the_default_cache():
    """The OpenAI default (no max_tokens) used to reserve the whole model length (8192 tokens)
    per request: two at a time on the default cache, the rest queued until they timed out."""
    engine = LLMEngine(EngineConfig.from_kwargs(model=MODEL))  # the default cache (1 GiB)
    assert engine.cache.num_blocks * engine.cache.block_size < 3 * engine.max_model_len
    with serving(engine) as server, _PeakRunning(server) as running:
        replies = asyncio.run(_chat_all(server.url, _conversations(32), stop=["\n\n"]))
        assert all(r.choices[0].finish_reason == "stop" and r.choices[0].message.content for r in replies)
        assert running.peak >= 24, f"only {running.peak} of 32 requests ever ran at once"
        assert_idle_and_intact(server)


def test_preemption_on_a_tiny_cache_keeps_every_greedy_text_equal_to_running_it_alone():
    # 12 blocks of 8 tokens; each request holds up to ceil((~30 + 24 - 1) / 8) = 7 blocks: three
    # fit their prompts at once but not their replies, so the newest are preempted and recomputed.
    engine = LLMEngine(EngineConfig.from_kwargs(model=MODEL, num_blocks=12, block_size=8, max_num_seqs=8,
                                                enable_prefix_caching=False))
    conversations = _conversations(4)
    params = dict(max_tokens=24, extra_body={"ignore_eos": True})
    with serving(engine) as server:
        alone = [asyncio.run(_chat_all(server.url, [c], **params))[0].choices[0].message.content
                 for c in conversations]
        before = server.call(lambda e: e.stats().num_preemptions)
        together = asyncio.run(_chat_all(server.url, conversations, **params))
        assert server.call(lambda e: e.stats().num_preemptions) > before
        assert [r.choices[0].message.content for r in together] == alone
        assert all(r.usage.completion_tokens == 24 for r in together)
        assert_idle_and_intact(server)


def test_reserve_admission_never_preempts_but_runs_fewer_at_once():
    engine = LLMEngine(EngineConfig.from_kwargs(model=MODEL, num_blocks=12, block_size=8, max_num_seqs=8,
                                                enable_prefix_caching=False))
    with serving(engine, admission="reserve") as server, _PeakRunning(server) as running:
        replies = asyncio.run(_chat_all(server.url, _conversations(4), max_tokens=24, extra_body={"ignore_eos": True}))
        assert all(r.usage.completion_tokens == 24 for r in replies)
        assert server.call(lambda e: e.stats().num_preemptions) == 0
        assert running.peak == 1
        assert_idle_and_intact(server)
