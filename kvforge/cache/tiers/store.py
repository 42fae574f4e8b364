"""TieredStore: KV blocks below the arena, in an ordered list of tiers (host, disk, redis...).

The manager hands it blocks to keep (`write`: on eviction, or at commit under write-through, or
registered chunks) and asks it for blocks a prompt needs (`prefetch` when a request is queued,
`fetch` at admission). It deals in `StoredBlock`s (a stable key, the chained block hash, and the
block's token ids) and in arena block ids; the bytes in between are `codec.py`'s records.

- Writes copy the blocks out of the arena at once (the arena may reuse them right after) and leave
  encoding and the tiers' puts to one writer thread, off the step's critical path. A block goes to
  every tier that does not hold it yet. When more than `max_pending_bytes` wait, new writes are
  dropped (counted): a slow tier never stalls the engine or grows memory without bound.
- Reads look the keys up top tier first and load the leading run of blocks that every earlier
  block of the chain allows; each record is decoded against the store's `BlockFormat` and the token
  ids looked up. A rejected record (another model or format, a bad checksum, truncated) is counted
  by reason, deleted from its tier and ends the run: what follows is recomputed, nothing wrong is
  loaded. Blocks found in a lower tier are copied up into the tiers above it (by the writer).
- Faults are the tiers' wrappers' business (`MeteredTier`): a dead tier reads as misses.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvforge.cache.kv_cache import KVCache
from kvforge.cache.tiers.base import Tier
from kvforge.cache.tiers.codec import (
    REJECT_REASONS,
    BlockFormat,
    BlockRejected,
    decode_block,
    encode_block,
    stack_payloads,
)
from kvforge.cache.tiers.metered import MeteredTier, TierStats

log = logging.getLogger("kvforge.tiers")


@dataclass(frozen=True)
class StoredBlock:
    """A block as the tiers know it: `key` (its chained hash, stable across processes) and its tokens."""

    key: bytes
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store was opened. `blocks_read_by_tier`: blocks read and decoded cleanly, by
    the tier they came from (the first that held them); `rejected_by_reason`: records refused by
    `codec.decode_block`."""

    tiers: tuple[TierStats, ...]
    blocks_written: int
    bytes_written: int
    writes_dropped: int
    pending_writes: int
    blocks_loaded: int
    bytes_loaded: int
    blocks_read_by_tier: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    read_seconds: float = 0.0  # in fetch: reading the tiers and waiting for prefetches (engine thread)
    load_seconds: float = 0.0  # in load: copying fetched blocks into the arena


class TieredStore:
    """Owns its tiers (wrapped in `MeteredTier`), a writer thread and a small prefetch pool.
    `write`, `prefetch`, `fetch` and `stats` are called from one thread (the engine's)."""

    def __init__(self, arena: KVCache, tiers: Sequence[Tier], fmt: BlockFormat,
                 max_pending_bytes: int = 1 << 30, max_prefetch_bytes: int = 1 << 30):
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        if fmt.block_bytes != arena.bytes_per_block or fmt.block_size != arena.block_size \
                or fmt.num_layers != arena.num_layers:
            raise ValueError(f"the block format {fmt} does not describe the arena {arena}")
        self.arena, self.fmt = arena, fmt
        self.tiers = [t if isinstance(t, MeteredTier) else MeteredTier(t) for t in tiers]
        self._pin = arena.device.type == "cuda"
        self._max_pending, self._max_prefetch = max_pending_bytes, max_prefetch_bytes
        self._lock = threading.Lock()  # guards the counters below, shared with the worker threads
        self._pending_bytes = 0
        self._written = self._written_bytes = self._dropped = 0
        self._loaded = self._loaded_bytes = 0
        self._read_by_tier: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._load_seconds = self._read_seconds = 0.0
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="kvforge-tier-writer", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvforge-tier-reader")
        # key -> the payload a prefetch found, or its future while in flight (misses are not kept: a block
        # missing then may be written by the time it is fetched)
        self._prefetched: OrderedDict[bytes, Future | memoryview] = OrderedDict()
        self._prefetched_bytes = 0
        self._closed = False

    # ---- writes -------------------------------------------------------------------------------

    def write(self, blocks: Sequence[StoredBlock], block_ids: Sequence[int]) -> None:
        """Keep `blocks` (whose K/V is in the arena at `block_ids` now) in every tier that lacks them.
        Copies the bytes out of the arena before returning; the rest happens on the writer thread.
        Dropped (counted) when too many bytes already wait."""
        if not blocks or self._closed:
            return
        size = len(blocks) * self.fmt.block_bytes
        with self._lock:
            if self._pending_bytes + size > self._max_pending:
                self._dropped += len(blocks)
                return
            self._pending_bytes += size
        staging = torch.empty((len(blocks), self.fmt.block_bytes), dtype=torch.uint8, pin_memory=self._pin)
        self.arena.export_blocks(block_ids, staging)
        done = None
        if self._pin:
            done = torch.cuda.Event()
            done.record()
        self._queue.put(("blocks", list(blocks), staging, done))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write reached its tiers; False on timeout."""
        finished = threading.Event()
        self._queue.put(("flush", finished))
        return finished.wait(timeout)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item[0] == "stop":
                return
            if item[0] == "flush":
                item[1].set()
                continue
            try:
                if item[0] == "blocks":
                    self._put_blocks(*item[1:])
                else:  # ("records", [(key, record)], tiers): copies up after a read
                    for key, record in item[1]:
                        for tier in item[2]:
                            tier.put(key, record)
            except Exception:  # a bug here must not kill the writer: log it, drop the batch
                log.exception("kvforge tier writer: a batch of blocks was dropped")

    def _put_blocks(self, blocks: list[StoredBlock], staging: torch.Tensor, done) -> None:
        try:
            if done is not None:
                done.synchronize()
            keys = [b.key for b in blocks]
            missing = [[k for k, there in zip(keys, tier.contains_many(keys)) if not there] for tier in self.tiers]
            needed = set().union(*map(set, missing))
            records = {b.key: encode_block(self.fmt, b.token_ids, staging[i].numpy())
                       for i, b in enumerate(blocks) if b.key in needed}
            for tier, keys_missing in zip(self.tiers, missing):
                if keys_missing:
                    tier.put_many([(k, records[k]) for k in keys_missing])
            with self._lock:
                self._written += len(records)
                self._written_bytes += sum(map(len, records.values()))
        finally:
            with self._lock:
                self._pending_bytes -= len(blocks) * self.fmt.block_bytes

    # ---- reads --------------------------------------------------------------------------------

    def prefetch(self, blocks: Sequence[StoredBlock]) -> None:
        """Start reading `blocks` (a chain, in order) from the tiers in the background, so that a
        later `fetch` of them waits less or not at all. Skipped while more than max_prefetch_bytes of
        results wait to be fetched."""
        todo = [b for b in blocks if b.key not in self._prefetched]
        if not todo or self._closed or self._prefetched_bytes >= self._max_prefetch:
            return
        future = self._readers.submit(self._read_run, todo)
        for b in todo:
            self._prefetched[b.key] = future

    def fetch(self, blocks: Sequence[StoredBlock]) -> list[memoryview]:
        """The payloads (`fmt.block_bytes` each) of the leading run of `blocks` (a chain, in order) that
        the tiers hold and that decode cleanly; waits for a prefetch in flight. Blocks past the first
        miss or rejection are not returned. Counts nothing as loaded: `load` does."""
        start = time.perf_counter()
        try:
            return self._fetch(blocks)
        finally:
            with self._lock:
                self._read_seconds += time.perf_counter() - start

    def _fetch(self, blocks: Sequence[StoredBlock]) -> list[memoryview]:
        out: list[memoryview] = []
        rest = list(blocks)
        while rest:
            entry = self._prefetched.get(rest[0].key)
            if entry is None:
                break
            if isinstance(entry, Future):  # keep what it found; what it missed may be there by now
                results = entry.result()
                for key in [k for k, v in self._prefetched.items() if v is entry]:
                    payload = results.get(key)
                    if payload is None:
                        del self._prefetched[key]
                    else:
                        self._prefetched[key] = payload
                        self._prefetched_bytes += len(payload)
                continue
            self._forget(rest[0].key)
            out.append(entry)
            rest.pop(0)
        if rest:
            results = self._read_run(rest)
            for b in rest:
                if results.get(b.key) is None:
                    break
                out.append(results[b.key])
        self._trim_prefetched()
        return out

    def load(self, payloads: Sequence[memoryview], block_ids: Sequence[int]) -> None:
        """Write fetched payloads into the arena at `block_ids` (through pinned memory on a GPU: the
        copy is queued on the current stream and overlaps the host's work)."""
        if not payloads:
            return
        start = time.perf_counter()
        self.arena.import_blocks(block_ids, stack_payloads(payloads, self.fmt.block_bytes, self._pin))
        with self._lock:
            self._loaded += len(payloads)
            self._loaded_bytes += len(payloads) * self.fmt.block_bytes
            self._load_seconds += time.perf_counter() - start

    def _read_run(self, blocks: list[StoredBlock]) -> dict[bytes, memoryview | None]:
        """key -> payload for the leading run of `blocks` found in some tier and decoding cleanly
        (None for the block that ended the run). Runs on any thread."""
        keys = [b.key for b in blocks]
        where: list[int | None] = [None] * len(keys)  # the first tier holding each key
        for t, tier in enumerate(self.tiers):
            ask = [i for i, w in enumerate(where) if w is None]
            if not ask:
                break
            for i, there in zip(ask, tier.contains_many([keys[i] for i in ask])):
                if there:
                    where[i] = t
        run = next((i for i, w in enumerate(where) if w is None), len(keys))
        records: dict[int, bytes | None] = {}
        for t, tier in enumerate(self.tiers):
            idx = [i for i in range(run) if where[i] == t]
            if idx:
                records.update(zip(idx, tier.get_many([keys[i] for i in idx])))
        out: dict[bytes, memoryview | None] = {}
        copy_up: dict[int, list[tuple[bytes, bytes]]] = {}
        for i in range(run):
            record, block = records.get(i), blocks[i]
            try:
                if record is None:  # gone since contains (evicted, expired, a fault)
                    raise KeyError(block.key)
                verify = not self.tiers[where[i]].in_process
                payload = decode_block(self.fmt, record, block.token_ids, verify).payload
            except KeyError:
                out[block.key] = None
                break
            except BlockRejected as e:
                with self._lock:
                    self._rejected[e.reason] = self._rejected.get(e.reason, 0) + 1
                log.warning("kvforge tiers: %s (key %s, tier %s); it is recomputed and deleted",
                            e, block.key.hex()[:16], self.tiers[where[i]].spec)
                self.tiers[where[i]].delete(block.key)
                out[block.key] = None
                break
            out[block.key] = payload
            with self._lock:
                name = self.tiers[where[i]].spec
                self._read_by_tier[name] = self._read_by_tier.get(name, 0) + 1
            if where[i]:
                copy_up.setdefault(where[i], []).append((block.key, record))
        else:
            if run < len(blocks):
                out[blocks[run].key] = None
        for t, items in copy_up.items():
            self._queue.put(("records", items, self.tiers[:t]))
        return out

    def _forget(self, key: bytes) -> None:
        entry = self._prefetched.pop(key, None)
        if isinstance(entry, memoryview):
            self._prefetched_bytes -= len(entry)

    def _trim_prefetched(self) -> None:
        """Drop the oldest finished prefetch results while they hold more than max_prefetch_bytes
        (a request aborted before its admission never fetches its own)."""
        while self._prefetched_bytes > self._max_prefetch:
            key = next((k for k, v in self._prefetched.items() if not isinstance(v, Future)), None)
            if key is None:
                return
            self._forget(key)

    # ---- lifetime and stats -------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued writes (up to `timeout` seconds), stop the threads, close the tiers."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._queue.put(("stop",))
        self._writer.join(timeout)
        self._readers.shutdown(wait=True, cancel_futures=True)
        for tier in self.tiers:
            tier.close()

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                tiers=tuple(t.stats() for t in self.tiers), blocks_written=self._written,
                bytes_written=self._written_bytes, writes_dropped=self._dropped,
                pending_writes=self._pending_bytes // self.fmt.block_bytes, blocks_loaded=self._loaded,
                bytes_loaded=self._loaded_bytes, blocks_read_by_tier=dict(self._read_by_tier),
                rejected=sum(self._rejected.values()),
                rejected_by_reason={r: self._rejected.get(r, 0) for r in REJECT_REASONS},
                read_seconds=self._read_seconds, load_seconds=self._load_seconds)

