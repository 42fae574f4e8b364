"""Servers on 127.0.0.1 (a free port, in this process) over engines loaded once per session.

Loading the model takes seconds, starting a server milliseconds: a test that needs its own server
settings (admission policies) starts a `Server` over a shared engine and stops it at the end; the
server stops with every block of its engine free again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from kvforge.config import EngineConfig
from kvforge.engine import LLMEngine
from kvforge.server import ServerConfig
from kvforge.server.serve import Server
from tests.conftest import MODEL, assert_engine_idle, engine_kwargs

# The tiny engine: 8 blocks of 8 tokens; one sequence at a time, so the waiting order is visible.
TINY = dict(num_blocks=8, block_size=8, max_num_seqs=1)


@pytest.fixture(scope="session")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(model=MODEL, **engine_kwargs()))


@pytest.fixture(scope="session")
def tiny_engine() -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(model=MODEL, **engine_kwargs(**TINY)))


@contextlib.contextmanager
def serving(engine: LLMEngine, **config) -> Iterator[Server]:
    """A server over `engine` for the duration of the block; checks nothing leaked after it."""
    config.setdefault("log_level", "warning")
    server = Server(engine, ServerConfig(port=0, **config)).start()
    try:
        yield server
        assert_idle_and_intact(server)
    finally:
        server.stop()


def assert_idle_and_intact(server: Server, timeout: float = 10.0) -> None:
    """Wait until the engine has nothing left, then check it is idle and intact
    (`tests.conftest.assert_engine_idle`: integrity, per-request maps, chunk user counts, blocks)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.call(lambda e: (e.check_integrity(), e.stats())[1])
        if stats.num_running == stats.num_waiting == 0 and not server.loop._queue:
            break
        assert time.monotonic() < deadline, f"the engine is not idle: {stats}"
        time.sleep(0.05)
    server.call(assert_engine_idle)


@pytest.fixture(scope="module")
def server(engine) -> Iterator[Server]:
    with serving(engine) as s:
        yield s


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return client_for(server)


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
