"""Pinned prefixes: handles and the budget of blocks they may hold.

A pin keeps a cached prefix resident under any memory pressure by holding one reference on each of
its blocks, taken and dropped through the block allocator. The budget counts distinct pinned
blocks, so pinning two prefixes that share blocks costs the shared ones once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvforge.cache.allocator import BlockAllocator
    from kvforge.cache.radix import RadixNode


@dataclass(frozen=True)
class PinHandle:
    """A pinned prefix, from `KVCacheManager.pin`; give it back to `unpin`. While pinned, each block
    holds one extra reference (owned by the manager's pin table), so it is never evicted."""

    pin_id: int
    block_ids: tuple[int, ...]
    num_tokens: int


class PinTable:
    """Live pins, how many pins hold each block, and the budget `max_blocks`. Holds one reference
    per pin on each pinned block."""

    def __init__(self, max_fraction: float, blocks: BlockAllocator):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_pinned_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.max_blocks = int(max_fraction * blocks.pool.num_blocks)
        self.blocks = blocks
        self.handles: dict[int, PinHandle] = {}
        self.counts: dict[int, int] = {}  # block id -> pins holding it
        self._next_id = 1

    def __len__(self) -> int:
        return len(self.handles)

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by pins."""
        return len(self.counts)

    def pin(self, nodes: list[RadixNode], num_tokens: int) -> PinHandle:
        """Take a reference on each cached node's block and return the handle. Raises ValueError,
        changing nothing, naming the budget if the distinct pinned blocks would exceed it."""
        block_ids = tuple(node.block.block_id for node in nodes)
        new = sum(1 for bid in block_ids if bid not in self.counts)
        pinned = len(self.counts)
        if pinned + new > self.max_blocks:
            raise ValueError(f"pinning {len(block_ids)} blocks ({new} not pinned yet) would exceed the pin budget "
                             f"of {self.max_blocks} blocks (max_pinned_fraction {self.max_fraction} of "
                             f"{self.blocks.pool.num_blocks}); {pinned} blocks are pinned already: unpin a prefix "
                             f"first or raise max_pinned_fraction")
        self.blocks.acquire(nodes)
        for node in nodes:
            self.counts[node.block.block_id] = self.counts.get(node.block.block_id, 0) + 1
        handle = PinHandle(self._next_id, block_ids, num_tokens)
        self._next_id += 1
        self.handles[handle.pin_id] = handle
        return handle

    def unpin(self, handle: PinHandle) -> None:
        """Drop the references `handle` holds, last block first. A no-op for a handle that is not
        a live pin of this table."""
        if self.handles.get(handle.pin_id) != handle:
            return
        del self.handles[handle.pin_id]
        for bid in handle.block_ids:
            left = self.counts[bid] - 1
            if left:
                self.counts[bid] = left
            else:
                del self.counts[bid]
        self.blocks.release([self.blocks.pool.blocks[bid] for bid in reversed(handle.block_ids)])
