"""MeteredTier: exact counters and latency counts, backend faults absorbed (misses and drops) and
counted by kind, rate-limited warnings, and the cooldown after a connection fault."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading

import pytest

from kvforge.cache.tiers import FAULT_KINDS, DiskTier, HostTier, MeteredTier
from kvforge.cache.tiers import disk as disk_module
from kvforge.cache.tiers import metered as metered_module
from tests.cache.tiers.conftest import FakeClock, key


class FlakyTier(HostTier):
    """A host tier that raises `fault` from every operation while it is set, counting the calls."""

    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.fault: Exception | None = None
        self.calls = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.fault is not None:
            raise self.fault

    def contains(self, key):
        self._maybe_fail()
        return super().contains(key)

    def get(self, key):
        self._maybe_fail()
        return super().get(key)

    def put(self, key, value):
        self._maybe_fail()
        super().put(key, value)

    def delete(self, key):
        self._maybe_fail()
        super().delete(key)


def raise_on_write(exc: OSError):
    def write(fd: int, data: bytes) -> None:
        raise exc
    return write


def tier_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvforge.tiers" and r.levelno == logging.WARNING]


def test_counts_hits_misses_bytes_puts_and_deletes_exactly():
    t = MeteredTier(HostTier(1 << 20))
    t.put(key(1), b"abc")
    t.put_many([(key(2), b"defg"), (key(3), b"")])
    assert t.get(key(1)) == b"abc" and t.get(key(9)) is None
    assert t.get_many([key(2), key(9), key(3)]) == [b"defg", None, b""]
    assert t.contains(key(1)) and t.contains_many([key(9)]) == [False]  # not counted as lookups
    t.delete(key(1))
    s = t.stats()
    assert (s.kind, s.spec) == ("host", "host:1MiB")
    assert (s.hits, s.misses, s.bytes_read) == (3, 2, 7)
    assert (s.puts, s.bytes_written, s.deletes) == (3, 7, 1)
    assert (s.faults, s.skipped) == (0, 0) and s.faults_by_kind == dict.fromkeys(FAULT_KINDS, 0)
    assert s.get_seconds.count == 3 and s.put_seconds.count == 2  # one observation per call
    assert s.get_seconds.buckets == metered_module.LATENCY_BUCKETS
    assert s.get_seconds.counts[-1] == 3 and 0 <= s.get_seconds.sum < 1
    assert s.hit_rate == pytest.approx(3 / 5)


def test_stats_are_a_frozen_snapshot():
    t = MeteredTier(HostTier(1 << 20))
    before = t.stats()
    t.put(key(1), b"v")
    t.get(key(1))
    assert before.puts == 0 and before.hits == 0 and before.hit_rate == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.hits = 5
    before.faults_by_kind["io"] = 7  # a copy: the wrapper's counters do not move
    assert t.stats().faults_by_kind["io"] == 0


def test_a_full_disk_drops_the_put_and_counts_a_full_fault(tmp_path, monkeypatch):
    t = MeteredTier(DiskTier(tmp_path, 1 << 20))
    monkeypatch.setattr(disk_module, "_write_all", raise_on_write(OSError(errno.ENOSPC, "No space left on device")))
    t.put(key(1), b"x" * 100)  # no exception
    t.put_many([(key(2), b"y")])
    assert t.get(key(1)) is None and os.listdir(tmp_path / "00") == []  # no temp file left
    s = t.stats()
    assert s.faults_by_kind["full"] == 2 and s.faults == 2
    assert (s.puts, s.bytes_written, s.misses, s.skipped) == (0, 0, 1, 0)
    assert s.put_seconds.count == 2  # failed calls are timed too


def test_permission_denied_on_write_and_read_are_permission_faults(tmp_path, monkeypatch):
    t = MeteredTier(DiskTier(tmp_path, 1 << 20))
    t.put(key(1), b"readable until now")
    monkeypatch.setattr(disk_module, "_write_all", raise_on_write(PermissionError(errno.EACCES, "Permission denied")))

    def deny(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(disk_module, "open", deny, raising=False)  # the module's open() only
    t.put(key(2), b"v")
    assert t.get(key(1)) is None and t.get_many([key(1), key(2)]) == [None, None]
    s = t.stats()
    assert s.faults_by_kind["permission"] == 3 and s.faults == 3 and s.misses == 3 and s.puts == 1


def test_other_os_errors_are_io_faults_and_other_exceptions_other(tmp_path, monkeypatch):
    flaky = FlakyTier()
    t = MeteredTier(flaky)
    flaky.fault = OSError(errno.EIO, "Input/output error")
    assert t.get(key(1)) is None
    flaky.fault = RuntimeError("a bug in the backend")
    t.delete(key(1))
    assert not t.contains(key(1))
    s = t.stats()
    assert s.faults_by_kind == {"connection": 0, "full": 0, "permission": 0, "io": 1, "other": 2}
    assert s.deletes == 0


def test_a_connection_fault_pauses_the_backend_for_the_cooldown(caplog):
    flaky = FlakyTier()
    clock = FakeClock()
    t = MeteredTier(flaky, cooldown_s=0.2, clock=clock)
    t.put(key(1), b"v")
    flaky.fault = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert t.get(key(1)) is None
    assert flaky.calls == 2
    t.put(key(2), b"w")
    t.delete(key(1))
    clock.advance(0.19)
    assert t.get_many([key(1)]) == [None] and t.contains_many([key(1)]) == [False]
    assert flaky.calls == 2  # none of them reached the backend
    s = t.stats()
    assert s.skipped == 4 and s.faults_by_kind["connection"] == 1 and s.get_seconds.count == 1
    flaky.fault = None
    clock.advance(0.01)  # the cooldown is over
    assert t.get(key(1)) == b"v" and flaky.calls == 3
    assert t.stats().hits == 1 and t.stats().skipped == 4
    assert tier_warnings(caplog) == ["tier host:1MiB: get failed (connection fault; not used for 0.2 s): "
                                     "ConnectionRefusedError: [Errno 111] Connection refused"]


def test_only_connection_faults_pause_the_backend():
    flaky = FlakyTier()
    t = MeteredTier(flaky, cooldown_s=60)
    for fault in (OSError(errno.ENOSPC, "full"), PermissionError(errno.EACCES, "denied"), OSError(errno.EIO, "io")):
        flaky.fault = fault
        t.put(key(1), b"v")
        t.put(key(1), b"v")
    assert flaky.calls == 6 and t.stats().skipped == 0 and t.stats().faults == 6


def test_faults_are_logged_once_per_kind_per_interval(caplog):
    flaky = FlakyTier()
    clock = FakeClock()
    t = MeteredTier(flaky, clock=clock)
    flaky.fault = OSError(errno.ENOSPC, "No space left on device")
    for _ in range(3):
        t.put(key(1), b"v")
    flaky.fault = PermissionError(errno.EACCES, "Permission denied")
    t.put(key(1), b"v")
    t.put(key(1), b"v")
    assert tier_warnings(caplog) == [
        "tier host:1MiB: put failed (full fault): OSError: [Errno 28] No space left on device",
        "tier host:1MiB: put failed (permission fault): PermissionError: [Errno 13] Permission denied",
    ]
    clock.advance(metered_module.LOG_INTERVAL_S - 0.1)
    flaky.fault = OSError(errno.ENOSPC, "No space left on device")
    t.get(key(1))
    assert len(tier_warnings(caplog)) == 2
    clock.advance(0.1)  # the interval has passed
    t.get(key(1))
    assert tier_warnings(caplog)[-1] == ("tier host:1MiB: get failed (full fault): OSError: [Errno 28] No space "
                                         "left on device (3 more full faults since the last line)")
    assert t.stats().faults == 7


def test_a_fault_classifier_that_raises_counts_the_fault_as_other():
    class Confused(FlakyTier):
        def classify_fault(self, exc):
            raise RuntimeError("classifier bug")

    flaky = Confused()
    flaky.fault = OSError(errno.EIO, "io")
    t = MeteredTier(flaky)
    assert t.get(key(1)) is None and t.stats().faults_by_kind["other"] == 1


def test_bad_keys_and_values_still_raise_value_error_and_count_nothing():
    flaky = FlakyTier()
    t = MeteredTier(flaky)
    with pytest.raises(ValueError, match="tier key"):
        t.get(b"")
    with pytest.raises(ValueError, match="tier key"):
        t.put_many([(key(1), b"v"), (b"x" * 129, b"v")])
    with pytest.raises(ValueError, match="tier value"):
        t.put(key(1), "text")
    with pytest.raises(ValueError, match="cooldown_s"):
        MeteredTier(flaky, cooldown_s=-1)
    assert flaky.calls == 0 and t.stats() == MeteredTier(flaky).stats()


def test_close_faults_are_absorbed():
    class BadClose(HostTier):
        def close(self):
            raise OSError(errno.EIO, "cannot close")

    t = MeteredTier(BadClose(100))
    t.close()
    assert t.stats().faults_by_kind["io"] == 1


def test_counters_stay_exact_under_several_threads():
    t = MeteredTier(HostTier(1 << 20))
    t.put(key(1), b"12345")

    def work() -> None:
        for _ in range(250):
            t.get(key(1))
            t.get(key(2))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = t.stats()
    assert (s.hits, s.misses, s.bytes_read) == (1000, 1000, 5000)
    assert s.get_seconds.count == 2000 and s.get_seconds.counts[-1] == 2000
