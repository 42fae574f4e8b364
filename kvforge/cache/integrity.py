"""The manager's integrity check: every invariant of the pool, the prefix index, the sequences and
the pins, verified from scratch. O(num_blocks + stored blocks); tests call it after every operation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvforge.cache.manager import KVCacheManager


def check_manager(m: KVCacheManager) -> None:
    """Raise RuntimeError naming the first broken invariant of `m`; return None when all hold:

    - each sequence: length in [0, capacity], ceil(length / block_size) blocks from the pool,
      committed blocks within its length, its tip a node of the tree whose chain from the root
      caches its first blocks (with prefix caching on, fewer than its committed blocks exactly while
      a hash collision stops its caching);
    - token and block-table counters equal the sums over sequences;
    - the pin table: per-block pin counts match the live handles, and pinned blocks are cached;
    - the free queue is well linked, holds no block twice, and only uncached blocks with ref_cnt 0;
    - every block's ref_cnt equals its holders (block tables, pins), and every
      block is exactly one of used (ref_cnt > 0), evictable (cached, ref_cnt 0) or free (queued);
    - a block has a hash iff a radix node holds it, and its `node` is that node (and the tree's own
      invariants: links, the evictable count, in-use nodes under in-use parents, a live heap entry
      per evictable leaf);
    - used + evictable + free == total.
    """
    pool, tree, bs = m.pool, m.tree, m.block_size
    holders = [0] * pool.num_blocks
    total_tokens = total_blocks = 0
    for seq_id, seq in m._seqs.items():
        if not 0 <= seq.length <= seq.capacity:
            raise RuntimeError(f"sequence {seq_id}: length {seq.length} is outside [0, capacity {seq.capacity}]")
        if len(seq.blocks) != (seq.length + bs - 1) // bs:
            raise RuntimeError(f"sequence {seq_id}: {len(seq.blocks)} blocks for length {seq.length} "
                               f"(block size {bs}, expected {(seq.length + bs - 1) // bs})")
        for block in seq.blocks:
            if pool.blocks[block.block_id] is not block:
                raise RuntimeError(f"sequence {seq_id} holds block {block.block_id}, not the pool's")
            holders[block.block_id] += 1
        if not seq.num_committed * bs <= seq.length:
            raise RuntimeError(f"sequence {seq_id}: {seq.num_committed} committed blocks exceed its length "
                               f"{seq.length}")
        hashed = seq.tip.depth
        if hashed > seq.num_committed or (hashed < seq.num_committed and seq.caching and m.enable_prefix_caching):
            raise RuntimeError(f"sequence {seq_id}: a cached chain of {hashed} blocks for {seq.num_committed} "
                               f"committed blocks")
        if not seq.caching and hashed >= seq.num_committed:
            raise RuntimeError(f"sequence {seq_id}: caching is stopped but none of its {seq.num_committed} committed "
                               f"blocks is past its cached chain (a hash collision)")
        if seq.tip is not tree.root and tree.get(seq.tip.block_hash) is not seq.tip:
            raise RuntimeError(f"sequence {seq_id}: its chain tip is not a node of the radix tree")
        node = seq.tip
        for i in range(hashed - 1, -1, -1):
            if seq.blocks[i] is not node.block:
                raise RuntimeError(f"sequence {seq_id}: block {i} (id {seq.blocks[i].block_id}) is not the block "
                                   f"of its cached chain's node")
            node = node.parent
        next_slot = seq.blocks[-1].block_id * bs + (seq.length - 1) % bs + 1 if seq.blocks else 0
        if seq.next_slot != next_slot and (seq.length % bs or seq.next_slot % bs):
            raise RuntimeError(f"sequence {seq_id}: next slot {seq.next_slot} should be {next_slot}")
        total_tokens += seq.length
        total_blocks += len(seq.blocks)
    if total_tokens != m._num_tokens:
        raise RuntimeError(f"token count {m._num_tokens} disagrees with the sum of lengths {total_tokens}")
    if total_blocks != m._num_seq_blocks:
        raise RuntimeError(f"block-table count {m._num_seq_blocks} disagrees with the tables' lengths {total_blocks}")

    pin_counts: dict[int, int] = {}
    for handle in m._pins.handles.values():
        for bid in handle.block_ids:
            holders[bid] += 1
            pin_counts[bid] = pin_counts.get(bid, 0) + 1
            if pool.blocks[bid].block_hash is None:
                raise RuntimeError(f"pinned block {bid} is not cached")
    if pin_counts != m._pins.counts:
        raise RuntimeError(f"the pin table counts {m._pins.counts} but the live pins hold {pin_counts}")

    chunk_blocks = 0
    for pages in m._chunks.pages.values():
        for bid in pages.block_ids:
            holders[bid] += 1
            if pool.blocks[bid].block_hash is not None:
                raise RuntimeError(f"block {bid} of chunk {pages.chunk_id!r} is cached in the prefix index")
        chunk_blocks += len(pages.block_ids)
    if chunk_blocks != m._chunks.num_blocks:
        raise RuntimeError(f"the chunk table counts {m._chunks.num_blocks} blocks, its chunks hold {chunk_blocks}")

    queued = pool.free_queue.get_all_free_blocks()  # raises if the links are broken
    in_queue = [False] * pool.num_blocks
    for block in queued:
        if in_queue[block.block_id]:
            raise RuntimeError(f"block {block.block_id} appears twice in the free queue")
        in_queue[block.block_id] = True

    cached_nodes = {node.block.block_id: node for node in tree.nodes()}
    used = evictable = 0
    for block in pool.blocks:
        bid, refs = block.block_id, holders[block.block_id]
        node = cached_nodes.get(bid)
        if (block.block_hash is not None) != (node is not None) or (node and node.block is not block) \
                or block.node is not node:
            raise RuntimeError(f"block {bid} has hash {block.block_hash!r} but the radix tree "
                               f"{'holds' if node else 'does not hold'} it")
        if block.ref_cnt != refs:
            raise RuntimeError(f"block {bid} has ref_cnt {block.ref_cnt} but {refs} holders hold it "
                               f"(block tables, pins, chunks)")
        if in_queue[bid]:
            if block.ref_cnt != 0 or block.block_hash is not None:
                raise RuntimeError(f"block {bid} is in the free queue with ref_cnt {block.ref_cnt} "
                                   f"and hash {block.block_hash!r}")
        elif block.ref_cnt > 0:
            used += 1
        elif block.block_hash is not None:
            evictable += 1
        else:
            raise RuntimeError(f"block {bid} has ref_cnt 0, no hash and is not in the free queue (leaked)")
    tree.check_integrity()
    if evictable != tree.num_evictable:
        raise RuntimeError(f"{evictable} cached blocks have ref_cnt 0 but the tree counts {tree.num_evictable}")
    if used + evictable + len(queued) != pool.num_blocks:
        raise RuntimeError(f"used {used} + evictable {evictable} + free {len(queued)} != total "
                           f"{pool.num_blocks} blocks")
