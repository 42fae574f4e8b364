"""Saved caches: the cached prefixes, pins and registered chunks of a manager, written to a directory
and restored by a later process (`LLM.save_cache` / `LLM(load_cache=...)`).

`Snapshots` is a base class of `KVCacheManager` (like `prefix.py` and `tiered.py`). A saved cache is
a directory:

    manifest.json   format version, the BlockFormat, every cached block as (key, parent key, extra
                    keys) parents first, the pins (token ids and extra keys), the registered chunks
                    (id, kind, token ids, extra keys)
    blocks/         one `codec.py` record per block under its key (a `DiskTier` with no budget)

Saving writes only the records the directory lacks (a second save of a grown cache is incremental)
and replaces the manifest atomically last, so a save interrupted half-way leaves the previous one
readable. Restoring checks the manifest's version and format, each record against the format and its
key against the chained hash of its parent, tokens and extra keys; whatever fails is counted by
reason and skipped (with the blocks below it), never loaded. Blocks are loaded into free blocks only,
most recently used chains having no priority over others (parents first, in saved order).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvforge.cache import hashing
from kvforge.cache.allocator import BlockAllocator
from kvforge.cache.blocks import BlockPool
from kvforge.cache.chunks import ChunkPages, ChunkTable
from kvforge.cache.events import KVEventBuffer
from kvforge.cache.kv_cache import KVCache
from kvforge.cache.pins import PinTable
from kvforge.cache.radix import RadixNode, RadixTree, stored_event
from kvforge.cache.tiered import chain
from kvforge.cache.tiers.codec import BlockFormat, BlockRejected, decode_block, encode_block, stack_payloads
from kvforge.cache.tiers.disk import DiskTier

log = logging.getLogger("kvforge.tiers")
SNAPSHOT_VERSION = 1
_BATCH = 64
_NO_BUDGET = 1 << 62


@dataclass(frozen=True)
class SnapshotChunk:
    """A registered chunk as a saved cache records it; its blocks are stored under
    `tiered.chain(None, token_ids, ..., extra)`."""

    chunk_id: str
    kind: str
    token_ids: tuple[int, ...]
    extra: bytes
    block_ids: tuple[int, ...] = ()  # its pages (saving only)


@dataclass(frozen=True)
class SavedCache:
    path: str
    num_blocks: int  # blocks the saved cache holds (prefix and chunk blocks)
    blocks_written: int  # of which this save wrote (the rest were there already)
    bytes_written: int
    num_pins: int
    num_chunks: int


@dataclass(frozen=True)
class LoadedCache:
    """What restoring a saved cache did. `chunks` are the saved chunks for the engine to register
    (`load_snapshot_chunk` restores each one's pages, or the engine recomputes it)."""

    path: str
    blocks_loaded: int
    blocks_skipped: int  # not loaded: rejected, below a rejected block, or no free block left
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    pins_restored: int = 0
    pins_skipped: int = 0
    chunks: tuple[SnapshotChunk, ...] = ()


class Snapshots:
    """save_snapshot / load_snapshot / load_snapshot_chunk over the manager's state."""

    pool: BlockPool
    tree: RadixTree
    _blocks: BlockAllocator
    _pins: PinTable
    _chunks: ChunkTable
    _events: KVEventBuffer
    _block_size: int

    def save_snapshot(self, arena: KVCache, fmt: BlockFormat, path: str | os.PathLike,
                      chunks: Sequence[SnapshotChunk] = ()) -> SavedCache:
        """Write every cached block, pin and chunk of `chunks` (registered, with their pages) to the
        directory `path`; records already there are kept. Changes nothing in the cache. Raises
        ValueError for a path that cannot be a directory, OSError when writing fails (the previous
        manifest, if any, stays valid)."""
        root = Path(path)
        disk = DiskTier(str(root / "blocks"), _NO_BUDGET)
        try:
            nodes = self._nodes_parents_first()
            extras: dict[bytes, int] = {}
            items: list[tuple[bytes, tuple[int, ...], int]] = [(n.block_hash, n.token_ids, n.block.block_id)
                                                                for n in nodes]
            for c in chunks:
                items += [(b.key, b.token_ids, bid) for b, bid in
                          zip(chain(None, c.token_ids, 0, len(c.token_ids), self._block_size, c.extra), c.block_ids)]
            todo = [it for it, there in zip(items, disk.contains_many([k for k, _, _ in items])) if not there]
            written = 0
            for i in range(0, len(todo), _BATCH):
                batch = todo[i:i + _BATCH]
                staging = arena.export_blocks([bid for _, _, bid in batch])
                records = [(key, encode_block(fmt, tokens, staging[j].numpy())) for j, (key, tokens, _) in
                           enumerate(batch)]
                disk.put_many(records)
                written += sum(len(r) for _, r in records)
            manifest = {
                "version": SNAPSHOT_VERSION,
                "format": asdict(fmt),
                "nodes": [[n.block_hash.hex(), None if n.parent is self.tree.root else n.parent.block_hash.hex(),
                           _index(extras, n.extra)] for n in nodes],
                "pins": [self._pin_record(handle.pin_id, extras) for handle in self._pins.handles.values()],
                "chunks": [{"chunk_id": c.chunk_id, "kind": c.kind, "token_ids": list(c.token_ids),
                            "extra": _index(extras, c.extra)} for c in chunks],
            }
            manifest["extras"] = [e.hex() for e in extras]
            tmp = root / f".manifest.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, root / "manifest.json")
        finally:
            disk.close()
        return SavedCache(str(root), len(items), len(todo), written, len(manifest["pins"]), len(chunks))

    def load_snapshot(self, arena: KVCache, fmt: BlockFormat, path: str | os.PathLike) -> LoadedCache:
        """Restore the cached blocks and pins saved in `path` into free blocks (cached, evictable;
        BlockStored emitted). Raises ValueError when `path` holds no saved cache; a saved cache of
        another format or version is skipped whole (logged, counted under "format"/"version")."""
        root = Path(path)
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"load_cache={str(path)!r} holds no saved cache (no manifest.json): pass a directory "
                             f"written by LLM.save_cache") from None
        except (OSError, ValueError) as e:
            log.warning("kvforge: the saved cache %s is unreadable (%s); starting empty", path, e)
            return LoadedCache(str(root), 0, 0, {"header": 1})
        if manifest.get("version") != SNAPSHOT_VERSION or manifest.get("format") != asdict(fmt):
            reason = "version" if manifest.get("version") != SNAPSHOT_VERSION else "format"
            log.warning("kvforge: the saved cache %s was written for %s, this engine is %s; nothing is loaded",
                        path, manifest.get("format"), asdict(fmt))
            return LoadedCache(str(root), 0, len(manifest.get("nodes", ())), {reason: len(manifest.get("nodes", ()))})
        extras = [bytes.fromhex(e) for e in manifest["extras"]]
        disk = DiskTier(str(root / "blocks"), _NO_BUDGET)
        rejected: dict[str, int] = {}
        loaded = skipped = 0
        try:
            nodes = manifest["nodes"]
            for i in range(0, len(nodes), _BATCH):
                n_loaded, n_skipped = self._load_batch(arena, fmt, disk, nodes[i:i + _BATCH], extras, rejected)
                loaded += n_loaded
                skipped += n_skipped
        finally:
            disk.close()
        pins_restored = 0
        for pin in manifest["pins"]:
            tokens, extra = pin["tokens"], extras[pin["extra"]]
            match = self.tree.match_prefix([*tokens, 0], extra)
            if match.num_tokens == len(tokens) and len(match.block_ids) <= self._pins.max_blocks:
                try:
                    self.pin(match)
                    pins_restored += 1
                except ValueError:  # over the budget of this (smaller) cache
                    pass
        chunks = tuple(SnapshotChunk(c["chunk_id"], c["kind"], tuple(c["token_ids"]), extras[c["extra"]])
                       for c in manifest["chunks"])
        return LoadedCache(str(root), loaded, skipped, rejected, pins_restored, len(manifest["pins"]) - pins_restored,
                           chunks)

    def load_snapshot_chunk(self, arena: KVCache, fmt: BlockFormat, path: str | os.PathLike, chunk: SnapshotChunk,
                            max_blocks: int | None = None) -> ChunkPages | None:
        """Register `chunk`'s pages (as `allocate_chunk`) filled from the saved cache at `path`, when
        every block of it is there and valid; else None, changing nothing. Raises as allocate_chunk."""
        disk = DiskTier(str(Path(path) / "blocks"), _NO_BUDGET)
        try:
            blocks = chain(None, chunk.token_ids, 0, len(chunk.token_ids), self._block_size, chunk.extra)
            payloads = []
            for b, record in zip(blocks, disk.get_many([b.key for b in blocks])):
                if record is None:
                    return None
                try:
                    payloads.append(decode_block(fmt, record, b.token_ids).payload)
                except BlockRejected as e:
                    log.warning("kvforge: chunk %r of the saved cache %s: %s; it is recomputed", chunk.chunk_id, path, e)
                    return None
        finally:
            disk.close()
        pages = self._chunks.allocate(chunk.chunk_id, len(chunk.token_ids), max_blocks)
        arena.import_blocks(pages.block_ids, stack_payloads(payloads, fmt.block_bytes))
        return pages

    # ---- internals ----------------------------------------------------------------------------

    def _nodes_parents_first(self) -> list[RadixNode]:
        out, frontier = [], [self.tree.root]
        while frontier:
            children = [c for node in frontier for c in node.children.values()]
            out += children
            frontier = children
        return out

    def _pin_record(self, pin_id: int, extras: dict[bytes, int]) -> dict:
        handle = self._pins.handles[pin_id]
        node = self.tree.get(self.pool.blocks[handle.block_ids[-1]].block_hash)
        tokens: list[int] = []
        extra = node.extra
        while node is not self.tree.root:
            tokens[:0] = node.token_ids
            node = node.parent
        return {"tokens": tokens, "extra": _index(extras, extra)}

    def _load_batch(self, arena: KVCache, fmt: BlockFormat, disk: DiskTier, batch: list, extras: list[bytes],
                    rejected: dict[str, int]) -> tuple[int, int]:
        """Load one batch of manifest nodes (parents first) whose parent is cached, into free blocks."""
        keys = [bytes.fromhex(key) for key, _, _ in batch]
        good: list[tuple[bytes, bytes | None, bytes, tuple[int, ...], memoryview]] = []
        skipped = 0
        records = disk.get_many(keys)
        pending = set()
        for (key_hex, parent_hex, e), key, record in zip(batch, keys, records):
            parent = bytes.fromhex(parent_hex) if parent_hex else None
            extra = extras[e]
            if (parent is not None and self.tree.get(parent) is None and parent not in pending) \
                    or self.tree.get(key) is not None:
                skipped += self.tree.get(key) is None
                continue
            try:
                if record is None:
                    raise BlockRejected("truncated", "the record is missing")
                block = decode_block(fmt, record)
                if hashing.hash_block(parent, block.token_ids, extra) != key:
                    raise BlockRejected("tokens", "the record's tokens do not hash to its key")
            except BlockRejected as err:
                rejected[err.reason] = rejected.get(err.reason, 0) + 1
                skipped += 1
                continue
            good.append((key, parent, extra, block.token_ids, block.payload))
            pending.add(key)
        n = min(len(good), len(self.pool.free_queue))
        skipped += len(good) - n
        if not n:
            return 0, skipped
        blocks = self._blocks.allocate(n)
        arena.import_blocks([b.block_id for b in blocks], stack_payloads([g[4] for g in good[:n]], fmt.block_bytes))
        loaded = 0
        for block, (key, parent, extra, tokens, _) in zip(blocks, good):
            tip = self.tree.root if parent is None else self.tree.get(parent)
            if tip is None or (parent is not None and tip.extra != extra):
                skipped += 1
                continue
            result = self.tree.insert_chain(tip, [block], tokens, 0, extra)
            for run in result.stored:
                self._events.record(stored_event, run, self._block_size)
                loaded += len(run)
        self._blocks.release(blocks[::-1])
        return loaded, skipped


def _index(table: dict[bytes, int], value: bytes) -> int:
    return table.setdefault(value, len(table))

