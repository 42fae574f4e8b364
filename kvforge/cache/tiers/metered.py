"""MeteredTier: counts, times and absorbs the faults of any tier, behind the same `Tier` interface.

A storage tier is a cache below the cache: losing it costs recomputation, never correctness, so its
faults must not reach the engine. The wrapper turns a failed lookup into a miss and a failed write
into a dropped one, counts the fault by kind, logs it (rate-limited) and, when the store cannot be
reached, stops asking it for a cooldown so a dead server costs one timeout, not one per block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvforge.cache.tiers.base import FAULT_KINDS, Tier, check_items, check_key, check_keys, check_value
from kvforge.metrics import HistogramCounter, HistogramSnapshot

logger = logging.getLogger("kvforge.tiers")

LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOG_INTERVAL_S = 10.0  # at most one warning per fault kind per tier in this many seconds

T = TypeVar("T")


@dataclass(frozen=True)
class TierStats:
    """A snapshot of a `MeteredTier`'s counters, cumulative since it was made.

    `hits` and `misses` count keys looked up with get/get_many, as the caller saw them: a key whose
    lookup faulted or was skipped is a miss (contains does not count). `bytes_read` sums the values
    hit, `bytes_written` the values stored; `puts` counts values stored and `deletes` deletes done
    (a dropped put or delete counts in neither). `faults` counts calls the backend failed, by kind
    in `faults_by_kind` (every one of FAULT_KINDS, 0 when none); `skipped` counts calls answered
    without the backend during a cooldown after a connection fault. A batched call is one fault or
    one skip. `get_seconds` / `put_seconds` time each get/get_many and put/put_many call that reached
    the backend, failed ones included (a timeout shows there).
    """

    kind: str
    spec: str
    hits: int
    misses: int
    bytes_read: int
    bytes_written: int
    puts: int
    deletes: int
    skipped: int
    faults: int
    faults_by_kind: dict[str, int]
    get_seconds: HistogramSnapshot
    put_seconds: HistogramSnapshot

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class _Failed:
    """The result of a call the backend failed or that was skipped."""


_FAILED = _Failed()


class MeteredTier(Tier):
    """`tier` with counters (see `TierStats`) and fault absorption. Thread-safe.

    A backend exception is caught: get / contains answer a miss, put / delete are dropped. The fault
    is counted by `tier.classify_fault` and logged as a warning on the "kvforge.tiers" logger, at
    most one line per fault kind per `LOG_INTERVAL_S` (the line counts those left out). After a
    "connection" fault the backend is not called for `cooldown_s` seconds: operations answer miss or
    drop at once (counted as skipped); then the next call tries it again, so a restarted server is
    used again with no action. Raises ValueError for a bad key or value, before calling the backend,
    and nothing else.
    """

    def __init__(self, tier: Tier, cooldown_s: float = 1.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` (seconds, monotonic) times the cooldown and the log interval; tests pass a fake one."""
        if not isinstance(tier, Tier):
            raise ValueError(f"MeteredTier wraps a Tier, got {type(tier).__name__}")
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0 seconds, got {cooldown_s}")
        self.tier = tier
        self.kind = tier.kind
        self.spec = tier.spec
        self.in_process = tier.in_process
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._hits = self._misses = self._bytes_read = self._bytes_written = 0
        self._puts = self._deletes = self._skipped = 0
        self._faults = dict.fromkeys(FAULT_KINDS, 0)
        self._get_seconds = HistogramCounter(LATENCY_BUCKETS)
        self._put_seconds = HistogramCounter(LATENCY_BUCKETS)
        self._clock = clock
        self._down_until = float("-inf")  # clock() before which the backend is not called
        self._last_logged: dict[str, float] = {}  # fault kind -> when its last line was logged
        self._unlogged: dict[str, int] = {}  # fault kind -> faults not logged since

    def stats(self) -> TierStats:
        """A consistent snapshot of every counter. Changes nothing."""
        with self._lock:
            return TierStats(
                kind=self.kind, spec=self.spec, hits=self._hits, misses=self._misses,
                bytes_read=self._bytes_read, bytes_written=self._bytes_written, puts=self._puts,
                deletes=self._deletes, skipped=self._skipped, faults=sum(self._faults.values()),
                faults_by_kind=dict(self._faults), get_seconds=self._get_seconds.snapshot(),
                put_seconds=self._put_seconds.snapshot())

    def contains(self, key: bytes) -> bool:
        check_key(key)
        found = self._call("contains", self.tier.contains, key)
        return False if found is _FAILED else found

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        check_keys(keys)
        found = self._call("contains_many", self.tier.contains_many, keys)
        return [False] * len(keys) if found is _FAILED else found

    def get(self, key: bytes) -> bytes | None:
        check_key(key)
        return self._lookup("get", self.tier.get, key, 1)[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        check_keys(keys)
        return self._lookup("get_many", self.tier.get_many, keys, len(keys))

    def put(self, key: bytes, value: bytes) -> None:
        check_key(key)
        value = check_value(value)
        self._store("put", self.tier.put, [(key, value)], key, value)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        items = check_items(items)
        self._store("put_many", self.tier.put_many, items, items)

    def delete(self, key: bytes) -> None:
        check_key(key)
        if self._call("delete", self.tier.delete, key) is not _FAILED:
            with self._lock:
                self._deletes += 1

    def close(self) -> None:
        """Close the backend; a fault closing it is logged, not raised."""
        self._call("close", self.tier.close, cooldown=False)

    def classify_fault(self, exc: Exception) -> str:
        return self.tier.classify_fault(exc)

    # ---- internals ---------------------------------------------------------------------------

    def _lookup(self, op: str, fn: Callable, arg, n: int) -> list[bytes | None]:
        """get (`n` == 1, `arg` a key) or get_many (`arg` the keys): count and time it."""
        values = self._call(op, fn, arg, timer=self._get_seconds)
        if values is _FAILED:
            values = [None] * n
        elif op == "get":
            values = [values]
        hit_bytes = [len(v) for v in values if v is not None]
        with self._lock:
            self._hits += len(hit_bytes)
            self._misses += n - len(hit_bytes)
            self._bytes_read += sum(hit_bytes)
        return values

    def _store(self, op: str, fn: Callable, items: list[tuple[bytes, bytes]], *args) -> None:
        if self._call(op, fn, *args, timer=self._put_seconds) is not _FAILED:
            with self._lock:
                self._puts += len(items)
                self._bytes_written += sum(len(value) for _, value in items)

    def _call(self, op: str, fn: Callable[..., T], *args, timer: HistogramCounter | None = None,
              cooldown: bool = True) -> T | _Failed:
        """`fn(*args)`, or _FAILED if it raised (the fault counted and logged) or the backend is in
        its cooldown (counted as skipped)."""
        if cooldown and self._clock() < self._down_until:
            with self._lock:
                self._skipped += 1
            return _FAILED
        fault = None
        start = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as exc:  # a tier fault must never reach the engine
            fault, result = exc, _FAILED
        if timer is not None:
            elapsed = time.perf_counter() - start
            with self._lock:
                timer.observe(elapsed)
        if fault is not None:
            self._fault(op, fault)
        return result

    def _fault(self, op: str, exc: Exception) -> None:
        try:
            kind = self.tier.classify_fault(exc)
        except Exception:
            kind = "other"
        if kind not in self._faults:
            kind = "other"
        now = self._clock()
        with self._lock:
            self._faults[kind] += 1
            if kind == "connection":
                self._down_until = now + self.cooldown_s
            last = self._last_logged.get(kind)
            if last is not None and now - last < LOG_INTERVAL_S:
                self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
                return
            self._last_logged[kind] = now
            left_out = self._unlogged.pop(kind, 0)
        more = f" ({left_out} more {kind} faults since the last line)" if left_out else ""
        pause = f"; not used for {self.cooldown_s:g} s" if kind == "connection" and self.cooldown_s else ""
        logger.warning("tier %s: %s failed (%s fault%s): %s: %s%s", self.spec, op, kind, pause,
                       type(exc).__name__, exc, more)
