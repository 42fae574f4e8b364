"""CacheStats: a snapshot of the cache's occupancy and prefix reuse, and its text rendering."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvforge.cache.blocks import Block


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache. Every block is in exactly one state:

    - used: ref_cnt > 0 (held by sequences, duplicate locks or pins): `num_used_blocks`;
    - evictable: cached in the prefix index with ref_cnt 0, reclaimed on demand: `num_evictable_blocks`;
    - free: in the free queue, uncached: `num_free_blocks`.

    `num_used_blocks + num_evictable_blocks + num_free_blocks == num_blocks`.
    `internal_fragmentation` is wasted slots / `allocated_slots`, where the allocated slots are the
    used blocks' (a shared block counted once) and the wasted ones are the unwritten slots at the end
    of each sequence's partial last block (a partial block is never shared, full blocks waste none).
    Without sharing this equals (allocated_slots - num_tokens) / allocated_slots. 0.0 when nothing
    is allocated. `num_tokens` sums sequence lengths, so shared prefixes count once per sequence.
    Byte fields are 0 when the manager was built without `bytes_per_block`.
    Prefix counters are cumulative (reset_prefix_cache keeps them): `prefix_query_tokens` sums the
    `num_query_tokens` of the matches given to add_sequence (with count_stats: a re-admission after
    preemption is not counted again), `prefix_hit_tokens` their `num_tokens`.
    """

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
    internal_fragmentation: float  # unwritten slots of partial last blocks / allocated_slots; 0.0 when none
    usage: float  # num_used_blocks / num_blocks
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_hit_rate: float = 0.0  # prefix_hit_tokens / prefix_query_tokens; 0.0 when no queries
    num_cached_blocks: int = 0  # blocks in the prefix index, used or evictable
    num_evictable_blocks: int = 0  # cached blocks with ref_cnt 0
    num_evictions: int = 0
    num_pinned_blocks: int = 0  # distinct blocks held by pins
    num_chunks: int = 0  # registered document chunks
    num_chunk_blocks: int = 0  # blocks holding their KV (used, never evicted)

    @classmethod
    def from_counts(cls, *, num_sequences: int, num_blocks: int, block_size: int, bytes_per_block: int,
                    num_free_blocks: int, num_evictable_blocks: int, num_cached_blocks: int, num_tokens: int,
                    num_table_slots: int, prefix_query_tokens: int, prefix_hit_tokens: int, num_evictions: int,
                    num_pinned_blocks: int, num_chunks: int = 0, num_chunk_blocks: int = 0) -> CacheStats:
        """Derive the snapshot from the manager's counters. `num_table_slots` is block_size times
        the summed block-table lengths: only a sequence's partial last block has unwritten slots,
        and it is never shared, so num_table_slots - num_tokens is the waste."""
        used = num_blocks - num_free_blocks - num_evictable_blocks
        allocated = used * block_size
        return cls(
            num_sequences=num_sequences, num_blocks=num_blocks, num_used_blocks=used,
            num_free_blocks=num_free_blocks, block_size=block_size, bytes_per_block=bytes_per_block,
            total_bytes=num_blocks * bytes_per_block, used_bytes=used * bytes_per_block, num_tokens=num_tokens,
            allocated_slots=allocated,
            internal_fragmentation=(num_table_slots - num_tokens) / allocated if allocated else 0.0,
            usage=used / num_blocks, prefix_query_tokens=prefix_query_tokens, prefix_hit_tokens=prefix_hit_tokens,
            prefix_hit_rate=prefix_hit_tokens / prefix_query_tokens if prefix_query_tokens else 0.0,
            num_cached_blocks=num_cached_blocks, num_evictable_blocks=num_evictable_blocks,
            num_evictions=num_evictions, num_pinned_blocks=num_pinned_blocks, num_chunks=num_chunks,
            num_chunk_blocks=num_chunk_blocks)


def render_stats(s: CacheStats, block_map: str, prefix_caching: bool) -> str:
    """The text of `KVCacheManager.dump_stats()`."""
    per_block = f", {format_bytes(s.bytes_per_block)} per block" if s.bytes_per_block else ""
    if prefix_caching:
        prefix = (f"  Prefix cache: {s.prefix_hit_tokens}/{s.prefix_query_tokens} query tokens hit "
                  f"({s.prefix_hit_rate:.1%}), {s.num_cached_blocks} cached blocks "
                  f"({s.num_evictable_blocks} evictable), {s.num_evictions} evictions, "
                  f"{s.num_pinned_blocks} pinned")
    else:
        prefix = "  Prefix cache: disabled"
    lines = [
        "KVCacheManager state:",
        f"  Total blocks: {s.num_blocks} (block size {s.block_size}{per_block})",
        f"  Used: {s.num_used_blocks} Evictable: {s.num_evictable_blocks} Free: {s.num_free_blocks}",
        f"  Sequences: {s.num_sequences}, tokens: {s.num_tokens}",
        *([f"  Chunks: {s.num_chunks} in {s.num_chunk_blocks} blocks"] if s.num_chunks else []),
        f"  Internal fragmentation: {s.internal_fragmentation:.2f}",
        prefix,
        "  Block map (X = used, C = cached and free to evict, . = free):",
    ]
    lines += ["    " + line for line in block_map.splitlines()]
    return "\n".join(lines)


def block_map(blocks: Sequence[Block], width: int) -> str:
    """One character per block in id order, in lines of `width`: `X` used (ref_cnt > 0), `C` cached
    and free to evict (ref_cnt 0, hashed), `.` free."""
    if width <= 0:
        raise ValueError(f"block_map width must be positive, got {width}")
    chars = "".join("X" if b.ref_cnt > 0 else "." if b.block_hash is None else "C" for b in blocks)
    return "\n".join(chars[i:i + width] for i in range(0, len(chars), width))


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
