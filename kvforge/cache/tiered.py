"""The tiers half of KVCacheManager's API: write-back of evicted blocks, read-through at admission,
and chunk pages kept in the tiers.

`TieredCaching` is a base class of `KVCacheManager` (one object, one API), in its own file like
`prefix.py`. Without a store every method is a cheap no-op. With one (`TieredStore`, owning the
tiers below the arena):

- an evicted cached block is handed to the store before its block is reused (write-back); under
  `write_through` every block is handed over as `commit` caches it;
- `prefetch(token_ids, extra)` (a request is queued) starts reading the blocks of its prompt that
  the arena lacks; `read_through(token_ids, extra)` (the request is about to be admitted) loads the
  leading run the tiers hold into free or evictable blocks and caches them in the prefix index, so
  the `match_prefix` that follows finds them like any cached block;
- registered chunks are stored under their own chain of keys and restored into chunk pages.

Keys are the chained block hashes (`hashing.py`), under the same extra keys as the prefix index, so
any process with the same model, KV format and salt computes the same keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvforge.cache import hashing
from kvforge.config import TIER_POLICIES
from kvforge.cache.allocator import BlockAllocator
from kvforge.cache.blocks import BlockPool
from kvforge.cache.chunks import ChunkPages, ChunkTable
from kvforge.cache.events import KVEventBuffer
from kvforge.cache.radix import RadixNode, RadixTree, stored_event
from kvforge.cache.tiers.store import StoredBlock, StoreStats, TieredStore

log = logging.getLogger("kvforge.tiers")


def chain(parent: bytes | None, token_ids: Sequence[int], start: int, end: int, block_size: int,
          extra: bytes) -> list[StoredBlock]:
    """The blocks of token_ids[start:end] (start a multiple of block_size; the last block may be
    partial) chained below `parent` (the hash of the block before `start`, None at 0). Pure."""
    out = []
    for pos in range(start, end, block_size):
        tokens = tuple(token_ids[pos:min(pos + block_size, end)])
        parent = hashing.hash_block(parent, tokens, extra)
        out.append(StoredBlock(parent, tokens))
    return out


class TieredCaching:
    """Write-back, read-through and chunk storage over the manager's state and its store."""

    pool: BlockPool
    tree: RadixTree
    _blocks: BlockAllocator
    _chunks: ChunkTable
    _events: KVEventBuffer
    _block_size: int
    _prefix_caching: bool
    _store: TieredStore | None
    _write_through: bool
    _restored_tokens: int

    def _init_tiers(self, store: TieredStore | None, write_policy: str) -> None:
        if write_policy not in TIER_POLICIES:
            raise ValueError(f"the tier write policy must be one of {', '.join(TIER_POLICIES)}, got {write_policy!r}")
        self._store, self._write_through = store, write_policy == "write_through"
        self._restored_tokens = 0
        if store is not None:
            self._blocks.on_evict = self._write_back

    @property
    def store(self) -> TieredStore | None:
        return self._store

    def _write_back(self, nodes: list[RadixNode]) -> None:
        """The allocator's eviction hook: hand the evicted blocks to the store (a copy is taken now)."""
        if self._write_through:  # written as they were cached
            return
        self._write_nodes(nodes)

    def _write_nodes(self, nodes: Sequence[RadixNode]) -> None:
        try:
            self._store.write([StoredBlock(n.block_hash, n.token_ids) for n in nodes],
                              [n.block.block_id for n in nodes])
        except Exception:  # never fail an allocation or a commit over the tiers: the blocks are only lost
            log.exception("kvforge tiers: writing %d blocks failed; they will be recomputed when needed", len(nodes))

    def _written_through(self, runs: Sequence[Sequence[RadixNode]]) -> None:
        """`commit` cached these runs of nodes: under write_through, hand them to the store."""
        if self._store is not None and self._write_through:
            for run in runs:
                self._write_nodes(run)

    def flush_to_tiers(self, timeout: float | None = None) -> int:
        """Hand every cached block not yet handed over (under write_back: every resident one) to the
        store and wait until the tiers hold them (up to `timeout` s). Returns the blocks handed over."""
        if self._store is None:
            return 0
        nodes = [] if self._write_through else self.tree.nodes()
        for i in range(0, len(nodes), 64):
            self._write_nodes(nodes[i:i + 64])
        self._store.flush(timeout)
        return len(nodes)

    # ---- read-through -------------------------------------------------------------------------

    def _missing_chain(self, token_ids: Sequence[int], extra: bytes) -> tuple[list[RadixNode], list[StoredBlock]]:
        """The cached nodes prefixing `token_ids` and the blocks after them that a lookup could match
        (never the block holding the last token)."""
        match = self.tree.match_prefix(token_ids, extra)
        nodes = self.tree.resolve(match, extra, "read_through")
        limit = (len(token_ids) - 1) // self._block_size
        start = len(nodes) * self._block_size
        parent = nodes[-1].block_hash if nodes else None
        return nodes, chain(parent, token_ids, start, limit * self._block_size, self._block_size, extra)

    def prefetch(self, token_ids: Sequence[int], extra: bytes = b"") -> None:
        """Start reading from the tiers the full blocks of `token_ids` (under `extra`) that the arena
        does not cache, in the background. Changes nothing here; a no-op without tiers."""
        if self._store is None or not self._prefix_caching or len(token_ids) <= self._block_size:
            return
        _, missing = self._missing_chain(token_ids, extra)
        self._store.prefetch(missing)

    def read_through(self, token_ids: Sequence[int], extra: bytes = b"") -> int:
        """Load into the arena the leading run of `token_ids`' full blocks (under `extra`; never the
        block holding the last token) that the arena lacks and the tiers hold, and cache them in the
        prefix index as evictable blocks (most recently used; BlockStored emitted). Takes free blocks
        first, then evicts least recently used cached ones, never the prompt's own cached prefix.
        Returns the number of blocks loaded (0 without tiers). Waits for the blocks' prefetch."""
        if self._store is None or not self._prefix_caching or len(token_ids) <= self._block_size:
            return 0
        nodes, missing = self._missing_chain(token_ids, extra)
        if not missing:
            return 0
        payloads = self._store.fetch(missing)
        self._blocks.acquire(nodes)  # hold the matched prefix so that making room cannot evict it
        try:
            n = min(len(payloads), self._blocks.num_available)
            if not n:
                return 0
            blocks = self._blocks.allocate(n)
            self._store.load(payloads[:n], [b.block_id for b in blocks])
            tip = nodes[-1] if nodes else self.tree.root
            result = self.tree.insert_chain(tip, blocks, token_ids, len(nodes) * self._block_size, extra)
            for run in result.stored:
                self._events.record(stored_event, run, self._block_size)
            self._blocks.release(blocks[::-1])
            loaded = sum(len(run) for run in result.stored)
            self._restored_tokens += loaded * self._block_size
            return loaded
        finally:
            self._blocks.release([n.block for n in reversed(nodes)])

    @property
    def restored_tokens(self) -> int:
        """Tokens whose K/V read_through loaded from the tiers instead of recomputing."""
        return self._restored_tokens

    # ---- chunks -------------------------------------------------------------------------------

    def store_chunk(self, chunk_id: str, token_ids: Sequence[int], extra: bytes) -> None:
        """Hand a registered chunk's pages to the store, under the chain of `token_ids` and `extra`
        (keys name the content: another process registering the same content finds them)."""
        if self._store is None:
            return
        pages = self._chunks.get(chunk_id)
        blocks = chain(None, token_ids, 0, len(token_ids), self._block_size, extra)
        try:
            self._store.write(blocks, pages.block_ids)
        except Exception:
            log.exception("kvforge tiers: storing chunk %r failed", chunk_id)

    def restore_chunk(self, chunk_id: str, token_ids: Sequence[int], extra: bytes,
                      max_blocks: int | None = None) -> ChunkPages | None:
        """Register the pages of chunk `chunk_id` (like `allocate_chunk`) filled from the tiers when
        they hold every block of it, and return them; None (nothing changed) when any block is missing
        or rejected, or there are no tiers. Raises as `allocate_chunk` does."""
        if self._store is None:
            return None
        blocks = chain(None, token_ids, 0, len(token_ids), self._block_size, extra)
        payloads = self._store.fetch(blocks)
        if len(payloads) < len(blocks):
            return None
        pages = self._chunks.allocate(chunk_id, len(token_ids), max_blocks)
        self._store.load(payloads, pages.block_ids)
        return pages

    def store_stats(self) -> StoreStats | None:
        return None if self._store is None else self._store.stats()
