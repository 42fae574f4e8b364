"""KVCacheManager on tiny configs (10 blocks of 4 slots): exact block ids, slots and messages."""

from __future__ import annotations

import pytest

from kvforge.cache import (
    CacheOverflowError,
    CacheStats,
    KVCacheManager,
    NoFreeBlocksError,
    UnknownSequenceError,
)
from tests.cache.conftest import A, B, prefill


def free_ids(m: KVCacheManager) -> list[int]:
    return [b.block_id for b in m.pool.free_queue.get_all_free_blocks()]


def snapshot(m: KVCacheManager) -> tuple:
    seqs = {s: (m.length(s), m.block_table(s)) for s in range(20) if m.has_sequence(s)}
    return seqs, free_ids(m), [b.ref_cnt for b in m.pool.blocks], m.stats()


# ---- registration and lazy allocation --------------------------------------------------------

def test_a_new_sequence_has_no_blocks_until_it_appends(manager):
    manager.add_sequence(7, capacity=12)
    assert manager.has_sequence(7) and manager.num_sequences == 1
    assert (manager.length(7), manager.capacity(7), manager.remaining(7)) == (0, 12, 12)
    assert manager.block_table(7) == []
    assert manager.num_free_blocks == 10


def test_adding_a_registered_id_or_a_non_positive_capacity_raises(manager):
    manager.add_sequence(1, capacity=8)
    with pytest.raises(ValueError, match="sequence 1 is already registered"):
        manager.add_sequence(1, capacity=8)
    with pytest.raises(ValueError, match="sequence 2: capacity must be a positive number of tokens, got 0"):
        manager.add_sequence(2, capacity=0)
    assert manager.num_sequences == 1


def test_append_allocates_blocks_lazily_in_id_order_and_returns_flat_slots(manager):
    manager.add_sequence(0, capacity=40)
    assert manager.append(0, 6) == [0, 1, 2, 3, 4, 5]
    assert manager.block_table(0) == [0, 1]
    assert manager.append(0, 2) == [6, 7]  # fills block 1: no new block
    assert manager.num_free_blocks == 8
    assert manager.append(0, 1) == [8]  # position 8 opens block 2
    assert manager.block_table(0) == [0, 1, 2]
    assert (manager.length(0), manager.remaining(0)) == (9, 31)


def test_interleaved_sequences_get_interleaved_blocks(manager):
    manager.add_sequence(1, capacity=20)
    manager.add_sequence(2, capacity=20)
    assert manager.append(1, 3) == [0, 1, 2]
    assert manager.append(2, 5) == [4, 5, 6, 7, 8]
    assert manager.append(1, 3) == [3, 12, 13]  # block 0 fills, then block 3 (ids 12..15)
    assert manager.block_table(1) == [0, 3]
    assert manager.block_table(2) == [1, 2]


def test_slot_mapping_reads_back_appended_positions(manager):
    manager.add_sequence(1, capacity=20)
    manager.add_sequence(2, capacity=20)
    manager.append(1, 2)  # block 0
    manager.append(2, 4)  # block 1
    manager.append(1, 5)  # positions 2..6 of seq 1: block 0 slots 2, 3 then block 2
    assert manager.slot_mapping(1, 0, 7) == [0, 1, 2, 3, 8, 9, 10]
    assert manager.slot_mapping(1, 3, 5) == [3, 8]
    assert manager.slot_mapping(1, 4, 4) == []
    with pytest.raises(ValueError, match=r"sequence 1: positions \[5, 8\) are not within the 7 appended"):
        manager.slot_mapping(1, 5, 8)


def test_blocks_needed_and_can_append_do_not_modify_anything(make_manager):
    m = make_manager(num_blocks=3)
    m.add_sequence(0, capacity=100)
    m.append(0, 3)
    before = snapshot(m)
    assert m.blocks_needed(0, 1) == 0
    assert m.blocks_needed(0, 2) == 1
    assert m.blocks_needed(0, 9) == 2
    assert m.can_append(0, 9) and not m.can_append(0, 10)
    assert m.blocks_needed(0, 0) == 0
    assert snapshot(m) == before


# ---- errors change nothing -------------------------------------------------------------------

def test_overflow_names_sequence_position_and_capacity_and_changes_nothing(manager):
    manager.add_sequence(7, capacity=6)
    manager.append(7, 5)
    before = snapshot(manager)
    with pytest.raises(CacheOverflowError, match="sequence 7: position 6 is past its capacity of 6 tokens") as e:
        manager.append(7, 2)
    assert (e.value.seq_id, e.value.position, e.value.capacity) == (7, 6, 6)
    assert isinstance(e.value, ValueError)
    assert snapshot(manager) == before
    assert manager.append(7, 1) == [5]
    with pytest.raises(CacheOverflowError, match="position 6 is past its capacity of 6"):
        manager.append(7, 1)


def test_running_out_of_blocks_raises_and_changes_nothing(make_manager):
    m = make_manager(num_blocks=3)
    m.add_sequence(0, capacity=100)
    m.add_sequence(1, capacity=100)
    m.append(0, 6)
    m.append(1, 1)
    before = snapshot(m)
    with pytest.raises(NoFreeBlocksError, match="sequence 1: appending 5 tokens needs 1 new blocks but only 0"):
        m.append(1, 5)
    assert snapshot(m) == before
    assert m.append(1, 3) == [9, 10, 11]  # what still fits in its block


@pytest.mark.parametrize("n", [0, -2])
def test_appending_a_non_positive_count_raises(manager, n):
    manager.add_sequence(0, capacity=4)
    with pytest.raises(ValueError, match=f"num_tokens must be positive, got {n}"):
        manager.append(0, n)
    assert manager.length(0) == 0


@pytest.mark.parametrize("call", [
    lambda m: m.append(9, 1), lambda m: m.length(9), lambda m: m.capacity(9), lambda m: m.remaining(9),
    lambda m: m.block_table(9), lambda m: m.slot_mapping(9, 0, 0), lambda m: m.blocks_needed(9, 1),
    lambda m: m.can_append(9, 1),
])
def test_unknown_sequences_are_named_in_the_error(manager, call):
    with pytest.raises(UnknownSequenceError, match="unknown sequence 9"):
        call(manager)


# ---- freeing ---------------------------------------------------------------------------------

def test_free_releases_blocks_tail_first(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 10)  # blocks 0, 1, 2
    manager.append(1, 1)  # block 3
    manager.free(0)
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 2, 1, 0]
    assert not manager.has_sequence(0) and manager.num_sequences == 1
    manager.add_sequence(2, capacity=40)
    manager.append(2, 28)  # reuses the rest of the queue in order: the freed tail block 2 before 1, 0
    assert manager.block_table(2) == [4, 5, 6, 7, 8, 9, 2]


def test_double_free_and_free_of_an_unknown_id_are_no_ops(manager):
    manager.add_sequence(0, capacity=8)
    manager.append(0, 5)
    manager.free(0)
    before = snapshot(manager)
    manager.free(0)
    manager.free(12345)
    assert snapshot(manager) == before
    assert manager.num_free_blocks == 10


def test_a_freed_id_can_be_added_again(manager):
    manager.add_sequence(3, capacity=4)
    manager.append(3, 4)
    manager.free(3)
    manager.add_sequence(3, capacity=8)
    assert manager.length(3) == 0 and manager.block_table(3) == []


# ---- observability ---------------------------------------------------------------------------

def test_stats_count_blocks_tokens_bytes_and_fragmentation(make_manager):
    m = make_manager(num_blocks=10, block_size=4, bytes_per_block=1000)
    assert m.stats() == CacheStats(
        num_sequences=0, num_blocks=10, num_used_blocks=0, num_free_blocks=10, block_size=4,
        bytes_per_block=1000, total_bytes=10_000, used_bytes=0, num_tokens=0, allocated_slots=0,
        internal_fragmentation=0.0, usage=0.0,
    )
    m.add_sequence(0, capacity=40)
    m.add_sequence(1, capacity=40)
    m.append(0, 5)  # 2 blocks, 3 slots unused
    m.append(1, 2)  # 1 block, 2 slots unused
    assert m.stats() == CacheStats(
        num_sequences=2, num_blocks=10, num_used_blocks=3, num_free_blocks=7, block_size=4,
        bytes_per_block=1000, total_bytes=10_000, used_bytes=3000, num_tokens=7, allocated_slots=12,
        internal_fragmentation=5 / 12, usage=0.3,
    )
    m.free(0)
    s = m.stats()
    assert (s.num_sequences, s.num_used_blocks, s.num_tokens, s.allocated_slots) == (1, 1, 2, 4)
    assert s.internal_fragmentation == 0.5


def test_block_map_marks_used_blocks_in_lines_of_width(manager):
    manager.add_sequence(0, capacity=40)
    manager.add_sequence(1, capacity=40)
    manager.append(0, 8)  # blocks 0, 1
    manager.append(1, 4)  # block 2
    manager.append(0, 1)  # block 3
    manager.free(1)
    assert manager.block_map() == "XX.X......"
    assert manager.block_map(width=4) == "XX.X\n....\n.."
    with pytest.raises(ValueError, match="width must be positive"):
        manager.block_map(width=0)


def test_dump_stats_text(make_manager):
    m = make_manager(num_blocks=12, block_size=4, bytes_per_block=92160)
    m.add_sequence(0, capacity=40)
    m.append(0, 10)
    assert m.dump_stats() == (
        "KVCacheManager state:\n"
        "  Total blocks: 12 (block size 4, 90.0 KiB per block)\n"
        "  Used: 3 Evictable: 0 Free: 9\n"
        "  Sequences: 1, tokens: 10\n"
        "  Internal fragmentation: 0.17\n"
        "  Prefix cache: 0/0 query tokens hit (0.0%), 0 cached blocks (0 evictable), 0 evictions, 0 pinned\n"
        "  Block map (X = used, C = cached and free to evict, . = free):\n"
        "    XXX........."
    )


def test_dump_stats_without_byte_sizes_omits_them(manager):
    assert manager.dump_stats().splitlines()[1] == "  Total blocks: 10 (block size 4)"


# ---- integrity -------------------------------------------------------------------------------

def test_check_integrity_passes_on_a_consistent_cache(manager):
    manager.add_sequence(0, capacity=40)
    manager.append(0, 9)
    assert manager.check_integrity() is None


def test_check_integrity_catches_a_corrupted_ref_count(manager):
    manager.add_sequence(0, capacity=40)
    manager.append(0, 9)
    block = manager.pool.blocks[1]
    block.ref_cnt += 1
    with pytest.raises(RuntimeError, match="block 1 has ref_cnt 2 but 1 holders hold it"):
        manager.check_integrity()
    block.ref_cnt -= 1


def test_check_integrity_catches_a_leaked_block(manager):
    manager.pool.allocate(1)  # taken from the pool but held by no sequence
    with pytest.raises(RuntimeError, match="block 0 has ref_cnt 1 but 0 holders hold it"):
        manager.check_integrity()
    manager.pool.free([manager.pool.blocks[0]])


def test_check_integrity_accepts_a_block_shared_by_two_tables(manager):
    manager.add_sequence(0, capacity=8)
    manager.add_sequence(1, capacity=8)
    manager.append(0, 4)
    shared = manager._seqs[0].blocks[0]
    manager.pool.incref([shared])
    manager._seqs[1].blocks.append(shared)  # what fork will do
    manager._seqs[1].length = 4
    manager._num_tokens += 4
    manager._num_seq_blocks += 1
    manager.check_integrity()
    manager.free(0)
    assert shared.ref_cnt == 1
    manager.free(1)
    assert manager.num_free_blocks == 10


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="block_size must be positive"):
        KVCacheManager(4, 0)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        KVCacheManager(0, 4)
    with pytest.raises(ValueError, match="bytes_per_block must be >= 0"):
        KVCacheManager(4, 4, -1)
    with pytest.raises(ValueError, match=r"max_pinned_fraction must be in \[0, 1\], got 1.5"):
        KVCacheManager(4, 4, max_pinned_fraction=1.5)
    with pytest.raises(ValueError, match="max_kv_events must be >= 0"):
        KVCacheManager(4, 4, max_kv_events=-1)


def test_fork_shares_full_blocks_and_copies_the_partial_last_one(manager):
    prefill(manager, 0, A)  # 10 tokens: two full blocks of 4, two tokens in a third
    parent = manager.block_table(0)
    copy = manager.fork(0, 1)
    child = manager.block_table(1)
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert copy == (parent[2], child[2])
    assert [manager.pool.blocks[b].ref_cnt for b in parent] == [2, 2, 1]
    assert manager.length(1) == 10 and manager.capacity(1) == manager.capacity(0)
    assert manager.append(1, 1) == [child[2] * 4 + 2]  # the child writes into its own copy
    manager.free(0)
    assert [manager.pool.blocks[b].ref_cnt for b in child[:2]] == [1, 1]


def test_fork_of_a_block_aligned_sequence_copies_nothing(manager):
    prefill(manager, 0, B)  # 12 tokens: three full blocks
    assert manager.fork(0, 1) is None
    assert manager.block_table(1) == manager.block_table(0)
    assert manager.append(1, 1) != manager.append(0, 1)  # each grows into a block of its own


def test_fork_refusals_change_nothing(make_manager):
    m = make_manager(num_blocks=3)
    prefill(m, 0, A)
    before = (m.stats(), [b.ref_cnt for b in m.pool.blocks])
    with pytest.raises(NoFreeBlocksError):
        m.fork(0, 1)  # no block left for the copy
    with pytest.raises(ValueError):
        m.fork(0, 0)
    with pytest.raises(UnknownSequenceError):
        m.fork(5, 6)
    assert (m.stats(), [b.ref_cnt for b in m.pool.blocks]) == before and not m.has_sequence(1)
