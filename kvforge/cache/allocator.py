"""Block lifetimes over the pool and the prefix index: allocation with lazy eviction, references.

Every block is in exactly one state, and this class moves it between them:

    free  (uncached, in the pool's free queue, ref_cnt 0)
      │  allocate                                  ▲ release to 0 (uncached)
      ▼                                            │
    used  (ref_cnt > 0: block tables, duplicate locks, pins) ── commit caches it (radix.py)
      │  release to 0 (cached)                     ▲ acquire (a prefix hit revives it)
      ▼                                            │
    evictable (cached, ref_cnt 0, in the radix tree's LRU; not in the free queue)
      │  allocate when the free queue runs short: LRU leaf first, emits BlockRemoved
      ▼
    used (uncached, handed to the allocating sequence)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvforge.cache.blocks import Block, BlockPool, NoFreeBlocksError
from kvforge.cache.events import BlockRemoved, KVEventBuffer
from kvforge.cache.radix import RadixNode, RadixTree


class BlockAllocator:
    """Hands out blocks (free ones first, then evicted ones) and keeps ref counts and the tree's
    evictable set in step. The caller owns each reference it gets and gives it back to `release`."""

    def __init__(self, pool: BlockPool, tree: RadixTree, events: KVEventBuffer):
        self.pool, self.tree, self.events = pool, tree, events
        self.num_evictions = 0
        # Called with the evicted nodes (hash, tokens and block kept) before their blocks are handed
        # out: the last moment their K/V can be read (the manager writes them back to its tiers).
        self.on_evict: Callable[[list[RadixNode]], None] | None = None

    @property
    def num_available(self) -> int:
        """Free plus evictable blocks: what `allocate` can hand out now."""
        return len(self.pool.free_queue) + self.tree.num_evictable

    def allocate(self, n: int) -> list[Block]:
        """`n` blocks with ref_cnt 1 and no hash: the head of the free queue first, then the least
        recently used evictable leaves (evicted from the tree; one BlockRemoved lists them).
        Raises NoFreeBlocksError, changing nothing, when fewer than `n` are available."""
        free = len(self.pool.free_queue)
        if n <= free:
            return self.pool.allocate(n)
        short = n - free
        if short > self.tree.num_evictable:
            raise NoFreeBlocksError(f"{n} blocks are needed but only {free + self.tree.num_evictable} are free "
                                    f"or evictable ({free} free, {self.tree.num_evictable} cached)")
        blocks = self.pool.allocate(free)
        hashes: list[bytes] = []
        evicted = self.tree.evict(short)
        if self.on_evict is not None:
            self.on_evict(evicted)
        for node in evicted:
            block = node.block
            block.ref_cnt = 1
            blocks.append(block)
            hashes.append(node.block_hash)
        self.num_evictions += short
        self.events.record(BlockRemoved, tuple(hashes))
        return blocks

    def acquire(self, nodes: Sequence[RadixNode]) -> None:
        """Take one reference on each node's cached block, reviving the evictable ones; touches
        them in order (one pass: a 32k-token prefix is 2048 blocks)."""
        revived = 0
        for node in nodes:
            block = node.block
            ref_cnt = block.ref_cnt
            if not ref_cnt:
                revived += 1
            block.ref_cnt = ref_cnt + 1
        self.tree.mark_revived(revived)
        self.tree.touch(nodes)

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference on each block, in order (touching cached ones): at ref_cnt 0 an
        uncached block joins the tail of the free queue, a cached one becomes evictable."""
        queue = self.pool.free_queue
        cached: list[RadixNode] = []
        for block in blocks:
            ref_cnt = block.ref_cnt - 1
            if ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} released with ref_cnt {block.ref_cnt}")
            block.ref_cnt = ref_cnt
            node = block.node
            if node is not None:
                cached.append(node)
            elif not ref_cnt:
                queue.append(block)
        if cached:
            self.tree.mark_released(cached)
