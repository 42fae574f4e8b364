"""Blocks of the paged KV cache, their O(1) free queue, and the pool that owns them.

A `Block` is bookkeeping only (an id into the arena of `kv_cache.py`, a reference count, a hash slot
and two free-queue links); it never touches a tensor. The `FreeBlockQueue` threads a doubly linked
list through the blocks themselves, so a block can leave the middle of the queue in O(1) (a prefix
cache hit on a freed block, "touch" in vLLM) and nothing is allocated per operation.

Order is the policy: blocks are taken from the head and returned to the tail, so the head holds the
blocks freed longest ago. Callers free a sequence's blocks tail first, which puts its least reusable
blocks (the end of the sequence) nearest the head: they are reused, and their cached contents
evicted, before the blocks a future prefix match would want.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvforge.cache.radix import RadixNode


class NoFreeBlocksError(RuntimeError):
    """More blocks were requested than are free. Whatever raised it changed nothing."""


class Block:
    """One block of `block_size` token slots in every layer's K and V arena.

    `ref_cnt` counts the holders (sequence block tables, duplicate locks and pins); 0 means free or
    evictable. `block_hash` is set while the block is cached in the prefix index (`radix.py`); a
    cached block keeps it at ref_cnt 0 (it is then evictable, not in the free queue) until it is
    evicted, so it can still be matched (lazy eviction). Blocks in the free queue have no hash.
    `node` is the radix node caching the block, set and cleared with `block_hash` by the index (so
    releasing a cached block needs no lookup by hash); None while uncached.
    `prev_free`/`next_free` are owned by `FreeBlockQueue`: non-None exactly while the block is queued.
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "node", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.node: RadixNode | None = None
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash!r})"


class FreeBlockQueue:
    """Intrusive doubly linked list of free blocks between two sentinels; every operation is O(1)
    per block.

    Membership is the links: a block is queued iff its `prev_free` is not None. Appending a queued
    block or removing one that is not queued raises ValueError and changes nothing.
    """

    def __init__(self, blocks: Iterable[Block] = ()):
        self._head = Block(-1)  # sentinel: _head.next_free is the first free block
        self._tail = Block(-1)  # sentinel: _tail.prev_free is the last free block
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> Block:
        """Take the first (longest free) block. Raises NoFreeBlocksError when the queue is empty."""
        block = self._head.next_free
        if block is self._tail:
            raise NoFreeBlocksError("cannot pop a block: the free queue is empty")
        self._unlink(block)
        return block

    def popleft_n(self, n: int) -> list[Block]:
        """Take the first `n` blocks in queue order. Raises NoFreeBlocksError (changing nothing)
        when fewer than `n` are queued, ValueError when `n` is negative."""
        if n < 0:
            raise ValueError(f"cannot pop a negative number of blocks ({n})")
        if n > self._len:
            raise NoFreeBlocksError(f"cannot pop {n} blocks: the free queue holds {self._len}")
        out = []
        block = self._head.next_free
        for _ in range(n):
            assert block is not None and block is not self._tail, "free queue shorter than its count"
            out.append(block)
            nxt = block.next_free
            block.prev_free = block.next_free = None
            block = nxt
        self._head.next_free = block
        block.prev_free = self._head
        self._len -= n
        return out

    def append(self, block: Block) -> None:
        """Put `block` at the tail (it will be taken last)."""
        if block.prev_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        block.prev_free, block.next_free = last, self._tail
        last.next_free = block
        self._tail.prev_free = block
        self._len += 1

    def append_n(self, blocks: Iterable[Block]) -> None:
        """Append each block in order: the first given is taken first of them."""
        for block in blocks:
            self.append(block)

    def remove(self, block: Block) -> None:
        """Take `block` out from anywhere in the queue in O(1)."""
        if block.prev_free is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        self._unlink(block)

    def get_all_free_blocks(self) -> list[Block]:
        """The queued blocks, head to tail (for tests and debugging; O(n)).

        Raises RuntimeError if the links disagree with the count (a corrupted list).
        """
        out = []
        block = self._head.next_free
        while block is not self._tail:
            if block is None or len(out) > self._len:
                raise RuntimeError(f"free queue links are broken: walked {len(out)} blocks of {self._len} "
                                   f"without reaching the tail")
            out.append(block)
            block = block.next_free
        if len(out) != self._len:
            raise RuntimeError(f"free queue counts {self._len} blocks but links {len(out)}")
        return out

    def _unlink(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1


class BlockPool:
    """Owns every `Block` of the cache (`self.blocks[i].block_id == i`) and their free queue.

    Starts with all blocks free in id order. Each operation is O(1) per block and validates its
    whole argument before changing anything, so an error leaves the pool as it was.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[Block]:
        """Take `n` free blocks (head of the free queue first), each with ref_cnt 1 and no hash.

        Raises NoFreeBlocksError, changing nothing, when fewer than `n` are free. The caller owns one
        reference to each block and must `free` it.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self.free_queue):
            raise NoFreeBlocksError(f"requested {n} blocks but only {len(self.free_queue)} are free")
        blocks = self.free_queue.popleft_n(n)
        for block in blocks:
            assert block.ref_cnt == 0, f"block {block.block_id} was queued with ref_cnt {block.ref_cnt}"
            block.ref_cnt = 1
            # A pool used without a prefix index may leave hashes on freed blocks: reuse drops them.
            # (KVCacheManager evicts cached blocks through its index and never queues a hashed block.)
            block.block_hash = None
        return blocks

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference to each block; a block reaching 0 goes to the END of the free queue.

        Pass blocks in the order they should be reused (and evicted): for a sequence, tail first.
        Raises ValueError, changing nothing, if a block is already free.
        """
        blocks = blocks if isinstance(blocks, list) else list(blocks)
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} is already free (ref_cnt {block.ref_cnt})")
        queue = self.free_queue
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed more often than referenced"
            if block.ref_cnt == 0:
                queue.append(block)

    def incref(self, blocks: Iterable[Block]) -> None:
        """Add one reference to each block (sharing: fork, prefix-cache hits).

        A free block (ref_cnt 0, perhaps still holding its hash) is taken out of the free queue
        first, in O(1): this revives a cached block before it is evicted. The caller must `free`
        each reference it adds.
        """
        queue = self.free_queue
        for block in blocks:
            if block.ref_cnt == 0:
                queue.remove(block)
            block.ref_cnt += 1
