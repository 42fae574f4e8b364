"""One sequence's share of the cache: its block table and commit state, the errors that name a
sequence, and the position -> slot arithmetic.

Positions of one sequence, block size 4, length 10, capacity 16, started from a 1-block prefix:

    position   0 1 2 3 | 4 5 6 7   | 8 9 . .   block_table = [b0, b1, b2]
    block      b0      | b1        | b2        slot(p) = block_table[p // 4] * 4 + p % 4
               matched | committed | partial   b0: shared, cached (ref held by this sequence)
                                               b1: its own, cached by commit(tokens[:8 or more])
                                               b2: never cached while partial; 10, 11 not appended
"""

from __future__ import annotations

from kvforge.cache.blocks import Block
from kvforge.cache.radix import RadixNode


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


class SeqState:
    """One sequence's bookkeeping, owned by the manager.

    Invariants: len(blocks) == ceil(length / block_size); length <= capacity;
    num_committed * block_size <= length; `tip` is the radix node of the sequence's cached chain
    (the root when empty): the chain's i-th node from the root caches blocks[i] for
    i < tip.depth <= num_committed (fewer only after a hash collision set `caching` False, and
    `caching` is False only while fewer). The sequence holds one reference on each block of `blocks`.
    """

    __slots__ = ("length", "capacity", "blocks", "extra", "num_committed", "tip", "caching", "next_slot")

    def __init__(self, capacity: int, extra: bytes, root: RadixNode, prefix: list[RadixNode], block_size: int):
        """A sequence starting from the cached chain `prefix` (root side first; the caller has taken a
        reference on each block for it)."""
        self.length = len(prefix) * block_size
        self.capacity = capacity
        self.blocks: list[Block] = [node.block for node in prefix]
        self.extra = extra
        self.num_committed = len(prefix)
        self.tip = prefix[-1] if prefix else root
        self.caching = True
        # The slot after the last appended position, kept so the decode step needs no block lookup.
        # Only meaningful while the last block is partial: a multiple of block_size (e.g. 0 for a
        # new sequence) means the next position needs a new block.
        self.next_slot = 0

    def truncate(self, length: int, block_size: int) -> list[Block]:
        """Forget the positions from `length` on (0 <= length <= self.length, unchecked) and return
        the blocks that no longer hold any, position order: they have left `blocks` and the caller
        drops the sequence's reference on each. Only full blocks within `length` stay committed:
        `num_committed` and the cached chain are cut to min(num_committed, length // block_size)
        blocks, `tip` climbing back to the node of the last block kept (the blocks kept stay cached). Caching resumes
        when the cut removes every committed block past a hash collision. `next_slot` follows the
        last block kept; a caller that puts another block in its place sets it again.

            block size 4, length 10, 2 committed blocks -> truncate(5) returns [b2]:
            position   0 1 2 3      | 4 5 6 7      | 8 9
            before     b0 committed | b1 committed | b2 partial
            after      b0 committed | b1 partial   |              num_committed 1, tip: b0's node
        """
        keep = (length + block_size - 1) // block_size
        dropped = self.blocks[keep:]
        del self.blocks[keep:]
        self.length = length
        committed = min(self.num_committed, length // block_size)
        tip = self.tip
        for _ in range(tip.depth - committed):  # a chain: each node's parent is the block before
            tip = tip.parent
        self.tip, self.num_committed = tip, committed
        if tip.depth == committed:
            self.caching = True
        self.next_slot = self.blocks[-1].block_id * block_size + (length - 1) % block_size + 1 if keep else 0
        return dropped


def slots(blocks: list[Block], block_size: int, start: int, end: int) -> list[int]:
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
