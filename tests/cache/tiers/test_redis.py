"""RedisTier against a real redis-server: key prefix, TTL, URLs, and the faults of a killed, restarted
or full server (through MeteredTier: misses and drops, never an exception)."""

from __future__ import annotations

import errno
import time

import pytest
import redis

from kvforge.cache.tiers import MeteredTier, RedisTier
from tests.cache.tiers.conftest import FakeClock, key
from tests.redis_server import free_port


def raw(server) -> redis.Redis:
    """A plain client to look at the server behind the tier's back."""
    return redis.Redis.from_url(server.url)


def test_values_live_under_the_prefix(redis_server):
    RedisTier(redis_server.url).put(key(1), b"v")
    RedisTier(redis_server.url, prefix=b"other:").put(key(1), b"w")
    assert raw(redis_server).get(b"kvforge:" + key(1)) == b"v"
    assert raw(redis_server).get(b"other:" + key(1)) == b"w"


def test_without_a_ttl_values_do_not_expire(redis_server):
    t = RedisTier(redis_server.url)
    t.put(key(1), b"v")
    assert t.ttl_s is None and raw(redis_server).ttl(b"kvforge:" + key(1)) == -1


def test_a_ttl_expires_values_unless_get_refreshes_it(redis_server):
    t = RedisTier(redis_server.url, ttl_s=1)
    t.put_many([(key(1), b"read"), (key(2), b"unread")])
    time.sleep(0.6)
    assert t.get(key(1)) == b"read"  # GETEX: one more second from now
    time.sleep(0.6)
    assert t.get_many([key(1), key(2)]) == [b"read", None]


def test_the_urls_ttl_is_set_by_put_and_refreshed_by_get_many(redis_server):
    t = RedisTier(redis_server.url + "?ttl=7")
    assert t.ttl_s == 7 and t.spec == redis_server.url + "?ttl=7"
    t.put(key(1), b"v")
    r = raw(redis_server)
    assert 6000 < r.pttl(b"kvforge:" + key(1)) <= 7000
    r.pexpire(b"kvforge:" + key(1), 100)
    assert t.get_many([key(1)]) == [b"v"] and r.pttl(b"kvforge:" + key(1)) > 6000


def test_a_unix_socket_url_works(redis_server):
    t = RedisTier(redis_server.unix_url)
    t.put(key(1), b"over the socket")
    assert RedisTier(redis_server.url).get(key(1)) == b"over the socket"


def test_the_spec_redacts_the_password():
    t = RedisTier("redis://user:s3cret@127.0.0.1:6379/2", ttl_s=5)
    assert t.spec == "redis://user:***@127.0.0.1:6379/2?ttl=5" and "s3cret" not in repr(t)
    t = RedisTier("unix:///run/redis.sock?db=1&password=s3cret")
    assert t.spec == "unix:///run/redis.sock?db=1&password=***"


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379/0", "starts with one of redis://"),
    ("127.0.0.1:6379", "starts with one of redis://"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://127.0.0.1:port/0", "bad Redis URL"),
    ("redis://:6379/0", "names no host"),
    ("redis://127.0.0.1:6379/zero", "database .* must be a number"),
    ("redis://127.0.0.1:6379/0?ttl=0", "positive whole number of seconds, got 0"),
    ("redis://127.0.0.1:6379/0?ttl=1.5", "positive whole number"),
    ("redis://127.0.0.1:6379/0?ttl=", "positive whole number"),
    ("redis://127.0.0.1:6379/0?tll=5", "unknown query parameter"),
    ("redis://127.0.0.1:6379/0?ttl=5&ttl=6", "given twice"),
    ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
    ("unix://", "names the socket file"),
])
def test_a_bad_url_is_a_value_error_at_construction(url, message):
    with pytest.raises(ValueError, match=message):
        RedisTier(url)


def test_bad_ttls_and_prefixes_are_value_errors():
    with pytest.raises(ValueError, match="ttl_s must be a positive"):
        RedisTier("redis://127.0.0.1:6379/0", ttl_s=0)
    with pytest.raises(ValueError, match="two TTLs"):
        RedisTier("redis://127.0.0.1:6379/0?ttl=5", ttl_s=6)
    assert RedisTier("redis://127.0.0.1:6379/0?ttl=5", ttl_s=5).ttl_s == 5
    with pytest.raises(ValueError, match="prefix must be bytes"):
        RedisTier("redis://127.0.0.1:6379/0", prefix="kvforge:")


def test_an_unreachable_server_is_a_fault_at_first_use_not_at_construction():
    t = RedisTier(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    start = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        t.get(key(1))
    assert time.monotonic() - start < 2  # refused at once, retried once, no backoff
    assert t.classify_fault(redis.ConnectionError("refused")) == "connection"


def test_a_killed_server_turns_ops_into_misses_and_its_restart_is_used_again(redis_server):
    clock = FakeClock()
    t = MeteredTier(RedisTier(redis_server.url), cooldown_s=1.0, clock=clock)
    t.put(key(1), b"before the crash")
    assert t.get(key(1)) == b"before the crash"
    redis_server.stop(kill=True)
    assert t.get(key(1)) is None  # a fault, not an exception
    down = t.stats()
    assert down.faults_by_kind["connection"] == 1 and down.faults == 1 and down.misses == 1
    t.put(key(2), b"dropped")  # within the cooldown: not even tried
    assert not t.contains(key(1)) and t.get_many([key(1), key(2)]) == [None, None]
    assert t.stats().skipped == 3 and t.stats().faults == 1
    redis_server.restart()  # same port, empty (no persistence)
    assert t.get(key(2)) is None and t.stats().skipped == 4  # still cooling down
    clock.advance(1.0)
    t.put(key(2), b"after the restart")
    assert t.get(key(2)) == b"after the restart" and t.get(key(1)) is None
    s = t.stats()
    assert s.faults == 1 and s.skipped == 4 and s.puts == 2 and s.hits == 2


def test_a_server_at_maxmemory_refuses_puts_as_full_faults_and_keeps_its_config(make_redis):
    server = make_redis(maxmemory="1mb", maxmemory_policy="noeviction")
    t = MeteredTier(RedisTier(server.url), cooldown_s=60)
    stored = []
    for i in range(100):  # 32 KiB each: 1 MiB is passed long before the end
        t.put(key(i), b"%d" % i * 32768)
        if t.stats().faults:
            break
        stored.append(i)
    s = t.stats()
    assert s.faults_by_kind["full"] == 1 and s.faults == 1 and s.puts == len(stored)
    assert t.get(key(i)) is None  # the refused value is not there
    t.put(key(999), b"still full")  # a full server is not a dead one: tried again, no cooldown
    assert t.stats().faults_by_kind["full"] == 2 and t.stats().skipped == 0
    assert all(t.get(key(j)) is not None for j in stored)  # reads still work
    config = raw(server).config_get("maxmemory*")
    assert config["maxmemory"] == str(1 << 20) and config["maxmemory-policy"] == "noeviction"


def test_redis_exceptions_are_classified_by_fault_kind():
    t = RedisTier("redis://127.0.0.1:6379/0")
    classify = t.classify_fault
    assert classify(redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")) == "full"
    assert classify(redis.ResponseError("OOM command not allowed")) == "full"
    assert classify(redis.ConnectionError("Connection refused")) == "connection"
    assert classify(redis.TimeoutError("Timeout reading from socket")) == "connection"
    assert classify(redis.exceptions.BusyLoadingError("loading")) == "connection"
    assert classify(redis.AuthenticationError("invalid password")) == "permission"
    assert classify(redis.exceptions.NoPermissionError("NOPERM")) == "permission"
    assert classify(redis.ResponseError("WRONGTYPE")) == "other"
    assert classify(OSError(errno.EIO, "io")) == "io"
