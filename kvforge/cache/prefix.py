"""The prefix-caching half of KVCacheManager's API: lookups, admission, pins, reset and KV events.

`PrefixCaching` is a base class of `KVCacheManager` (one object, one API for the engine), kept in
its own file so each half stays readable; it uses the manager's state declared below and never
registers, grows or frees a sequence. How blocks are found and kept is in `radix.py`, how they
change state in `allocator.py`, pins in `pins.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvforge.cache.allocator import BlockAllocator
from kvforge.cache.blocks import BlockPool
from kvforge.cache.chunks import ChunkTable
from kvforge.cache.events import AllBlocksCleared, KVEvent, KVEventBuffer
from kvforge.cache.pins import PinHandle, PinTable
from kvforge.cache.radix import PrefixMatch, RadixTree
from kvforge.cache.sequence import SeqState


class PrefixCaching:
    """Prefix lookups, admission checks, pins, reset and events over the manager's state."""

    pool: BlockPool
    tree: RadixTree
    _blocks: BlockAllocator
    _pins: PinTable
    _chunks: ChunkTable
    _events: KVEventBuffer
    _seqs: dict[int, SeqState]
    _block_size: int
    _prefix_caching: bool

    @property
    def pin_budget(self) -> int:
        """The most distinct blocks pins may hold: int(max_pinned_fraction * num_blocks)."""
        return self._pins.max_blocks

    # ---- prefix lookup ------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int], extra: bytes = b"") -> PrefixMatch:
        """The longest cached run of full blocks that prefixes `token_ids` under `extra`, never
        covering the last token (its logits are needed): at most (len(token_ids) - 1) // block_size
        blocks. Stored token ids are compared on every hit, so a hash collision ends the match.
        Pure: changes nothing (no access time, ref count or statistic) and holds no reference; pass
        the result to `add_sequence` or `pin` before anything else changes the cache, which re-check
        it. Empty when prefix caching is disabled. Raises ValueError for a token id outside [0, 2**32).
        """
        if not self._prefix_caching:
            return PrefixMatch((), (), 0, len(token_ids))
        return self.tree.match_prefix(token_ids, extra)

    def can_admit(self, match: PrefixMatch, num_new_tokens: int, keep_available: int = 0) -> bool:
        """Whether `add_sequence(..., prefix=match)` then `append(num_new_tokens)` would succeed now
        (capacity aside) and leave at least `keep_available` blocks available (a watermark for running
        sequences to grow into). Matched blocks with ref_cnt 0 count as available but would be revived
        by add_sequence, so they are not available for the new blocks. False for a stale match.
        Does not modify anything."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        try:
            revived = self.tree.count_unused(self.tree.resolve(match, None, "can_admit"))
        except ValueError:
            return False
        bs = self._block_size
        need = (match.num_tokens + num_new_tokens + bs - 1) // bs - len(match.block_ids)
        return need + keep_available <= self._blocks.num_available - revived

    # ---- pinning ------------------------------------------------------------------------------

    def pin(self, prefix: PrefixMatch) -> PinHandle:
        """Keep the matched blocks of `prefix` cached under any pressure: takes one reference on
        each (held by the pin table until `unpin`). Pins may hold at most `pin_budget` distinct
        blocks. Raises ValueError, changing nothing: prefix caching disabled, an empty prefix, a
        stale prefix (call match_prefix again), or the budget exceeded."""
        if not self._prefix_caching:
            raise ValueError("cannot pin a prefix: prefix caching is disabled")
        if not prefix.block_ids:
            raise ValueError(f"cannot pin an empty prefix: it fills no block (a pin needs a cached full block "
                             f"of {self._block_size} tokens, and the last token of a lookup is never matched)")
        return self._pins.pin(self.tree.resolve(prefix, None, "pin"), prefix.num_tokens)

    def unpin(self, handle: PinHandle) -> None:
        """Drop the references `handle` holds (last block first); its blocks stay cached and become
        evictable when nothing else holds them. An unknown or already unpinned handle is a no-op."""
        self._pins.unpin(handle)

    def pins(self) -> list[PinHandle]:
        """The live pins, oldest first."""
        return list(self._pins.handles.values())

    # ---- reset and events ---------------------------------------------------------------------

    def reset_prefix_cache(self) -> None:
        """Empty the prefix index: every cached block becomes free (uncached, appended to the free
        queue in id order) and AllBlocksCleared is emitted; chunk pages are kept. Statistics counters
        are kept. Raises ValueError, changing nothing, while any block is in use by a sequence or a
        pin."""
        in_use = self.pool.num_blocks - len(self.pool.free_queue) - self.tree.num_evictable - self._chunks.num_blocks
        if in_use:
            raise ValueError(f"reset_prefix_cache() refused while {in_use} blocks are in use "
                             f"({len(self._seqs)} sequences, {len(self._pins)} pins): free the sequences "
                             f"and unpin every prefix first")
        self.pool.free_queue.append_n(sorted(self.tree.clear(), key=lambda block: block.block_id))
        self._events.record(AllBlocksCleared)

    def take_events(self) -> list[KVEvent]:
        """The KV events recorded since the last call, oldest first; clears the buffer. The buffer
        keeps only the newest `max_kv_events` (see `num_dropped_events`)."""
        return self._events.take()

    @property
    def num_dropped_events(self) -> int:
        """Events dropped because the buffer was full before take_events() drained it."""
        return self._events.num_dropped
