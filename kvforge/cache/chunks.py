"""Chunk pages: blocks that hold a registered document chunk's KV for as long as it is registered.

A chunk's KV is computed once, at positions 0..n-1, into blocks of the shared arena that the chunk
table holds with one reference each: they are never cached in the prefix index, never evicted and
never freed while the chunk is registered. Requests that compose a prompt from chunks read these
pages (re-rotating the keys to the chunk's offset as they read them) and count as users: a chunk
in use cannot be unregistered. Chunk pages have their own budget, `max_chunk_fraction` of the pool,
so registered documents can never starve the requests that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvforge.cache.blocks import NoFreeBlocksError
from kvforge.config import ceil_div

if TYPE_CHECKING:
    from kvforge.cache.allocator import BlockAllocator


class ChunkBudgetError(ValueError):
    """A chunk would take registered chunks' pages over their budget (`max_chunk_fraction`)."""


@dataclass(frozen=True)
class ChunkPages:
    """Where a registered chunk's KV lives: `block_ids` in position order, `num_tokens` positions
    (0..num_tokens-1) written from the first slot of the first block."""

    chunk_id: str
    block_ids: tuple[int, ...]
    num_tokens: int


class ChunkTable:
    """Registered chunks' pages and their users. Holds one reference on each chunk block."""

    def __init__(self, max_fraction: float, blocks: BlockAllocator, block_size: int):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_chunk_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.max_blocks = int(max_fraction * blocks.pool.num_blocks)
        self.blocks, self.block_size = blocks, block_size
        self.pages: dict[str, ChunkPages] = {}
        self.users: dict[str, int] = {}
        self.num_blocks = 0

    def allocate(self, chunk_id: str, num_tokens: int, max_blocks: int | None = None) -> ChunkPages:
        """Take the blocks for a new chunk of `num_tokens` (evicting cached prefix blocks if the free
        queue runs short). Raises, changing nothing: ValueError for a bad or registered id or no
        tokens, ChunkBudgetError over the chunk budget, NoFreeBlocksError when the pool has too few
        available blocks or the chunk needs more than `max_blocks` (a caller's admission room)."""
        if not isinstance(chunk_id, str) or not chunk_id:
            raise ValueError(f"a chunk id is a non-empty string, got {chunk_id!r}")
        if chunk_id in self.pages:
            raise ValueError(f"chunk {chunk_id!r} is already registered; unregister it first or use another id")
        if num_tokens <= 0:
            raise ValueError(f"chunk {chunk_id!r} is empty: a chunk needs at least one token")
        need = ceil_div(num_tokens, self.block_size)
        if self.num_blocks + need > self.max_blocks:
            raise ChunkBudgetError(f"chunk {chunk_id!r} needs {need} blocks but the chunk budget is {self.max_blocks} "
                                   f"blocks (max_chunk_fraction {self.max_fraction} of {self.blocks.pool.num_blocks}) "
                                   f"and {self.num_blocks} are taken: unregister a chunk or raise max_chunk_fraction")
        if max_blocks is not None and need > max_blocks:
            raise NoFreeBlocksError(f"chunk {chunk_id!r} needs {need} blocks, {max(max_blocks, 0)} are free")
        pages = ChunkPages(chunk_id, tuple(b.block_id for b in self.blocks.allocate(need)), num_tokens)
        self.pages[chunk_id] = pages
        self.users[chunk_id] = 0
        self.num_blocks += need
        return pages

    def get(self, chunk_id: str) -> ChunkPages:
        pages = self.pages.get(chunk_id)
        if pages is None:
            known = ", ".join(sorted(self.pages)[:10]) or "none"
            raise ValueError(f"unknown chunk id {chunk_id!r}; registered chunks: {known}")
        return pages

    def acquire(self, chunk_ids: list[str]) -> None:
        """Count one more user of each chunk (all known, or ValueError changing nothing)."""
        for chunk_id in chunk_ids:
            self.get(chunk_id)
        for chunk_id in chunk_ids:
            self.users[chunk_id] += 1

    def release(self, chunk_ids: list[str]) -> None:
        """Count one user fewer of each chunk."""
        for chunk_id in chunk_ids:
            if self.users.get(chunk_id, 0) <= 0:
                raise RuntimeError(f"chunk {chunk_id!r} released more often than acquired")
            self.users[chunk_id] -= 1

    def free(self, chunk_id: str) -> None:
        """Unregister a chunk and give its blocks back. Raises ValueError, changing nothing, for an
        unknown chunk or one that requests are using."""
        pages = self.get(chunk_id)
        if self.users[chunk_id]:
            raise ValueError(f"chunk {chunk_id!r} is in use by {self.users[chunk_id]} request(s); unregister it "
                             f"once they finish (or abort them)")
        del self.pages[chunk_id], self.users[chunk_id]
        self.num_blocks -= len(pages.block_ids)
        pool = self.blocks.pool
        self.blocks.release([pool.blocks[bid] for bid in reversed(pages.block_ids)])
