"""Automatic prefix caching in KVCacheManager on tiny pools (block size 4): exact hits and block ids,
admission, salts, collisions, the disabled mode, integrity, and the batched decode step."""

from __future__ import annotations

import numpy as np
import pytest

from kvforge.cache import (
    NoFreeBlocksError,
    PrefixMatch,
    extra_keys,
    hash_block,
)
from kvforge.cache import hashing, radix
from tests.cache.conftest import A, B, free_ids, prefill, refs


# ---- sharing and hits ------------------------------------------------------------------------

def test_two_sequences_sharing_a_two_block_prefix_share_its_blocks(manager):
    assert prefill(manager, 0, A) == PrefixMatch((), (), 0, 10)  # nothing cached yet
    assert manager.block_table(0) == [0, 1, 2]
    match = prefill(manager, 1, A[:8] + [50, 51])
    assert match.block_ids == (0, 1) and match.num_tokens == 8 and match.num_query_tokens == 10
    assert match.block_hashes == (hash_block(None, A[:4]), hash_block(hash_block(None, A[:4]), A[4:8]))
    assert manager.block_table(1) == [0, 1, 3]
    assert manager.length(1) == 10
    assert refs(manager)[:4] == [2, 2, 1, 1]
    s = manager.stats()
    assert (s.prefix_query_tokens, s.prefix_hit_tokens, s.num_cached_blocks, s.num_used_blocks) == (20, 8, 2, 4)
    assert s.prefix_hit_rate == 0.4


def test_freed_blocks_stay_cached_and_a_later_sequence_hits_them(manager):
    prefill(manager, 0, A)
    prefill(manager, 1, A[:8] + [50, 51])
    manager.free(0)
    manager.free(1)
    assert manager.block_map() == "CC........"
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 2, 3]  # tail first; the cached blocks are not queued
    s = manager.stats()
    assert (s.num_used_blocks, s.num_evictable_blocks, s.num_free_blocks, s.num_cached_blocks) == (0, 2, 8, 2)
    assert manager.num_available_blocks == 10
    match = prefill(manager, 2, A[:8] + [60])
    assert (match.block_ids, match.num_tokens) == ((0, 1), 8)
    assert manager.block_table(2) == [0, 1, 4]
    assert manager.stats().prefix_hit_tokens == 16
    assert manager.stats().num_evictable_blocks == 0  # revived


def test_the_last_token_is_never_matched(manager):
    prefill(manager, 0, A)
    assert manager.match_prefix(A[:8]).num_tokens == 4  # exactly two blocks: the second holds the last token
    assert manager.match_prefix(A[:9]).num_tokens == 8
    assert manager.match_prefix(A[:4]).num_tokens == 0
    assert manager.match_prefix([]).num_tokens == 0


def test_a_token_array_matches_like_its_list(manager):
    prefill(manager, 0, A)
    for query in (A, A[:9], A[:8] + [1, 2], [7] + A):
        assert manager.match_prefix(np.array(query)) == manager.match_prefix(query)
        assert manager.match_prefix(np.array(query, dtype=np.int32)) == manager.match_prefix(query)
    with pytest.raises(ValueError, match="not an integer in"):
        manager.match_prefix(A + [1 << 32])


def test_token_array_is_uint32_and_refuses_ids_outside_32_bits():
    tokens = radix.token_array(A)
    assert tokens.dtype == np.uint32 and tokens.tolist() == A
    assert np.shares_memory(radix.token_array(tokens), tokens)  # a uint32 array is taken as it is
    assert radix.token_array(np.array(A, dtype=np.int64)).tolist() == A
    for bad in ([1, -1], [1, 1 << 32], [1, 2.5], np.array([1, -1])):
        with pytest.raises(ValueError, match="not an integer in"):
            radix.token_array(bad)


def test_matches_along_one_path_and_across_branches_give_each_prompts_own_blocks(manager):
    prefill(manager, 0, B + [1])  # blocks 0, 1, 2 cached
    prefill(manager, 1, A[:4] + [5, 6, 7, 8, 9])  # blocks 4, 5 cached
    prefill(manager, 2, A[:4] + [1, 2, 3, 4, 9])  # block 4 shared, then a branch: block 7
    long = manager.match_prefix(B + [2])
    assert long.block_ids == (0, 1, 2) and long.num_tokens == 12
    short = manager.match_prefix(B[:8] + [9])  # the start of the path matched just before
    assert (short.block_ids, short.block_hashes) == (long.block_ids[:2], long.block_hashes[:2])
    for _ in range(2):  # alternating branches below a shared block
        assert manager.match_prefix(A[:4] + [5, 6, 7, 8, 0]).block_ids == (4, 5)
        assert manager.match_prefix(A[:4] + [1, 2, 3, 4, 0]).block_ids == (4, 7)
    assert manager.match_prefix(A[:4] + [5, 6, 7, 0, 0]).block_ids == (4,)


def test_a_match_after_an_eviction_finds_the_blocks_cached_since(make_manager):
    m = make_manager(num_blocks=4)
    prefill(m, 0, A)
    m.free(0)
    assert m.match_prefix(A).block_ids == (0, 1)
    prefill(m, 1, B + [1])  # evicts A's blocks 1 then 0
    m.free(1)
    assert m.match_prefix(A).block_ids == ()
    prefill(m, 2, A)
    assert m.match_prefix(A).block_ids == tuple(m.block_table(2)[:2])
    m.free(2)


def test_match_prefix_changes_nothing(manager):
    prefill(manager, 0, A)
    manager.free(0)
    before = (manager.stats(), free_ids(manager), refs(manager), manager.block_map())
    clock = manager.tree._clock
    manager.match_prefix(A)
    assert (manager.stats(), free_ids(manager), refs(manager), manager.block_map()) == before
    assert manager.tree._clock == clock  # no access time moved


def test_a_partial_block_is_never_cached_and_commit_is_incremental(manager):
    manager.add_sequence(0, capacity=40)
    manager.append(0, 6)
    manager.commit(0, A[:3])  # no full block yet
    assert manager.stats().num_cached_blocks == 0
    manager.commit(0, A[:6])
    assert manager.stats().num_cached_blocks == 1
    manager.append(0, 2)
    manager.commit(0, A[:8])
    assert manager.stats().num_cached_blocks == 2
    manager.commit(0, A[:8])  # again: nothing new
    assert manager.stats().num_cached_blocks == 2
    assert [e.block_hashes for e in manager.take_events()] == [
        (hash_block(None, A[:4]),), (hash_block(hash_block(None, A[:4]), A[4:8]),)]


def test_commit_refuses_more_tokens_than_appended(manager):
    manager.add_sequence(0, capacity=40)
    manager.append(0, 3)
    with pytest.raises(ValueError, match="sequence 0: cannot commit 4 tokens, only 3 are appended"):
        manager.commit(0, A[:4])
    assert manager.stats().num_cached_blocks == 0


def test_a_preempted_sequence_resumes_from_its_own_cached_blocks(manager):
    prefill(manager, 0, A)
    manager.free(0)  # preempted: everything is given back
    match = prefill(manager, 0, A)
    assert match.block_ids == (0, 1) and manager.block_table(0) == [0, 1, 3]


def test_a_readmission_with_count_stats_false_reuses_the_prefix_but_leaves_hit_statistics_unchanged(manager):
    prefill(manager, 0, A)
    s = manager.stats()
    assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (10, 0)  # the first admission counts
    manager.free(0)  # preempted
    match = manager.match_prefix(A)
    manager.add_sequence(0, 40, prefix=match, count_stats=False)  # re-admitted
    manager.append(0, len(A) - match.num_tokens)
    assert match.num_tokens == 8 and manager.block_table(0) == [0, 1, 3]  # the prefix is still reused
    s = manager.stats()
    assert (s.prefix_query_tokens, s.prefix_hit_tokens, s.prefix_hit_rate) == (10, 0, 0.0)
    manager.add_sequence(1, 40, prefix=manager.match_prefix(A))  # a new request: counted by default
    s = manager.stats()
    assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (20, 8)


def test_the_same_block_computed_twice_is_kept_once_and_later_blocks_chain_below_it(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 9)  # blocks 0, 1, 2
    manager.append(1, 9)  # blocks 3, 4, 5: both prefilled A[:9] before either committed
    manager.commit(0, A[:9])
    manager.commit(1, A[:9])  # twins of blocks 0 and 1: sequence 1 switches to them, 3 and 4 are freed
    assert manager.block_table(1) == [0, 1, 5]
    assert manager.block_map() == "XXX..X...."
    assert manager.stats().num_cached_blocks == 2
    assert refs(manager)[:6] == [2, 2, 1, 0, 0, 1]
    assert free_ids(manager) == [6, 7, 8, 9, 3, 4]
    manager.append(1, 3)
    manager.commit(1, A[:9] + [7, 7, 7])  # block 5 chains below block 1
    assert manager.match_prefix(A[:9] + [7, 7, 7, 8]).block_ids == (0, 1, 5)
    manager.free(0)
    assert refs(manager)[:2] == [1, 1]  # still held by sequence 1
    manager.free(1)
    assert manager.block_map() == "CC...C...."
    assert free_ids(manager) == [6, 7, 8, 9, 3, 4, 2]


def test_commit_reads_the_first_num_tokens_and_says_whether_a_twin_changed_the_block_table(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 9)  # blocks 0, 1, 2
    manager.append(1, 9)  # blocks 3, 4, 5
    tokens = A[:9] + [7, 7, 7]  # longer than what is appended: only the count is read
    assert manager.commit(0, tokens, 9) is False  # new blocks: the table stands
    assert manager.commit(0, tokens, 9) is False  # nothing newly full
    with pytest.raises(ValueError, match="only 4 are given"):
        manager.commit(1, tokens[:4], 5)
    assert manager.commit(1, tokens, 5) is True  # block 3 is a twin of block 0
    assert manager.block_table(1) == [0, 4, 5]
    assert manager.commit(1, tokens, 9) is True  # and block 4 of block 1
    assert manager.block_table(1) == [0, 1, 5]
    manager.check_integrity()
    manager.check_integrity()


def test_a_fork_sharing_a_block_whose_twin_is_cached_stops_caching_rather_than_leave_the_fork_off_its_path(
        manager):
    # Found by tests/cache/test_properties.py: sequence 2, a fork of 1, shares blocks 4 and 5, and block
    # 4's content is cached as block 0. Swapping 2's block 4 for its twin and caching block 5 below
    # block 0 would leave sequence 1 holding block 5 under a parent it does not hold.
    manager.add_sequence(0, capacity=40)
    manager.append(0, 4)
    manager.commit(0, A[:4])
    manager.add_sequence(1, capacity=40)  # the same first block, computed again (admitted before the commit)
    manager.append(1, 8)
    manager.fork(1, 2)
    manager.free(0)
    assert manager.commit(2, A[:4] + [9, 9, 9, 9]) is False  # no twin taken: the block is shared
    assert manager.block_table(1) == manager.block_table(2) == [1, 2]
    manager.check_integrity()
    manager.free(2)
    manager.check_integrity()
    assert manager.commit(1, A[:4] + [9, 9, 9, 9]) is True  # unshared now: the twin is taken
    assert manager.block_table(1) == [0, 2]
    manager.free(1)
    manager.check_integrity()


def test_fragmentation_counts_a_shared_block_once(manager):
    prefill(manager, 0, A)  # blocks 0, 1, 2: 2 slots unwritten in block 2
    prefill(manager, 1, A[:8] + [1])  # shares 0, 1; block 3 holds 1 token: 3 slots unwritten
    s = manager.stats()
    assert (s.num_used_blocks, s.allocated_slots, s.num_tokens) == (4, 16, 19)
    assert s.internal_fragmentation == 5 / 16


# ---- admission -------------------------------------------------------------------------------

def test_can_admit_does_not_count_matched_ref0_blocks_as_room_for_new_ones(make_manager):
    m = make_manager(num_blocks=4)
    prefill(m, 0, A[:9])  # blocks 0, 1 cached, 2 partial
    m.free(0)
    match = m.match_prefix(A[:8] + list(range(9)))  # 17 tokens: 2 blocks matched, 9 new tokens
    assert match.block_ids == (0, 1) and m.num_available_blocks == 4
    assert not m.can_admit(match, 9)  # 3 new blocks, but only 2 are left once 0 and 1 are revived
    assert m.can_admit(match, 8)
    m.add_sequence(1, 40, match)
    m.append(1, 8)
    assert m.block_table(1) == [0, 1, 3, 2]
    assert not m.can_append(1, 1)


def test_a_stale_match_is_refused_by_add_sequence_and_pin_and_not_admitted(make_manager):
    m = make_manager(num_blocks=3)
    prefill(m, 0, A[:9])
    m.free(0)
    match = m.match_prefix(A[:9])
    m.add_sequence(1, 40)
    m.append(1, 12)  # evicts blocks 1 then 0
    assert m.block_table(1) == [2, 1, 0]
    with pytest.raises(ValueError, match="sequence 2: the prefix match is stale: block 0 no longer caches"):
        m.add_sequence(2, 40, match)
    with pytest.raises(ValueError, match="pin: the prefix match is stale"):
        m.pin(match)
    assert not m.can_admit(match, 1)
    assert not m.has_sequence(2)


def test_add_sequence_refuses_a_prefix_matched_under_other_extra_keys(manager):
    salt = extra_keys("m", "f32", "tenant-a")
    prefill(manager, 0, A, extra=salt)
    match = manager.match_prefix(A, salt)
    with pytest.raises(ValueError, match="matched under other extra keys"):
        manager.add_sequence(1, 40, match)  # extra defaults to b""
    with pytest.raises(ValueError, match="the prefix of 8 tokens exceeds its capacity of 6 tokens"):
        manager.add_sequence(1, 6, match, salt)
    assert refs(manager)[:2] == [1, 1] and not manager.has_sequence(1)


# ---- isolation and collisions ----------------------------------------------------------------

def test_different_salts_never_share_blocks(manager):
    a, b = extra_keys("model", "f32", "tenant-a"), extra_keys("model", "f32", "tenant-b")
    prefill(manager, 0, A, extra=a)
    assert manager.match_prefix(A, b).num_tokens == 0
    assert manager.match_prefix(A).num_tokens == 0
    assert manager.match_prefix(A, a).num_tokens == 8
    prefill(manager, 1, A, extra=b)  # computes its own blocks
    assert manager.block_table(1) == [3, 4, 5]
    assert manager.stats().num_cached_blocks == 4


def test_a_forced_hash_collision_is_caught_by_the_token_check(manager, monkeypatch):
    monkeypatch.setattr(hashing, "hash_block", lambda parent, token_ids, extra=b"": b"\x01" * 32)
    prefill(manager, 0, A)  # block 0 is cached; block 1 collides with it and stays uncached
    assert manager.stats().num_cached_blocks == 1
    assert manager.match_prefix(B).num_tokens == 0  # same hash, other tokens: a miss, not block 0
    assert manager.match_prefix(A).block_ids == (0,)
    prefill(manager, 1, B)  # B's first block collides too: nothing wrong is cached or served
    assert manager.block_table(1) == [3, 4, 5] and manager.stats().num_cached_blocks == 1
    assert manager.match_prefix(B).num_tokens == 0
    salted = extra_keys("tenant")
    assert manager.match_prefix(A, salted).num_tokens == 0  # same hash and tokens, other extra keys


def test_a_prefix_key_collision_falls_back_to_the_hashed_walk(monkeypatch, manager):
    # monkeypatch first: it is undone after the manager's integrity check at teardown
    monkeypatch.setattr(radix, "prefix_keys",  # a prefix key is its depth only: every path collides
                        lambda blocks, first_depth, base: list(range(first_depth + 1, first_depth + 1 + len(blocks))))
    prefill(manager, 0, A)
    prefill(manager, 1, B)  # B's prefix keys equal A's: its nodes are cached but not indexed by key
    assert manager.match_prefix(B).block_ids == tuple(manager.block_table(1)[:2])
    assert manager.match_prefix(A).block_ids == (0, 1)
    assert manager.match_prefix(A[:4] + B).block_ids == (0,)
    assert manager.match_prefix(A[:4] + B, extra_keys("tenant")).num_tokens == 0


# ---- disabled --------------------------------------------------------------------------------

def run_script(m) -> tuple:
    """A fixed workload touching every growth path; returns everything observable."""
    out = []
    for seq_id, tokens in enumerate((A, A, B, A[:8] + B)):
        prefill(m, seq_id, tokens)
        out.append(m.block_table(seq_id))
    m.free(1)
    m.free(0)
    prefill(m, 4, A)
    out.append(m.block_table(4))
    m.append(4, 5)
    s = m.stats()
    return out, free_ids(m), m.block_map(), (s.num_used_blocks, s.num_free_blocks, s.internal_fragmentation)


def test_disabled_prefix_caching_behaves_like_a_plain_pager(make_manager):
    off = make_manager(num_blocks=16, enable_prefix_caching=False)
    tables, queue, block_map, usage = run_script(off)
    assert tables == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13], [14, 15, 5]]
    assert queue == [3, 2, 1, 0]  # sequences 1 then 0 freed tail first, after 14, 15, 5 were reused
    assert block_map == "....XXXXXXXXXXXX" and usage == (12, 4, 1 / 48)
    assert off.stats().num_cached_blocks == off.stats().prefix_query_tokens == 0
    assert off.take_events() == []
    with pytest.raises(ValueError, match="prefix caching is disabled"):
        off.pin(PrefixMatch((0,), (b"x" * 32,), 4, 5))
    assert off.dump_stats().splitlines()[5] == "  Prefix cache: disabled"
    on = make_manager(num_blocks=16)
    assert run_script(on)[0] == [[0, 1, 2], [0, 1, 3], [4, 5, 6], [0, 1, 7, 8, 9], [0, 1, 10]]


def test_dump_stats_shows_prefix_reuse_and_cached_blocks(make_manager):
    m = make_manager(num_blocks=12)
    prefill(m, 0, A)
    prefill(m, 1, A)
    m.free(0)
    assert m.dump_stats() == (
        "KVCacheManager state:\n"
        "  Total blocks: 12 (block size 4)\n"
        "  Used: 3 Evictable: 0 Free: 9\n"
        "  Sequences: 1, tokens: 10\n"
        "  Internal fragmentation: 0.17\n"
        "  Prefix cache: 8/20 query tokens hit (40.0%), 2 cached blocks (0 evictable), 0 evictions, 0 pinned\n"
        "  Block map (X = used, C = cached and free to evict, . = free):\n"
        "    XX.X........"
    )
    m.free(1)
    assert m.block_map() == "CC.........."


# ---- integrity -------------------------------------------------------------------------------

def test_check_integrity_catches_a_wrong_evictable_count(manager):
    prefill(manager, 0, A)
    manager.free(0)
    manager.tree.num_evictable += 1
    with pytest.raises(RuntimeError, match="the radix tree counts 3 evictable blocks but 2 cached blocks have ref_cnt 0"):
        manager.check_integrity()
    manager.tree.num_evictable -= 1


def test_check_integrity_catches_a_cached_block_that_lost_its_hash(manager):
    prefill(manager, 0, A)
    manager.free(0)
    block = manager.pool.blocks[1]
    saved, block.block_hash = block.block_hash, None
    with pytest.raises(RuntimeError, match="block 1 has hash None but the radix tree holds it"):
        manager.check_integrity()
    block.block_hash = saved


def test_check_integrity_catches_an_in_use_block_under_an_evictable_parent(manager):
    prefill(manager, 0, A)
    manager.free(0)
    child = manager.pool.blocks[1]
    child.ref_cnt += 1  # as if something held block 1 without its parent block 0
    manager.tree.num_evictable -= 1
    with pytest.raises(RuntimeError, match="block 1 has ref_cnt 1 but 0 holders hold it"):
        manager.check_integrity()
    with pytest.raises(RuntimeError, match="block 1 is in use but its parent block 0 has ref_cnt 0"):
        manager.tree.check_integrity()
    child.ref_cnt -= 1
    manager.tree.num_evictable += 1


# ---- the decode step in one call -------------------------------------------------------------

def test_append_decode_matches_per_sequence_appends(make_manager):
    one, many = make_manager(num_blocks=12), make_manager(num_blocks=12)
    for m in (one, many):
        for seq_id, n in ((0, 4), (1, 3), (2, 8)):
            m.add_sequence(seq_id, 40)
            m.append(seq_id, n)
    expected = [one.append(s, 1)[0] for s in (2, 0, 1)]
    assert many.append_decode([2, 0, 1]) == expected == [16, 20, 7]  # new blocks 4, 5; block 1's last slot
    assert [many.block_table(s) for s in range(3)] == [one.block_table(s) for s in range(3)]
    assert many.stats() == one.stats()


def test_append_decode_checks_everything_before_changing_anything(make_manager):
    m = make_manager(num_blocks=2)
    m.add_sequence(0, 40)
    m.add_sequence(1, 4)
    m.append(0, 4)
    m.append(1, 4)
    before = (m.stats(), m.block_table(0), m.block_table(1))
    with pytest.raises(ValueError, match="past its capacity"):
        m.append_decode([0, 1])
    m.add_sequence(2, 40)
    with pytest.raises(ValueError, match="unknown sequence 7"):
        m.append_decode([0, 7])
    with pytest.raises(ValueError, match="a sequence id is repeated"):
        m.append_decode([0, 0])
    with pytest.raises(NoFreeBlocksError, match="needs 2 new blocks but only 0 are free or evictable"):
        m.append_decode([0, 2])
    assert (m.stats().num_tokens, m.block_table(0), m.block_table(1)) == (before[0].num_tokens, *before[1:])
