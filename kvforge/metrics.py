"""Prometheus rendering of the server's request metrics and the engine's stats.

`ServerMetrics` owns one `CollectorRegistry` (so several servers in one process never mix their
numbers). Request-level metrics (counts by status, finish reasons, token counters, TTFT, inter-token
latency, queue time) are recorded as they happen; engine and cache state (running / waiting
requests, KV usage, prefix-cache queries and hits, evictions, preemptions, the chunk pool) is read
from the last snapshot given to `update()`, so `/metrics` calls `update(engine.stats(), ...)` and
then `render()`. The chunk budget, fixed for an engine, is given to the constructor.

This module imports nothing of kvforge: a snapshot is anything shaped like `EngineStats` (below).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
QUEUE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KL_BUCKETS = (1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # nats


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative observations: `counts[i]` of them were <= `buckets[i]` (Prometheus' `le`), `count`
    in all (the +Inf bucket), summing to `sum`."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float


class HistogramCounter:
    """Observations into fixed buckets, owned by one thread (the engine's) and read as snapshots."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._counts = [0] * len(buckets)
        self._count, self._sum = 0, 0.0

    def observe(self, value: float) -> None:
        for i, le in enumerate(self.buckets):
            if value <= le:
                self._counts[i] += 1
        self._count += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.buckets, tuple(self._counts), self._count, self._sum)


class CacheStatsLike(Protocol):
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    usage: float
    prefix_query_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # of which found there
    num_evictions: int  # cached blocks evicted to make room
    num_cached_blocks: int  # blocks in the prefix index, used or evictable
    num_evictable_blocks: int  # cached blocks nobody holds (reclaimed on demand)
    num_pinned_blocks: int
    num_chunks: int  # registered document chunks
    num_chunk_blocks: int  # blocks holding their KV


class TierStatsLike(Protocol):
    spec: str  # how the tier was configured ("host:4GiB", "redis://...")
    hits: int
    misses: int
    bytes_read: int
    bytes_written: int
    skipped: int  # operations not tried while a tier that lost its connection cools down
    faults_by_kind: dict[str, int]
    get_seconds: HistogramSnapshot
    put_seconds: HistogramSnapshot


class StoreStatsLike(Protocol):
    tiers: tuple[TierStatsLike, ...]
    blocks_written: int
    writes_dropped: int
    pending_writes: int
    blocks_loaded: int
    bytes_loaded: int
    rejected_by_reason: dict[str, int]


class EngineStatsLike(Protocol):
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    cache: CacheStatsLike
    kv_bytes_per_token: float  # K and V of one token over all layers, in the cache's format
    capacity_tokens: int  # token slots of the KV arena
    kv_quality_kl: HistogramSnapshot | None  # sampled decode steps' KL to full-precision K/V, if sampling
    tiers: StoreStatsLike | None  # with kv_tiers
    restored_tokens: int  # prompt tokens loaded from the tiers instead of computed
    spec_draft_tokens: int  # speculative decoding: drafted tokens verified
    spec_accepted_tokens: int  # of which accepted


class ServerMetrics:
    """The server's metrics; thread-safe (the engine loop records, /metrics renders)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, chunk_budget_blocks: int = 0) -> None:
        """`chunk_budget_blocks`: the most blocks registered chunks may hold (the cache's chunk_budget)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvforge_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished_requests = Counter("kvforge_request_finished", "Requests that left the engine, by finish "
                                         "reason (stop, length, abort)", ["reason"], registry=r)
        self.prompt_tokens = Counter("kvforge_prompt_tokens", "Prompt tokens of requests that left the engine",
                                     registry=r)
        self.generation_tokens = Counter("kvforge_generation_tokens", "Tokens generated for requests that left "
                                         "the engine", registry=r)
        self.step_failures = Counter("kvforge_engine_step_failures", "Engine steps that failed (their requests "
                                     "got a 500; the engine went on serving)", registry=r)
        self.ttft = Histogram("kvforge_time_to_first_token_seconds", "From the request's arrival at the server "
                              "to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("kvforge_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=ITL_BUCKETS, registry=r)
        self.queue_time = Histogram("kvforge_request_queue_seconds", "From the request's arrival to its "
                                    "admission into the engine", buckets=QUEUE_BUCKETS, registry=r)
        self._engine = _EngineCollector(chunk_budget_blocks)
        r.register(self._engine)

    def finished(self, prompt_tokens: int, generation_tokens: int, reason: str) -> None:
        """Record a request that left the engine (finished or aborted)."""
        self.finished_requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)

    def update(self, stats: EngineStatsLike, num_queued: int) -> None:
        """Take the engine's snapshot; `num_queued` = requests the server holds waiting for cache room."""
        self._engine.set(stats, num_queued)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Engine and cache state from the last snapshot; nothing until the first `set`."""

    def __init__(self, chunk_budget_blocks: int) -> None:
        self._chunk_budget = chunk_budget_blocks
        self._lock = threading.Lock()
        self._snapshot: tuple[EngineStatsLike, int] | None = None

    def set(self, stats: EngineStatsLike, num_queued: int) -> None:
        with self._lock:
            self._snapshot = (stats, num_queued)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = self._snapshot
        if snapshot is None:
            return
        s, queued = snapshot
        c = s.cache
        yield GaugeMetricFamily("kvforge_num_requests_running", "Requests in the running batch", s.num_running)
        yield GaugeMetricFamily("kvforge_num_requests_waiting", "Accepted requests not running yet: in the "
                                "engine's waiting queue or queued by the server for cache room", s.num_waiting + queued)
        yield GaugeMetricFamily("kvforge_num_requests_queued", "Requests the server queues for KV cache room "
                                "(--on-full wait)", queued)
        yield GaugeMetricFamily("kvforge_kv_cache_usage", "Fraction of KV blocks in use (0 to 1)", c.usage)
        yield GaugeMetricFamily("kvforge_kv_cache_blocks", "KV blocks in the cache", c.num_blocks)
        yield GaugeMetricFamily("kvforge_kv_cache_used_blocks", "KV blocks held by requests", c.num_used_blocks)
        yield GaugeMetricFamily("kvforge_kv_cache_free_blocks", "KV blocks free and uncached", c.num_free_blocks)
        yield GaugeMetricFamily("kvforge_prefix_cache_blocks", "KV blocks in the prefix cache (used or evictable)",
                                c.num_cached_blocks)
        yield GaugeMetricFamily("kvforge_prefix_cache_evictable_blocks", "Cached KV blocks no request holds, "
                                "reclaimed on demand", c.num_evictable_blocks)
        yield GaugeMetricFamily("kvforge_prefix_cache_pinned_blocks", "KV blocks held by pinned prefixes",
                                c.num_pinned_blocks)
        yield GaugeMetricFamily("kvforge_chunks", "Registered document chunks", c.num_chunks)
        yield GaugeMetricFamily("kvforge_chunk_blocks", "KV blocks holding registered chunks (never evicted)",
                                c.num_chunk_blocks)
        yield GaugeMetricFamily("kvforge_chunk_budget_blocks", "The most KV blocks registered chunks may hold "
                                "(max_chunk_fraction of the cache)", self._chunk_budget)
        yield CounterMetricFamily("kvforge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  c.prefix_query_tokens)
        yield CounterMetricFamily("kvforge_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  c.prefix_hit_tokens)
        yield CounterMetricFamily("kvforge_kv_cache_evictions", "Cached KV blocks evicted to make room",
                                  c.num_evictions)
        yield CounterMetricFamily("kvforge_num_preemptions", "Running requests preempted (to be recomputed)",
                                  s.num_preemptions)
        yield CounterMetricFamily("kvforge_engine_steps", "Engine steps run", s.num_steps)
        yield GaugeMetricFamily("kvforge_kv_cache_bytes_per_token", "Bytes of K and V per token over all layers, "
                                "in the cache's KV format (scales included)", s.kv_bytes_per_token)
        yield GaugeMetricFamily("kvforge_kv_cache_capacity_tokens", "Token slots of the KV cache", s.capacity_tokens)
        yield CounterMetricFamily("kvforge_spec_draft_tokens", "Speculative decoding: drafted tokens verified",
                                  s.spec_draft_tokens)
        yield CounterMetricFamily("kvforge_spec_accepted_tokens", "Speculative decoding: drafted tokens accepted",
                                  s.spec_accepted_tokens)
        if s.tiers is not None:
            yield from _tier_metrics(s.tiers, s.restored_tokens)
        if s.kv_quality_kl is not None:
            yield _histogram("kvforge_kv_quality_kl", "KL divergence (nats) of the next-token distribution from "
                             "quantized K/V to the one from full-precision K/V of the same request, on sampled "
                             "decode steps (--kv-quality-sample)", [], [([], s.kv_quality_kl)])


def _histogram(name: str, doc: str, labels: list[str],
               values: list[tuple[list[str], HistogramSnapshot]]) -> HistogramMetricFamily:
    """A Prometheus histogram of snapshots, one per set of label values."""
    h = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, snap in values:
        h.add_metric(label_values, [(repr(le), n) for le, n in zip(snap.buckets, snap.counts)]
                     + [("+Inf", snap.count)], snap.sum)
    return h


def _tier_metrics(store: StoreStatsLike, restored_tokens: int) -> Iterator[Metric]:
    """The kv_tiers' counters: per tier (label `tier`, its spec) and for the store."""
    per_tier = [("kvforge_kv_tier_hits", "Blocks found in the tier", "hits"),
                ("kvforge_kv_tier_misses", "Blocks looked up and not found in the tier", "misses"),
                ("kvforge_kv_tier_read_bytes", "Bytes read from the tier", "bytes_read"),
                ("kvforge_kv_tier_written_bytes", "Bytes written to the tier", "bytes_written"),
                ("kvforge_kv_tier_skipped", "Operations not tried while the tier cooled down after a "
                 "connection fault", "skipped")]
    for name, doc, attr in per_tier:
        c = CounterMetricFamily(name, doc, labels=["tier"])
        for t in store.tiers:
            c.add_metric([t.spec], getattr(t, attr))
        yield c
    faults = CounterMetricFamily("kvforge_kv_tier_faults", "Tier operations that failed (the block was "
                                 "recomputed or not kept), by kind: connection, full, permission, io, other",
                                 labels=["tier", "kind"])
    for t in store.tiers:
        for kind, n in sorted(t.faults_by_kind.items()):
            faults.add_metric([t.spec, kind], n)
    yield faults
    yield _histogram("kvforge_kv_tier_get_seconds", "Latency of reads from the tier", ["tier"],
                     [([t.spec], t.get_seconds) for t in store.tiers])
    yield _histogram("kvforge_kv_tier_put_seconds", "Latency of writes to the tier", ["tier"],
                     [([t.spec], t.put_seconds) for t in store.tiers])
    rejected = CounterMetricFamily("kvforge_kv_tier_rejected_blocks", "Stored blocks refused at load (another "
                                   "model or format, bad checksum, truncated...) and recomputed", labels=["reason"])
    for reason, n in sorted(store.rejected_by_reason.items()):
        rejected.add_metric([reason], n)
    yield rejected
    yield CounterMetricFamily("kvforge_kv_tier_blocks_written", "Blocks written to the tiers", store.blocks_written)
    yield CounterMetricFamily("kvforge_kv_tier_writes_dropped", "Blocks not written because too many writes "
                              "were pending", store.writes_dropped)
    yield GaugeMetricFamily("kvforge_kv_tier_pending_writes", "Blocks waiting to be written", store.pending_writes)
    yield CounterMetricFamily("kvforge_kv_tier_blocks_loaded", "Blocks loaded from the tiers into the KV cache",
                              store.blocks_loaded)
    yield CounterMetricFamily("kvforge_kv_tier_restored_tokens", "Prompt tokens whose K/V was loaded from the "
                              "tiers instead of computed", restored_tokens)
