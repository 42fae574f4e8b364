"""KVCacheManager: the only cache API the engine sees.

It maps sequences (int `seq_id`) to blocks of the pool and positions to flat arena slots; it never
touches a tensor. A sequence is registered with a capacity in tokens, grows by `append` (which
allocates blocks lazily, one block per `block_size` positions) and gives everything back on `free`.

Positions of one sequence, block size 4, length 6, capacity 10:

    position   0 1 2 3 | 4 5 . .          block_table = [b0, b1]
    block      b0      | b1               slot(p) = block_table[p // 4] * 4 + p % 4
               stored  | stored | free    positions 6, 7 are reserved in b1 but not yet appended;
                                          position 8 needs a new block; 10 is past capacity
"""

from __future__ import annotations

from dataclasses import dataclass

from kvforge.cache.blocks import Block, BlockPool, NoFreeBlocksError


class CacheOverflowError(ValueError):
    """Appending would write a position at or past the sequence's capacity. Nothing was changed."""

    def __init__(self, seq_id: int, position: int, capacity: int):
        self.seq_id, self.position, self.capacity = seq_id, position, capacity
        super().__init__(f"sequence {seq_id}: position {position} is past its capacity of {capacity} tokens")

    def __reduce__(self):
        return type(self), (self.seq_id, self.position, self.capacity)


class UnknownSequenceError(ValueError):
    """The sequence id is not registered (never added, or already freed)."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        super().__init__(f"unknown sequence {seq_id}: register it with add_sequence() first "
                         f"(it may have been freed already)")

    def __reduce__(self):
        return type(self), (self.seq_id,)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's occupancy. Byte fields are 0 when the manager was built without
    `bytes_per_block`."""

    num_sequences: int
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    block_size: int
    bytes_per_block: int
    total_bytes: int
    used_bytes: int
    num_tokens: int  # tokens stored, summed over sequences
    allocated_slots: int  # num_used_blocks * block_size
    internal_fragmentation: float  # unused slots in used blocks / allocated_slots; 0.0 when none
    usage: float  # num_used_blocks / num_blocks


class _SeqState:
    """One sequence's bookkeeping. Invariant: len(blocks) == ceil(length / block_size) <= capacity."""

    __slots__ = ("length", "capacity", "blocks")

    def __init__(self, capacity: int):
        self.length = 0
        self.capacity = capacity
        self.blocks: list[Block] = []


class KVCacheManager:
    """Owns the block pool and every sequence's block table.

    Every mutating method either succeeds or raises having changed nothing. Errors that are the
    caller's (unknown id, overflow, bad counts) are ValueErrors; running out of blocks is a
    NoFreeBlocksError (the scheduler is expected to check `can_append` and preempt first).
    `pool` is exposed for inspection and tests; the engine should not touch it.
    """

    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int = 0):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if bytes_per_block < 0:
            raise ValueError(f"bytes_per_block must be >= 0, got {bytes_per_block}")
        self.pool = BlockPool(num_blocks)
        self._block_size = block_size
        self._bytes_per_block = bytes_per_block
        self._seqs: dict[int, _SeqState] = {}
        self._num_tokens = 0  # sum of lengths, kept up to date so stats() needs no scan

    # ---- sizes --------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def bytes_per_block(self) -> int:
        return self._bytes_per_block

    @property
    def num_free_blocks(self) -> int:
        return len(self.pool.free_queue)

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # ---- sequences ----------------------------------------------------------------------------

    def add_sequence(self, seq_id: int, capacity: int) -> None:
        """Register `seq_id` with length 0 and room for `capacity` tokens. Allocates nothing:
        `append` takes blocks as positions need them."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already registered; free it before adding it again")
        if capacity <= 0:
            raise ValueError(f"sequence {seq_id}: capacity must be a positive number of tokens, got {capacity}")
        self._seqs[seq_id] = _SeqState(capacity)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def free(self, seq_id: int) -> None:
        """Unregister `seq_id` and release its blocks, last block first, so the end of the sequence
        (the least reusable part) is reused and evicted first. An unknown id (never added or
        already freed) is a no-op."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return
        self.pool.free(seq.blocks[::-1])
        del self._seqs[seq_id]
        self._num_tokens -= seq.length

    def length(self, seq_id: int) -> int:
        """Positions appended so far."""
        return self._get(seq_id).length

    def capacity(self, seq_id: int) -> int:
        return self._get(seq_id).capacity

    def remaining(self, seq_id: int) -> int:
        """Positions that may still be appended before the capacity is reached."""
        seq = self._get(seq_id)
        return seq.capacity - seq.length

    def block_table(self, seq_id: int) -> list[int]:
        """A new list of the sequence's block ids, position order; covers every appended position."""
        return [block.block_id for block in self._get(seq_id).blocks]

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat slots of the appended positions [start, end), in order."""
        seq = self._get(seq_id)
        if not 0 <= start <= end <= seq.length:
            raise ValueError(f"sequence {seq_id}: positions [{start}, {end}) are not within the "
                             f"{seq.length} appended positions")
        return _slots(seq.blocks, self._block_size, start, end)

    # ---- growth -------------------------------------------------------------------------------

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks that appending `num_tokens` more positions would allocate (capacity is not
        checked). Does not modify anything."""
        seq = self._get(seq_id)
        if num_tokens < 0:
            raise ValueError(f"sequence {seq_id}: num_tokens must be >= 0, got {num_tokens}")
        bs = self._block_size
        return max(0, (seq.length + num_tokens + bs - 1) // bs - len(seq.blocks))

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether enough blocks are free to append `num_tokens` positions now. Capacity is not
        checked (`append` raises CacheOverflowError for that). Does not modify anything."""
        return self.blocks_needed(seq_id, num_tokens) <= len(self.pool.free_queue)

    def append(self, seq_id: int, num_tokens: int) -> list[int]:
        """Reserve the next `num_tokens` positions of `seq_id`: allocate the blocks they need,
        advance the length, and return their flat slots in position order (a new list the caller
        owns). The caller writes their K/V into those slots before reading them back.

        Raises, changing nothing: UnknownSequenceError, ValueError (num_tokens <= 0),
        CacheOverflowError (past capacity), NoFreeBlocksError (not enough free blocks).
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(seq_id)
        if num_tokens <= 0:
            raise ValueError(f"sequence {seq_id}: num_tokens must be positive, got {num_tokens}")
        start = seq.length
        end = start + num_tokens
        if end > seq.capacity:
            raise CacheOverflowError(seq_id, seq.capacity, seq.capacity)
        bs = self._block_size
        blocks = seq.blocks
        need = (end + bs - 1) // bs - len(blocks)
        if need > 0:
            free = len(self.pool.free_queue)
            if need > free:
                raise NoFreeBlocksError(f"sequence {seq_id}: appending {num_tokens} tokens needs {need} new "
                                        f"blocks but only {free} are free")
            blocks.extend(self.pool.allocate(need))
        seq.length = end
        self._num_tokens += num_tokens
        if num_tokens == 1:  # the decode step: keep it to a handful of operations
            return [blocks[start // bs].block_id * bs + start % bs]
        return _slots(blocks, bs, start, end)

    # ---- observability ------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot; O(1). Fragmentation assumes blocks are not shared between sequences (true
        until fork and prefix caching land)."""
        total = self.pool.num_blocks
        free = len(self.pool.free_queue)
        used = total - free
        allocated = used * self._block_size
        return CacheStats(
            num_sequences=len(self._seqs),
            num_blocks=total,
            num_used_blocks=used,
            num_free_blocks=free,
            block_size=self._block_size,
            bytes_per_block=self._bytes_per_block,
            total_bytes=total * self._bytes_per_block,
            used_bytes=used * self._bytes_per_block,
            num_tokens=self._num_tokens,
            allocated_slots=allocated,
            internal_fragmentation=(allocated - self._num_tokens) / allocated if allocated else 0.0,
            usage=used / total,
        )

    def block_map(self, width: int = 64) -> str:
        """One character per block in id order, `X` used and `.` free, in lines of `width`."""
        if width <= 0:
            raise ValueError(f"block_map width must be positive, got {width}")
        chars = "".join("X" if block.ref_cnt > 0 else "." for block in self.pool.blocks)
        return "\n".join(chars[i:i + width] for i in range(0, len(chars), width))

    def dump_stats(self) -> str:
        """Human-readable state: totals, usage, fragmentation and the block map."""
        s = self.stats()
        per_block = f", {_format_bytes(s.bytes_per_block)} per block" if s.bytes_per_block else ""
        lines = [
            "KVCacheManager state:",
            f"  Total blocks: {s.num_blocks} (block size {s.block_size}{per_block})",
            f"  Used: {s.num_used_blocks} Free: {s.num_free_blocks}",
            f"  Sequences: {s.num_sequences}, tokens: {s.num_tokens}",
            f"  Internal fragmentation: {s.internal_fragmentation:.2f}",
            "  Block map (. = free, X = used):",
        ]
        lines += ["    " + line for line in self.block_map().splitlines()]
        return "\n".join(lines)

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant; return None when all hold:
        the free queue is well linked with no block twice; free + used == total; a free block has
        ref_cnt 0; a used block's ref_cnt equals the number of block tables holding it (a block
        may be shared); each sequence has ceil(length / block_size) blocks and length <= capacity.
        O(num_blocks + stored blocks); for tests and debugging."""
        bs = self._block_size
        total_tokens = 0
        holders = [0] * self.pool.num_blocks
        for seq_id, seq in self._seqs.items():
            if not 0 <= seq.length <= seq.capacity:
                raise RuntimeError(f"sequence {seq_id}: length {seq.length} is outside [0, capacity "
                                   f"{seq.capacity}]")
            if len(seq.blocks) != (seq.length + bs - 1) // bs:
                raise RuntimeError(f"sequence {seq_id}: {len(seq.blocks)} blocks for length {seq.length} "
                                   f"(block size {bs}, expected {(seq.length + bs - 1) // bs})")
            for block in seq.blocks:
                if self.pool.blocks[block.block_id] is not block:
                    raise RuntimeError(f"sequence {seq_id} holds block {block.block_id}, not the pool's")
                holders[block.block_id] += 1
            total_tokens += seq.length
        if total_tokens != self._num_tokens:
            raise RuntimeError(f"token count {self._num_tokens} disagrees with the sum of lengths {total_tokens}")

        queued = self.pool.free_queue.get_all_free_blocks()  # raises if the links are broken
        in_queue = [False] * self.pool.num_blocks
        for block in queued:
            if in_queue[block.block_id]:
                raise RuntimeError(f"block {block.block_id} appears twice in the free queue")
            in_queue[block.block_id] = True

        used = 0
        for block in self.pool.blocks:
            bid, refs = block.block_id, holders[block.block_id]
            if in_queue[bid]:
                if block.ref_cnt != 0:
                    raise RuntimeError(f"block {bid} is in the free queue with ref_cnt {block.ref_cnt}")
                if refs:
                    raise RuntimeError(f"block {bid} is in the free queue but {refs} block tables hold it")
                continue
            used += 1
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {bid} has ref_cnt {block.ref_cnt} but is not in the free queue (leaked)")
            if block.ref_cnt != refs:
                raise RuntimeError(f"block {bid} has ref_cnt {block.ref_cnt} but {refs} block tables hold it")
        if used + len(queued) != self.pool.num_blocks:
            raise RuntimeError(f"used {used} + free {len(queued)} != total {self.pool.num_blocks} blocks")

    def __repr__(self) -> str:
        return (f"KVCacheManager(blocks={self.num_blocks}, block_size={self._block_size}, "
                f"free={self.num_free_blocks}, sequences={len(self._seqs)})")

    def _get(self, seq_id: int) -> _SeqState:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(seq_id)
        return seq


def _slots(blocks: list[Block], block_size: int, start: int, end: int) -> list[int]:
    """Flat slots of positions [start, end), one `range` per block touched.

    | positions                       | block                  | slots                          |
    | [pos, min(end, (i + 1) * bs))   | blocks[i], i = pos//bs | base + pos % bs, ... (base = id*bs) |
    """
    out: list[int] = []
    pos = start
    while pos < end:
        i, offset = divmod(pos, block_size)
        stop = min(end, (i + 1) * block_size)
        base = blocks[i].block_id * block_size
        out.extend(range(base + offset, base + offset + (stop - pos)))
        pos = stop
    return out


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
