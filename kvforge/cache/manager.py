"""KVCacheManager: the only cache API the engine sees.

It maps sequences (int `seq_id`) to blocks of the pool and positions to flat arena slots; it never
touches a tensor. A sequence is registered with a capacity in tokens (optionally starting from a
cached prefix), grows by `append` (which allocates blocks lazily, one block per `block_size`
positions, evicting cached blocks when the free queue runs short), caches its finished full blocks
with `commit`, may be copied by `fork` or cut back by `rollback` (both copy-on-write for a shared
partial last block), and gives everything back on `free`. Positions and slots are drawn in
`sequence.py`, block states (used | evictable | free) in `allocator.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvforge.cache.allocator import BlockAllocator
from kvforge.cache.blocks import Block, BlockPool, NoFreeBlocksError
from kvforge.cache.chunks import ChunkPages, ChunkTable
from kvforge.cache.events import KVEventBuffer
from kvforge.cache.integrity import check_manager
from kvforge.cache.pins import PinTable
from kvforge.cache.prefix import PrefixCaching
from kvforge.cache.radix import PrefixMatch, RadixTree, stored_event
from kvforge.cache.sequence import CacheOverflowError, SeqState, UnknownSequenceError, slots
from kvforge.cache.snapshot import Snapshots
from kvforge.cache.stats import CacheStats, block_map, render_stats
from kvforge.cache.tiered import TieredCaching
from kvforge.cache.tiers.store import TieredStore


class KVCacheManager(PrefixCaching, TieredCaching, Snapshots):
    """Owns the block pool, the prefix index and every sequence's block table.

    Every mutating method either succeeds or raises having changed nothing. Errors that are the
    caller's (unknown id, overflow, bad counts, stale matches, pin budget) are ValueErrors; running
    out of blocks is a NoFreeBlocksError (the scheduler is expected to check `can_append` /
    `can_admit` and preempt first); RuntimeError means a bug here.

    With `enable_prefix_caching` (the default), full blocks that `commit` finalises are cached
    under chained hashes and shared by later sequences whose prompt starts the same way
    (`match_prefix` then `add_sequence(..., prefix=match)`); freed cached blocks stay resident
    until an allocation evicts them (least recently used leaf first). Without it, `match_prefix`
    matches nothing and `commit` only advances a counter: the manager behaves as a plain pager.
    KV events are kept in a bounded buffer of the newest `max_kv_events` (see `events.py`).
    With a `store` (tiers below the arena, `tiers/store.py`), evicted cached blocks are written back to
    it (or, with `write_policy="write_through"`, every block as it is committed) and `read_through`
    loads a prompt's blocks from it (see `tiered.py`).
    `pool` and `tree` are exposed for inspection and tests; the engine should not touch them.
    """

    def __init__(self, num_blocks: int, block_size: int, bytes_per_block: int = 0,
                 enable_prefix_caching: bool = True, max_pinned_fraction: float = 0.5,
                 max_kv_events: int = 10_000, max_chunk_fraction: float = 0.25,
                 store: TieredStore | None = None, write_policy: str = "write_back"):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if bytes_per_block < 0:
            raise ValueError(f"bytes_per_block must be >= 0, got {bytes_per_block}")
        self.pool = BlockPool(num_blocks)
        self.tree = RadixTree(block_size)
        self._events = KVEventBuffer(max_kv_events)
        self._blocks = BlockAllocator(self.pool, self.tree, self._events)
        self._block_size = block_size
        self._bytes_per_block = bytes_per_block
        self._prefix_caching = enable_prefix_caching
        self._seqs: dict[int, SeqState] = {}
        self._num_tokens = 0  # sum of lengths, kept up to date so stats() needs no scan
        self._num_seq_blocks = 0  # sum of block table lengths (shared blocks once per table)
        self._pins = PinTable(max_pinned_fraction, self._blocks)
        self._chunks = ChunkTable(max_chunk_fraction, self._blocks, block_size)
        self._query_tokens = self._hit_tokens = 0
        self._init_tiers(store, write_policy)

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
    def enable_prefix_caching(self) -> bool:
        return self._prefix_caching

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue (uncached). Cached blocks with no holder are not counted here:
        see `num_available_blocks`."""
        return len(self.pool.free_queue)

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation may take now: free plus evictable (cached with ref_cnt 0)."""
        return self._blocks.num_available

    def sequence_block_limit(self, prefix: PrefixMatch | None = None) -> int:
        """The most blocks one sequence could ever hold: the pool less the blocks that registered
        chunk pages and pins keep for good, except pinned blocks that the sequence's `prefix` shares.
        A request needing more can never run, whatever finishes first."""
        shared = sum(1 for bid in prefix.block_ids if bid in self._pins.counts) if prefix else 0
        return self.num_blocks - self._chunks.num_blocks - self._pins.num_pinned_blocks + shared

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # ---- sequences ----------------------------------------------------------------------------

    def add_sequence(self, seq_id: int, capacity: int, prefix: PrefixMatch | None = None,
                     extra: bytes = b"", count_stats: bool = True) -> None:
        """Register `seq_id` with room for `capacity` tokens, starting from `prefix` if given.

        The sequence takes one reference on each matched block (a ref-0 cached block is revived:
        it leaves the evictable set), its length becomes `prefix.num_tokens` and its block table
        the matched blocks. `extra` (the extra keys the prefix was matched under, e.g.
        `hashing.extra_keys(model, kv_dtype, salt)`) is kept for its later commits. Statistics
        count `prefix.num_query_tokens` queried and `prefix.num_tokens` hit (nothing when prefix is
        None, prefix caching is disabled, or `count_stats` is False: a re-admission after preemption,
        whose lookup was counted at its first admission). Allocates no new block: `append` does.
        Raises ValueError, changing nothing: id already registered, capacity <= 0 or below the
        prefix, or a stale prefix (a block evicted or re-cached since match_prefix, or matched
        under other extra keys): call match_prefix again.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already registered; free it before adding it again")
        if capacity <= 0:
            raise ValueError(f"sequence {seq_id}: capacity must be a positive number of tokens, got {capacity}")
        if not isinstance(extra, bytes):
            raise ValueError(f"sequence {seq_id}: extra must be bytes (see hashing.extra_keys), got "
                             f"{type(extra).__name__}")
        nodes = [] if prefix is None else self.tree.resolve(prefix, extra, f"sequence {seq_id}")
        if len(nodes) * self._block_size > capacity:
            raise ValueError(f"sequence {seq_id}: the prefix of {len(nodes) * self._block_size} tokens exceeds "
                             f"its capacity of {capacity} tokens")
        self._blocks.acquire(nodes)
        self._seqs[seq_id] = SeqState(capacity, extra, self.tree.root, nodes, self._block_size)
        self._num_tokens += len(nodes) * self._block_size
        self._num_seq_blocks += len(nodes)
        if prefix is not None and self._prefix_caching and count_stats:
            self._query_tokens += prefix.num_query_tokens
            self._hit_tokens += prefix.num_tokens

    def fork(self, parent_id: int, child_id: int) -> tuple[int, int] | None:
        """Register `child_id` as a copy of `parent_id` (its length, capacity, extra keys and commit
        state). The child takes a reference on each of the parent's full blocks (shared, like a prefix
        hit, so its K/V is never computed twice) and gets a new block of its own for the parent's
        partly filled last block, if there is one. Returns that block's (parent block id, child block
        id): the caller copies the parent block's K/V into the child's (`KVCache.copy_block`) before
        either sequence runs again; None when every block is shared. Raises, changing nothing:
        UnknownSequenceError, ValueError (child id already registered), NoFreeBlocksError (no block
        for the copy)."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} is already registered; fork into a new id")
        bs = self._block_size
        shared = parent.blocks if parent.length % bs == 0 else parent.blocks[:-1]
        copy = None
        if len(shared) < len(parent.blocks):
            if self._blocks.num_available < 1:
                raise NoFreeBlocksError(f"forking sequence {parent_id} needs a block for its partial last block "
                                        f"but only {self._available_text()}")
            [own] = self._blocks.allocate(1)
            copy = (parent.blocks[-1].block_id, own.block_id)
        self.pool.incref(shared)
        child = SeqState(parent.capacity, parent.extra, self.tree.root, [], bs)
        child.length, child.blocks = parent.length, list(shared) + ([own] if copy else [])
        child.num_committed = parent.num_committed
        child.tip, child.caching = parent.tip, parent.caching
        child.next_slot = own.block_id * bs + parent.length % bs if copy else parent.next_slot
        self._seqs[child_id] = child
        self._num_tokens += child.length
        self._num_seq_blocks += len(child.blocks)
        return copy

    def rollback(self, seq_id: int, num_tokens: int) -> tuple[int, int] | None:
        """Truncate the last `num_tokens` appended positions of `seq_id` (speculative decoding's
        rejected drafts, "regenerate from here"); 0 is a no-op. Blocks left holding no position are
        released tail first (an uncached one to the free queue, a cached one stays cached, evictable
        once unheld). Only full blocks within the new length stay committed (its chain hashes cut to
        match); the blocks it keeps stay cached and shared. Prefix hit statistics are unchanged.

        If the new last block is partial and cached or shared (committed, a prefix hit, pinned,
        forked), the sequence must not write into it again: a new block takes its place (allocated
        once the emptied blocks are released, evicting like any allocation) and the sequence lets
        the old one go. Returns (old block id, new block id): the caller copies the old block's K/V
        (its first new_length % block_size slots; `KVCache.copy_block` copies it all) into the new
        one at once, before anything else allocates (the old block may now be evictable); None when
        there is nothing to copy. Raises, changing nothing: UnknownSequenceError, ValueError
        (num_tokens outside [0, length]), NoFreeBlocksError (no block for the copy)."""
        seq = self._get(seq_id)
        if not 0 <= num_tokens <= seq.length:
            raise ValueError(f"sequence {seq_id}: cannot roll back {num_tokens} tokens: num_tokens must be in "
                             f"[0, {seq.length}] (its length)")
        if num_tokens == 0:
            return None
        bs = self._block_size
        length = seq.length - num_tokens
        keep = (length + bs - 1) // bs
        old = seq.blocks[keep - 1] if length % bs else None
        if old is not None and old.block_hash is None and old.ref_cnt == 1:
            old = None  # its own uncached block: written over in place
        if old is not None:
            freed = sum(1 for block in seq.blocks[keep:] if block.ref_cnt == 1)
            if self._blocks.num_available + freed < 1:
                raise NoFreeBlocksError(f"rolling back sequence {seq_id} to {length} tokens needs a block for "
                                        f"its cached or shared partial last block but only {self._available_text()}")
        dropped = seq.truncate(length, bs)
        self._blocks.release(dropped[::-1])
        self._num_tokens -= num_tokens
        self._num_seq_blocks -= len(dropped)
        if old is None:
            return None
        [own] = self._blocks.allocate(1)
        seq.blocks[-1] = own
        seq.next_slot = own.block_id * bs + length % bs
        self._blocks.release([old])
        return old.block_id, own.block_id

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def free(self, seq_id: int) -> None:
        """Unregister `seq_id` and drop its references, last block first.
        A block reaching ref_cnt 0 goes to the end of the free queue if uncached, or stays cached
        and becomes evictable (most recently used) if cached; tail first, the end of the sequence
        (the least reusable part) is reused or evicted first. An unknown id is a no-op."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._blocks.release(seq.blocks[::-1])
        self._num_tokens -= seq.length
        self._num_seq_blocks -= len(seq.blocks)

    def length(self, seq_id: int) -> int:
        """Positions appended so far (a matched prefix counts)."""
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
        return slots(seq.blocks, self._block_size, start, end)

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
        """Whether enough blocks are free or evictable to append `num_tokens` positions now.
        Capacity is not checked (`append` raises CacheOverflowError for that). Does not modify
        anything."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(seq_id)
        bs = self._block_size
        if num_tokens == 1 and seq.length % bs:  # the decode step inside the last block
            return True
        if num_tokens < 0:
            raise ValueError(f"sequence {seq_id}: num_tokens must be >= 0, got {num_tokens}")
        need = (seq.length + num_tokens + bs - 1) // bs - len(seq.blocks)
        return need <= 0 or need <= self._blocks.num_available

    def append(self, seq_id: int, num_tokens: int) -> list[int]:
        """Reserve the next `num_tokens` positions of `seq_id`: allocate the blocks they need (from
        the free queue, evicting least recently used cached leaves when it runs short), advance the
        length, and return their flat slots in position order (a new list the caller owns). The
        caller writes their K/V into those slots before reading them back.

        Raises, changing nothing: UnknownSequenceError, ValueError (num_tokens <= 0),
        CacheOverflowError (past capacity), NoFreeBlocksError (not enough free or evictable blocks).
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
        if num_tokens == 1 and start % bs:  # the decode step inside the last block: a handful of operations
            slot = seq.next_slot
            seq.next_slot = slot + 1
            seq.length = end
            self._num_tokens += 1
            return [slot]
        blocks = seq.blocks
        need = (end + bs - 1) // bs - len(blocks)
        if need > 0:
            if need > self._blocks.num_available:
                raise NoFreeBlocksError(f"sequence {seq_id}: appending {num_tokens} tokens needs {need} new blocks "
                                        f"but only {self._available_text()}")
            blocks.extend(self._blocks.allocate(need))
            self._num_seq_blocks += need
        seq.length = end
        self._num_tokens += num_tokens
        out = slots(blocks, bs, start, end)
        seq.next_slot = out[-1] + 1
        return out

    def append_decode(self, seq_ids: Sequence[int]) -> list[int]:
        """The decode step in one call: reserve one more position in each of `seq_ids` (distinct),
        exactly as `append(seq_id, 1)` for each in order would, and return their flat slots in that
        order (a new list). Checks everything before changing anything: raises
        UnknownSequenceError, CacheOverflowError, ValueError (a repeated id) or NoFreeBlocksError
        (the new blocks needed exceed the free and evictable ones), changing nothing."""
        seqs, bs = self._seqs, self._block_size
        try:
            states = [seqs[seq_id] for seq_id in seq_ids]
        except KeyError as e:
            raise UnknownSequenceError(e.args[0]) from None
        need = 0
        for seq in states:
            length = seq.length
            if not length % bs:
                need += 1
            if length >= seq.capacity:
                raise CacheOverflowError(seq_ids[states.index(seq)], seq.capacity, seq.capacity)
        if len(set(seq_ids)) != len(states):
            raise ValueError("append_decode: a sequence id is repeated; append to each sequence once per call")
        new: list[Block] = []
        if need:
            if need > self._blocks.num_available:
                raise NoFreeBlocksError(f"the decode step of {len(states)} sequences needs {need} new blocks but "
                                        f"only {self._available_text()}")
            new = self._blocks.allocate(need)
            new.reverse()  # pop() hands them out in allocation order
            self._num_seq_blocks += need
        out = []
        append = out.append
        for seq in states:
            slot = seq.next_slot
            if not slot % bs:
                block = new.pop()
                seq.blocks.append(block)
                slot = block.block_id * bs
            seq.next_slot = slot + 1
            seq.length += 1
            append(slot)
        self._num_tokens += len(states)
        return out

    def commit(self, seq_id: int, token_ids: Sequence[int], num_tokens: int | None = None) -> bool:
        """Cache the full blocks of `seq_id` whose KV is final. The first `num_tokens` of `token_ids`
        (all of them when None; a caller passes its whole token list and a count rather than a
        slice, which would copy it) are the sequence's tokens from position 0 whose KV has been
        written (num_tokens <= length(seq_id)); each full block among them not committed before is
        hashed (chained, under the sequence's extra keys) and inserted into the prefix index,
        emitting one BlockStored per run of inserted blocks. Cheap (a few comparisons) when no new
        block is full: call it every step.

        If the index already caches the same content (another sequence computed the same block, e.g.
        both were admitted in the same step), the sequence switches to the cached twin in its block
        table and its own copy goes back to the free queue at once: identical KV is held once, and
        later blocks chain below the twin. Returns whether that happened (the block table changed):
        the caller must not go on using slots or a block table of the sequence taken before a call
        that returned True. A hash that names different content (a collision), or a cached twin of a
        block the sequence shares with a fork, stops caching for this sequence; nothing wrong is
        served. Raises UnknownSequenceError, or ValueError (more
        tokens than appended or given), changing nothing.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(seq_id)
        n = len(token_ids) if num_tokens is None else num_tokens
        if n > seq.length:
            raise ValueError(f"sequence {seq_id}: cannot commit {n} tokens, only {seq.length} are appended")
        if n > len(token_ids):
            raise ValueError(f"sequence {seq_id}: cannot commit {n} tokens, only {len(token_ids)} are given")
        bs = self._block_size
        full = n // bs
        first = seq.num_committed
        if full <= first:
            return False
        if not self._prefix_caching or not seq.caching:
            seq.num_committed = full
            return False
        result = self.tree.insert_chain(seq.tip, seq.blocks[first:full], token_ids, first * bs, seq.extra)
        seq.num_committed = full
        for i, twin in result.twins:
            own = seq.blocks[first + i]
            self._blocks.acquire((twin,))
            seq.blocks[first + i] = twin.block
            self._blocks.release([own])
        seq.tip = result.tip
        seq.caching = not result.stopped
        for run in result.stored:
            self._events.record(stored_event, run, bs)
        self._written_through(result.stored)
        return bool(result.twins)

    # ---- chunk pages --------------------------------------------------------------------------

    def allocate_chunk(self, chunk_id: str, num_tokens: int, max_blocks: int | None = None) -> ChunkPages:
        """Reserve the pages of a new chunk of `num_tokens` (see `chunks.py`); the caller writes
        positions 0..num_tokens-1 into `chunk_slot_mapping(chunk_id, 0, num_tokens)`. Raises
        ValueError (bad or taken id, empty), ChunkBudgetError (over the chunk budget) or
        NoFreeBlocksError (too few available blocks, or more than `max_blocks`), changing nothing."""
        return self._chunks.allocate(chunk_id, num_tokens, max_blocks)

    def chunk_pages(self, chunk_id: str) -> ChunkPages:
        """The pages of a registered chunk; ValueError naming the registered ids if unknown."""
        return self._chunks.get(chunk_id)

    def chunk_slot_mapping(self, chunk_id: str, start: int, end: int) -> list[int]:
        """Flat slots of the chunk's positions [start, end)."""
        pages = self._chunks.get(chunk_id)
        if not 0 <= start <= end <= pages.num_tokens:
            raise ValueError(f"chunk {chunk_id!r}: positions [{start}, {end}) are not within its "
                             f"{pages.num_tokens} tokens")
        return slots([self.pool.blocks[bid] for bid in pages.block_ids], self._block_size, start, end)

    def acquire_chunks(self, chunk_ids: list[str]) -> None:
        """Count a request as a user of each chunk (a chunk in use cannot be freed). ValueError,
        changing nothing, for an unknown id."""
        self._chunks.acquire(chunk_ids)

    def release_chunks(self, chunk_ids: list[str]) -> None:
        self._chunks.release(chunk_ids)

    def chunk_users(self, chunk_id: str) -> int:
        """How many requests use the chunk now (acquired and not released); 0 for an unknown id."""
        return self._chunks.users.get(chunk_id, 0)

    def free_chunk(self, chunk_id: str) -> None:
        """Give a chunk's pages back. ValueError, changing nothing, if unknown or in use."""
        self._chunks.free(chunk_id)

    @property
    def chunk_budget(self) -> int:
        """The most blocks chunk pages may hold: int(max_chunk_fraction * num_blocks)."""
        return self._chunks.max_blocks

    # ---- observability ------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot; O(1). See CacheStats for the definitions."""
        return CacheStats.from_counts(
            num_sequences=len(self._seqs), num_blocks=self.pool.num_blocks, block_size=self._block_size,
            bytes_per_block=self._bytes_per_block, num_free_blocks=len(self.pool.free_queue),
            num_evictable_blocks=self.tree.num_evictable, num_cached_blocks=len(self.tree),
            num_tokens=self._num_tokens, num_table_slots=self._num_seq_blocks * self._block_size,
            prefix_query_tokens=self._query_tokens, prefix_hit_tokens=self._hit_tokens,
            num_evictions=self._blocks.num_evictions, num_pinned_blocks=self._pins.num_pinned_blocks,
            num_chunks=len(self._chunks.pages), num_chunk_blocks=self._chunks.num_blocks)

    def block_map(self, width: int = 64) -> str:
        """One character per block in id order, in lines of `width`: `X` used (ref_cnt > 0),
        `C` cached and free to evict (ref_cnt 0), `.` free."""
        return block_map(self.pool.blocks, width)

    def dump_stats(self) -> str:
        """Human-readable state: totals, usage, fragmentation, prefix reuse and the block map."""
        return render_stats(self.stats(), self.block_map(), self._prefix_caching)

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant; return None when all hold (see
        `integrity.check_manager` for the list). O(num_blocks + stored blocks); for tests and debugging."""
        check_manager(self)

    def __repr__(self) -> str:
        return (f"KVCacheManager(blocks={self.num_blocks}, block_size={self._block_size}, "
                f"free={self.num_free_blocks}, cached={len(self.tree)}, sequences={len(self._seqs)})")

    # ---- internals ----------------------------------------------------------------------------

    def _get(self, seq_id: int) -> SeqState:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise UnknownSequenceError(seq_id)
        return seq

    def _available_text(self) -> str:
        free = len(self.pool.free_queue)
        return f"{free + self.tree.num_evictable} are free or evictable ({free} free, {self.tree.num_evictable} cached)"
