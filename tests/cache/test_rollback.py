"""KVCacheManager.rollback on tiny pools (block size 4): exact block ids and free-queue order, the
commit state cut back, copy-on-write of a cached or shared partial last block, and refusals that
change nothing. Every step is integrity-checked."""

from __future__ import annotations

import pytest

from kvforge.cache import BlockRemoved, KVCacheManager, NoFreeBlocksError, UnknownSequenceError, hashing
from tests.cache.conftest import A, B, free_ids, prefill, refs


def commit_state(m: KVCacheManager, seq_id: int) -> tuple:
    """(num_committed, block ids of its cached chain, its tip's block id or None for the root)."""
    seq = m._seqs[seq_id]
    hashed, node = [], seq.tip
    while node.parent is not None:
        hashed.insert(0, node.block.block_id)
        node = node.parent
    return seq.num_committed, hashed, seq.tip.block.block_id if seq.tip.block is not None else None


def snapshot(m: KVCacheManager) -> tuple:
    """Everything a refused rollback must leave as it was."""
    seqs = {s: (m.length(s), m.block_table(s), commit_state(m, s), m._seqs[s].next_slot, m._seqs[s].caching)
            for s in m._seqs}
    nodes = sorted((n.block.block_id, n.block_hash, n.last_access) for n in m.tree.nodes())
    return seqs, free_ids(m), refs(m), nodes, m.stats()


def rollback(m: KVCacheManager, seq_id: int, num_tokens: int) -> tuple[int, int] | None:
    copy = m.rollback(seq_id, num_tokens)
    m.check_integrity()
    return copy


# ---- truncation and freeing ------------------------------------------------------------------

def test_rolling_back_within_the_last_block_frees_nothing_and_the_next_append_reuses_its_slots(manager):
    manager.add_sequence(0, capacity=40)
    assert manager.append(0, 7) == [0, 1, 2, 3, 4, 5, 6]  # blocks 0, 1
    assert rollback(manager, 0, 2) is None
    assert (manager.length(0), manager.remaining(0), manager.block_table(0)) == (5, 35, [0, 1])
    assert free_ids(manager) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert manager.slot_mapping(0, 0, 5) == [0, 1, 2, 3, 4]
    assert manager.append(0, 1) == [5]  # the decode step's fast path writes over position 5 again
    assert manager.append(0, 3) == [6, 7, 8]  # then opens block 2
    manager.check_integrity()


def test_rolling_back_zero_tokens_is_a_no_op(manager):
    prefill(manager, 0, A)
    manager.fork(0, 1)  # the last block is shared: still nothing to copy for 0 tokens
    before = snapshot(manager)
    assert rollback(manager, 0, 0) is None
    assert snapshot(manager) == before


def test_rolling_back_across_blocks_frees_exactly_the_emptied_tail_blocks_tail_first(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 14)  # blocks 0, 1, 2, 3
    manager.append(1, 1)  # block 4
    assert rollback(manager, 0, 9) is None  # length 5: blocks 2 and 3 hold no position any more
    assert manager.block_table(0) == [0, 1]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 3, 2]
    s = manager.stats()
    assert (s.num_tokens, s.num_used_blocks, s.allocated_slots) == (6, 3, 12)
    assert manager.append(0, 4) == [5, 6, 7, 20]  # fills block 1, then the head of the queue (5)


def test_rolling_back_to_a_block_boundary_leaves_the_next_position_to_a_new_block(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 6)  # blocks 0, 1
    manager.append(1, 3)  # block 2
    assert rollback(manager, 0, 2) is None  # length 4: block 1 is emptied
    assert manager.block_table(0) == [0] and free_ids(manager) == [3, 4, 5, 6, 7, 8, 9, 1]
    assert manager.append_decode([0, 1]) == [12, 11]  # sequence 0 opens block 3; 1 fills block 2
    assert manager.block_table(0) == [0, 3]
    manager.check_integrity()


def test_append_decode_after_a_rollback_writes_where_the_rollback_left_off(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 11)  # blocks 0, 1, 2
    manager.append(1, 2)  # block 3
    assert rollback(manager, 0, 4) is None  # length 7
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 2]
    assert manager.append_decode([1, 0]) == [14, 7]
    assert manager.append_decode([1, 0]) == [15, 16]  # 0 opens block 4, the head of the queue
    assert manager.block_table(0) == [0, 1, 4] and manager.length(0) == 9
    manager.check_integrity()


def test_rolling_back_everything_leaves_an_empty_registered_sequence(manager):
    prefill(manager, 0, A)  # blocks 0, 1 committed and cached, block 2 partial
    assert rollback(manager, 0, 10) is None
    assert manager.has_sequence(0) and manager.length(0) == 0 and manager.block_table(0) == []
    assert commit_state(manager, 0) == (0, [], None)
    assert free_ids(manager) == [3, 4, 5, 6, 7, 8, 9, 2]
    assert manager.block_map() == "CC........"  # the cached blocks stay, evictable
    assert manager.match_prefix(A).block_ids == (0, 1)
    assert manager.append(0, 3) == [12, 13, 14]
    manager.check_integrity()


# ---- commit state ----------------------------------------------------------------------------

def test_rolling_back_into_committed_blocks_cuts_the_commit_state_and_keeps_the_blocks_cached(manager):
    prefill(manager, 0, B)  # blocks 0, 1, 2: three committed full blocks
    hit = manager.stats()
    assert commit_state(manager, 0) == (3, [0, 1, 2], 2)
    assert rollback(manager, 0, 8) is None  # length 4: blocks 1 and 2 are let go, still cached
    assert manager.block_table(0) == [0]
    assert commit_state(manager, 0) == (1, [0], 0)
    assert manager.block_map() == "XCC......." and free_ids(manager) == [3, 4, 5, 6, 7, 8, 9]
    assert refs(manager)[:3] == [1, 0, 0]
    assert manager.match_prefix(B + [0]).block_ids == (0, 1, 2)
    s = manager.stats()
    assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (hit.prefix_query_tokens, hit.prefix_hit_tokens)
    assert (s.num_cached_blocks, s.num_evictable_blocks) == (3, 2)


def test_recommitting_the_same_tokens_after_a_rollback_finds_the_cached_twins(manager):
    prefill(manager, 0, B)
    rollback(manager, 0, 8)
    manager.take_events()
    assert manager.append(0, 8) == [12, 13, 14, 15, 16, 17, 18, 19]  # new blocks 3, 4
    manager.commit(0, B)  # blocks 1 and 2 are twins: the sequence switches back, 3 and 4 are freed
    manager.check_integrity()
    assert manager.block_table(0) == [0, 1, 2]
    assert commit_state(manager, 0) == (3, [0, 1, 2], 2)
    assert len(manager.tree) == 3 and manager.take_events() == []  # no duplicate entry, nothing stored
    assert refs(manager)[:5] == [1, 1, 1, 0, 0]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 3, 4]


def test_committing_other_tokens_after_a_rollback_chains_new_nodes_below_the_kept_block(manager):
    prefill(manager, 0, B)
    rollback(manager, 0, 8)
    other = B[:4] + [7] * 8
    manager.append(0, 8)  # blocks 3, 4
    manager.commit(0, other)
    manager.check_integrity()
    assert manager.block_table(0) == [0, 3, 4]
    assert commit_state(manager, 0) == (3, [0, 3, 4], 4)
    assert manager.tree.get(manager.pool.blocks[3].block_hash).parent is manager.tree.get(
        manager.pool.blocks[0].block_hash)
    assert len(manager.tree) == 5
    assert manager.match_prefix(other + [0]).block_ids == (0, 3, 4)
    assert manager.match_prefix(B + [0]).block_ids == (0, 1, 2)  # the old branch is still there


def test_rolling_back_past_a_hash_collision_resumes_caching(manager, monkeypatch):
    real = hashing.hash_block
    # A's second block collides with its first (same hash, other parent and tokens): caching stops there.
    monkeypatch.setattr(hashing, "hash_block", lambda parent, token_ids, extra=b"": real(None, A[:4], extra)
                        if tuple(token_ids) == tuple(A[4:8]) else real(parent, token_ids, extra))
    prefill(manager, 0, A)
    assert commit_state(manager, 0) == (2, [0], 0) and not manager._seqs[0].caching
    assert rollback(manager, 0, 2) is None  # length 8: block 1 stays committed past the collision
    assert commit_state(manager, 0) == (2, [0], 0) and not manager._seqs[0].caching
    assert rollback(manager, 0, 3) is None  # length 5: the block past the collision is uncommitted
    assert commit_state(manager, 0) == (1, [0], 0) and manager._seqs[0].caching
    manager.append(0, 3)
    manager.commit(0, A[:5] + [7, 7, 7])  # block 1 now holds other tokens and is cached
    manager.check_integrity()
    assert commit_state(manager, 0) == (2, [0, 1], 1)
    assert manager.match_prefix(A[:5] + [7, 7, 7, 0]).block_ids == (0, 1)


# ---- copy-on-write ---------------------------------------------------------------------------

def test_a_cached_partial_last_block_is_copied_and_stays_cached(manager):
    prefill(manager, 0, B)  # blocks 0, 1, 2, all cached
    h2 = manager.pool.blocks[2].block_hash
    assert rollback(manager, 0, 2) == (2, 3)  # length 10: block 2 is cached, so it is not written again
    assert manager.block_table(0) == [0, 1, 3]
    assert commit_state(manager, 0) == (2, [0, 1], 1)
    assert manager.pool.blocks[2].block_hash == h2 and refs(manager)[:4] == [1, 1, 0, 1]
    assert manager.block_map() == "XXCX......" and free_ids(manager) == [4, 5, 6, 7, 8, 9]
    assert manager.match_prefix(B + [0]).block_ids == (0, 1, 2)
    assert manager.slot_mapping(0, 8, 10) == [12, 13]
    assert manager.append(0, 1) == [14]  # the copy's next slot
    assert manager.append_decode([0]) == [15]
    manager.check_integrity()


def test_a_partial_last_block_shared_by_a_fork_is_copied_and_the_other_holder_keeps_it(manager):
    prefill(manager, 0, A, commit=False)  # blocks 0, 1, 2, nothing cached
    assert manager.fork(0, 1) == (2, 3)  # the child shares 0 and 1, copies 2 into 3
    assert rollback(manager, 1, 3) == (1, 4)  # length 7: block 1 is shared; 3 is let go first
    assert manager.block_table(1) == [0, 4] and manager.block_table(0) == [0, 1, 2]
    assert refs(manager)[:5] == [2, 1, 1, 0, 1]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 3]
    assert manager.append(1, 1) == [19]
    assert manager.append(0, 1) == [10]  # the parent still writes into its own block 2
    manager.check_integrity()


def test_a_cached_partial_last_block_shared_by_a_prefix_hit_is_copied_and_keeps_its_hash(manager):
    prefill(manager, 0, A)  # blocks 0, 1 cached, 2 partial
    prefill(manager, 1, A[:8] + [5, 5])  # hits blocks 0, 1; block 3 of its own
    h1 = manager.pool.blocks[1].block_hash
    assert rollback(manager, 1, 4) == (1, 4)  # length 6
    assert manager.block_table(1) == [0, 4] and commit_state(manager, 1) == (1, [0], 0)
    assert manager.pool.blocks[1].block_hash == h1 and refs(manager)[:5] == [2, 1, 1, 0, 1]
    assert free_ids(manager) == [5, 6, 7, 8, 9, 3]
    assert commit_state(manager, 0) == (2, [0, 1], 1)  # the other holder is untouched


def test_the_copy_may_take_the_block_the_rollback_just_let_go(make_manager):
    m = make_manager(num_blocks=3)
    prefill(m, 0, B)  # blocks 0, 1, 2, all cached: nothing free
    m.take_events()
    h2 = m.pool.blocks[2].block_hash
    assert rollback(m, 0, 5) == (1, 2)  # block 2 becomes evictable, is evicted and is the copy of block 1
    assert m.block_table(0) == [0, 2] and m.pool.blocks[2].block_hash is None
    assert m.take_events() == [BlockRemoved((h2,))]
    assert m.block_map() == "XCX" and m.stats().num_evictions == 1
    assert m.match_prefix(B + [0]).block_ids == (0, 1)


def test_an_uncached_unshared_partial_last_block_is_written_over_in_place(manager):
    prefill(manager, 0, A, commit=False)
    manager.fork(0, 1)  # shares blocks 0 and 1; block 2 is the parent's alone
    assert rollback(manager, 0, 1) is None
    assert manager.block_table(0) == [0, 1, 2] and manager.append(0, 1) == [9]


# ---- refusals change nothing -----------------------------------------------------------------

@pytest.mark.parametrize("n", [-1, 11])
def test_a_count_outside_zero_to_length_is_refused_and_changes_nothing(manager, n):
    prefill(manager, 0, A)
    before = snapshot(manager)
    with pytest.raises(ValueError, match=rf"sequence 0: cannot roll back {n} tokens: num_tokens must be in "
                                         r"\[0, 10\] \(its length\)"):
        manager.rollback(0, n)
    assert snapshot(manager) == before


def test_rolling_back_an_unknown_sequence_is_refused(manager):
    prefill(manager, 0, A)
    before = snapshot(manager)
    with pytest.raises(UnknownSequenceError, match="unknown sequence 9"):
        manager.rollback(9, 0)
    assert snapshot(manager) == before


def test_no_block_for_the_copy_is_refused_and_changes_nothing(make_manager):
    m = make_manager(num_blocks=3)
    prefill(m, 0, B)  # all 3 blocks cached and held
    before = snapshot(m)
    with pytest.raises(NoFreeBlocksError, match="rolling back sequence 0 to 11 tokens needs a block for its "
                                                "cached or shared partial last block but only 0 are free or "
                                                "evictable"):
        m.rollback(0, 1)
    assert snapshot(m) == before
    m.check_integrity()
    assert m.rollback(0, 4) is None  # to a block boundary: nothing to copy
    assert m.block_table(0) == [0, 1]


def test_a_fork_rolled_back_to_a_shared_block_needs_the_free_block_its_own_copy_leaves(make_manager):
    m = make_manager(num_blocks=4)
    prefill(m, 0, A, commit=False)  # blocks 0, 1, 2
    assert m.fork(0, 1) == (2, 3)  # nothing free now
    assert rollback(m, 1, 3) == (1, 3)  # its copy 3 goes back to the queue and is taken for block 1
    assert m.block_table(1) == [0, 3] and refs(m) == [2, 1, 1, 1]

