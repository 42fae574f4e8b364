"""DiskTier: the file layout, atomic writes, cleaning up after crashes, the index rebuilt at open, and
several tiers (processes) sharing one directory."""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest

from kvforge.cache.tiers import DiskTier
from kvforge.cache.tiers import disk as disk_module
from tests.cache.tiers.conftest import key

DEAD_PID = 4_194_305  # above the largest pid_max Linux allows (2**22): no process has it


def files_under(path) -> list[str]:
    """Every file under `path`, relative, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def fail_midway(exc: OSError):
    """A `_write_all` that writes half of the value, then raises `exc` (a full disk, a crash...)."""
    def write_half(fd: int, data: bytes) -> None:
        os.write(fd, data[:len(data) // 2])
        raise exc
    return write_half


def test_a_value_is_one_file_named_by_the_key_in_its_shard(tmp_path):
    t = DiskTier(tmp_path / "d", 1 << 20)
    k = bytes.fromhex("ab" + "01" * 31)
    t.put(k, b"payload")
    assert files_under(tmp_path / "d") == [f"ab/{k.hex()}.kvb"]
    assert t.file_path(k) == tmp_path / "d" / "ab" / f"{k.hex()}.kvb"
    assert t.file_path(k).read_bytes() == b"payload"


def test_a_key_too_long_for_a_file_name_is_named_by_its_sha256(tmp_path):
    t = DiskTier(tmp_path, 1 << 20)
    long_key = b"\x07" * 128
    digest = hashlib.sha256(long_key).hexdigest()
    t.put(long_key, b"v")
    assert t.file_path(long_key) == tmp_path / digest[:2] / f"h{digest}.kvb"
    assert DiskTier(tmp_path, 1 << 20).get(long_key) == b"v"  # and a reopened tier indexes it


def test_the_directory_is_created_with_its_parents(tmp_path):
    t = DiskTier(tmp_path / "a" / "b" / "c", 1 << 20)
    assert (tmp_path / "a" / "b" / "c").is_dir() and t.spec == f"disk:{tmp_path / 'a' / 'b' / 'c'}:1MiB"


def test_a_path_that_is_a_file_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        DiskTier(tmp_path / "file", 1 << 20)
    with pytest.raises(ValueError, match="cannot create the disk tier directory"):
        DiskTier(tmp_path / "file" / "sub", 1 << 20)


def test_a_directory_where_files_cannot_be_created_is_a_value_error(tmp_path, monkeypatch):
    real_open = os.open

    def deny(path, *args, **kwargs):  # root ignores chmod, so deny the probe's creation instead
        if os.path.basename(path).startswith(disk_module.TEMP_PREFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(disk_module.os, "open", deny)
    with pytest.raises(ValueError, match="is not writable: Permission denied"):
        DiskTier(tmp_path, 1 << 20)


def test_a_write_failing_midway_leaves_the_old_value_and_no_temp_file(tmp_path, monkeypatch):
    t = DiskTier(tmp_path, 1 << 20)
    t.put(key(1), b"old")
    monkeypatch.setattr(disk_module, "_write_all", fail_midway(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as raised:  # the backend re-raises; MeteredTier absorbs
        t.put(key(1), b"new value, half written")
    assert raised.value.errno == errno.EIO
    with pytest.raises(OSError):
        t.put(key(2), b"never whole")
    assert files_under(tmp_path) == [f"00/{key(1).hex()}.kvb"]
    assert t.get(key(1)) == b"old" and t.get(key(2)) is None and t.used_bytes == 3


def test_a_full_disk_removes_the_temp_file_and_re_raises_enospc(tmp_path, monkeypatch):
    t = DiskTier(tmp_path, 1 << 20)
    monkeypatch.setattr(disk_module, "_write_all", fail_midway(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as raised:
        t.put(key(1), b"x" * 1000)
    assert raised.value.errno == errno.ENOSPC
    assert files_under(tmp_path) == [] and not t.contains(key(1)) and t.used_bytes == 0


def test_temp_files_of_dead_writers_are_removed_at_open(tmp_path):
    shard = tmp_path / "00"
    shard.mkdir()
    dead = shard / f"{disk_module.TEMP_PREFIX}{DEAD_PID}-0123abcd"  # its writer crashed
    old = shard / f"{disk_module.TEMP_PREFIX}{os.getpid()}-4567"  # a live pid, but hours old
    live = shard / f"{disk_module.TEMP_PREFIX}{os.getpid()}-89ab"  # being written right now
    top = tmp_path / f"{disk_module.TEMP_PREFIX}{DEAD_PID}-probe-1"  # a crashed writability probe
    foreign = tmp_path / "README"  # not ours: left alone
    for path in (dead, old, live, top, foreign):
        path.write_bytes(b"partial")
    hours_ago = time.time() - 2 * disk_module.STALE_TEMP_SECONDS
    os.utime(old, (hours_ago, hours_ago))
    t = DiskTier(tmp_path, 1 << 20)
    assert files_under(tmp_path) == ["00/" + live.name, "README"]
    assert len(t) == 0 and t.used_bytes == 0


def test_the_index_is_rebuilt_at_open_oldest_file_first(tmp_path):
    first = DiskTier(tmp_path, 100)
    first.put(key(1), b"a" * 40)
    first.put(key(2), b"b" * 40)
    assert first.get(key(1))  # now key 2 has the oldest mtime
    first.close()
    second = DiskTier(tmp_path, 100)
    assert second.used_bytes == 80 and len(second) == 2
    second.put(key(3), b"c" * 40)
    assert second.contains_many([key(1), key(2), key(3)]) == [True, False, True]


def test_get_sets_the_files_mtime_to_now_and_contains_leaves_it(tmp_path):
    t = DiskTier(tmp_path, 1 << 20)
    t.put(key(1), b"v")
    path = t.file_path(key(1))
    os.utime(path, ns=(10**15, 10**15))
    assert t.contains(key(1)) and path.stat().st_mtime_ns == 10**15
    before = time.time_ns()
    assert t.get(key(1)) == b"v"
    assert path.stat().st_mtime_ns >= before


def test_opening_with_a_smaller_budget_evicts_the_oldest_files(tmp_path):
    big = DiskTier(tmp_path, 1000)
    for i in range(5):
        big.put(key(i), bytes([i]) * 30)
        os.utime(big.file_path(key(i)), ns=(i * 10**9, i * 10**9))  # key 0 oldest
    small = DiskTier(tmp_path, 70)
    assert small.used_bytes == 60
    assert files_under(tmp_path) == sorted(f"00/{key(i).hex()}.kvb" for i in (3, 4))


def test_foreign_files_in_the_directory_are_not_indexed_or_touched(tmp_path):
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "notes.txt").write_text("mine")
    (tmp_path / "ab" / "cd00.kvb").write_bytes(b"wrong shard")  # cd00's shard is cd
    (tmp_path / "zz").mkdir()
    t = DiskTier(tmp_path, 1 << 20)
    assert len(t) == 0
    t.put(key(1), b"x")
    assert files_under(tmp_path) == [f"00/{key(1).hex()}.kvb", "ab/cd00.kvb", "ab/notes.txt"]


def test_two_tiers_on_one_directory_see_each_others_files(tmp_path):
    a, b = DiskTier(tmp_path, 1000), DiskTier(tmp_path, 1000)
    a.put(key(1), b"written by a")
    assert b.contains(key(1)) and b.get(key(1)) == b"written by a"
    assert b.used_bytes == 12 and len(b) == 1  # adopted into b's index
    b.put(key(1), b"replaced by b")
    assert a.get(key(1)) == b"replaced by b" and a.used_bytes == 13
    b.delete(key(1))
    assert a.get(key(1)) is None and not a.contains(key(1)) and a.used_bytes == 0


def test_a_file_removed_behind_the_tiers_back_is_a_miss(tmp_path):
    t = DiskTier(tmp_path, 1000)
    t.put_many([(key(1), b"one"), (key(2), b"two")])
    os.unlink(t.file_path(key(1)))  # another process evicted it
    assert t.get(key(1)) is None and t.used_bytes == 3
    os.unlink(t.file_path(key(2)))
    assert t.contains_many([key(1), key(2)]) == [False, False] and t.used_bytes == 0
    t.delete(key(2))  # already gone: fine


def test_evicting_a_file_another_tier_already_removed_is_not_an_error(tmp_path):
    a, b = DiskTier(tmp_path, 100), DiskTier(tmp_path, 100)
    a.put(key(1), b"a" * 60)
    assert b.contains(key(1))
    a.delete(key(1))
    b.put(key(2), b"b" * 60)  # b evicts key 1, whose file is gone already
    assert b.get(key(2)) == b"b" * 60 and b.used_bytes == 60
