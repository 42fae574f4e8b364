"""Tier specs: sizes, opening each kind by its string, and checking a spec without opening anything."""

from __future__ import annotations

import time

import pytest

from kvforge.cache.tiers import DiskTier, HostTier, RedisTier, open_tier, parse_size, validate_tier_spec
from tests.cache.tiers.conftest import key
from tests.redis_server import free_port


@pytest.mark.parametrize("text, size", [
    ("4GiB", 4 << 30), ("4gib", 4 << 30), ("4 GiB", 4 << 30), (" 50GB ", 50 * 10**9), ("1KB", 1000),
    ("1kib", 1024), ("1Kb", 1000), ("3MB", 3 * 10**6), ("3MiB", 3 << 20), ("2TB", 2 * 10**12),
    ("2TiB", 2 << 40), ("123", 123), ("123B", 123), ("0", 0), ("1.5KiB", 1536), ("0.5GB", 5 * 10**8),
    ("1.0001KB", 1000),  # a fraction of a byte is dropped
])
def test_parse_size_reads_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1", "4XB", "4 GiB B", "1e3", "1.5", "1.5B", "4G", "0x10", None, 4])
def test_parse_size_refuses_anything_else_naming_the_units(text):
    with pytest.raises(ValueError, match=r"bad size .*KiB, MiB, GiB, TiB"):
        parse_size(text)


def test_host_and_disk_specs_open_their_tiers(tmp_path):
    host = open_tier("host:4GiB")
    assert isinstance(host, HostTier) and host.capacity_bytes == 4 << 30 and host.spec == "host:4GiB"
    assert open_tier("HOST: 2 MB").capacity_bytes == 2 * 10**6
    disk = open_tier(f"disk:{tmp_path / 'kv'}:50GiB")
    assert isinstance(disk, DiskTier) and disk.path == tmp_path / "kv" and disk.capacity_bytes == 50 << 30
    assert (tmp_path / "kv").is_dir()
    assert open_tier(disk.spec).spec == disk.spec and open_tier(host.spec).spec == host.spec


def test_a_disk_path_may_contain_colons_the_size_follows_the_last(tmp_path):
    t = open_tier(f"disk:{tmp_path}/a:b:c:1MiB")
    assert t.path == tmp_path / "a:b:c" and t.capacity_bytes == 1 << 20
    assert (tmp_path / "a:b:c").is_dir()


def test_a_disk_path_may_start_with_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_tier("disk:~/kv:1MiB").path == tmp_path / "kv"


def test_redis_specs_open_redis_tiers_without_connecting(redis_server):
    t = open_tier(redis_server.url + "?ttl=60")
    assert isinstance(t, RedisTier) and t.ttl_s == 60 and t.spec == redis_server.url + "?ttl=60"
    t.put(key(1), b"v")
    valkey = open_tier(redis_server.url.replace("redis://", "valkey://"))
    assert isinstance(valkey, RedisTier) and valkey.get(key(1)) == b"v"
    assert open_tier(redis_server.unix_url).get(key(1)) == b"v"
    assert isinstance(open_tier(f"redis://127.0.0.1:{free_port()}/0"), RedisTier)  # nobody there: not yet an error


def test_validate_tier_spec_opens_nothing(tmp_path):
    start = time.monotonic()
    for spec in ("host:1GiB", f"disk:{tmp_path / 'never'}:1GiB", f"redis://10.255.255.1:{free_port()}/0?ttl=5",
                 "rediss://user:pw@cache.example:6380/1", "unix:///run/redis.sock?db=2", "valkey://h:6379/0"):
        assert validate_tier_spec(spec) is None
    assert not (tmp_path / "never").exists() and time.monotonic() - start < 1


@pytest.mark.parametrize("spec", ["", "memory:1GiB", "/var/cache/kvforge", "s3://bucket/kv", 7])
def test_an_unknown_spec_lists_every_form(spec):
    with pytest.raises(ValueError) as raised:
        validate_tier_spec(spec)
    message = str(raised.value)
    assert "host:<size>" in message and "disk:<path>:<size>" in message and "redis://<host>:<port>/<db>" in message


@pytest.mark.parametrize("spec, problem", [
    ("host:", "bad size ''"),
    ("host:4XB", "bad size '4XB'"),
    ("host:0", "must be positive"),
    ("host", "bad size ''"),
    ("disk:/var/cache/kvforge", "names a directory and a size"),
    ("disk:1GiB", "names a directory and a size"),
    ("disk::1GiB", "names a directory and a size"),
    ("disk:/tmp/kv:0B", "must be positive"),
    ("redis://127.0.0.1:6379/0?ttl=-5", "positive whole number"),
    ("redis:127.0.0.1:6379", "starts with one of redis://"),
    ("valkey://:6379", "names no host"),
])
def test_a_bad_spec_of_a_known_kind_names_the_problem_and_its_form(spec, problem):
    with pytest.raises(ValueError, match="the form is") as raised:
        validate_tier_spec(spec)
    assert problem in str(raised.value)
    with pytest.raises(ValueError):
        open_tier(spec)


def test_a_disk_spec_on_a_file_is_refused_when_opened(tmp_path):
    (tmp_path / "file").write_text("x")
    validate_tier_spec(f"disk:{tmp_path / 'file'}:1GiB")  # syntax only
    with pytest.raises(ValueError, match="not a directory"):
        open_tier(f"disk:{tmp_path / 'file'}:1GiB")
