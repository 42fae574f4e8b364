"""Fixtures for the tier tests: real redis-servers, and one tier of each kind for the conformance suite.

`make_redis(**config)` starts a redis-server (tests/redis_server.py) and stops it at teardown; a
missing redis-server fails the test naming the fix (never a skip). `tier` is parametrized over
every backend, each with a roomy budget; `make_budget_tier(kind, capacity)` builds host and disk
tiers for the LRU tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvforge.cache.tiers import DiskTier, HostTier, RedisTier, Tier
from tests.redis_server import RedisServer, start_redis

KINDS = ("host", "disk", "redis")
BUDGET_KINDS = ("host", "disk")
ROOMY = 64 << 20


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """`make_redis(**redis_server_options)`: a running server, stopped after the test."""
    started: list[RedisServer] = []

    def factory(**config: object) -> RedisServer:
        try:
            server = start_redis(tmp_path, **config)
        except RuntimeError as e:
            message = str(e)
        else:
            started.append(server)
            return server
        pytest.fail(message, pytrace=False)  # outside the except: one clear line, no chained traceback

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(make_redis: Callable[..., RedisServer]) -> RedisServer:
    return make_redis()


def make_tier(kind: str, tmp_path: Path, request: pytest.FixtureRequest, capacity: int = ROOMY) -> Tier:
    if kind == "host":
        return HostTier(capacity)
    if kind == "disk":
        return DiskTier(tmp_path / "tier", capacity)
    if kind == "redis":
        return RedisTier(request.getfixturevalue("redis_server").url)
    raise AssertionError(kind)


@pytest.fixture(params=KINDS)
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tier]:
    """A tier of each kind (host and disk with 64 MiB budgets; redis on a fresh server)."""
    t = make_tier(request.param, tmp_path, request)
    yield t
    t.close()


@pytest.fixture(params=BUDGET_KINDS)
def make_budget_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[int], Tier]:
    """`make_budget_tier(capacity)`: a host or a disk tier of `capacity` bytes."""
    return lambda capacity: make_tier(request.param, tmp_path, request, capacity)


def key(i: int) -> bytes:
    """A 32-byte key, like a block digest."""
    return i.to_bytes(32, "big")


class FakeClock:
    """A monotonic clock for MeteredTier that moves only when told: `clock.advance(seconds)`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
