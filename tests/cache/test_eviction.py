"""Eviction of cached blocks on tiny pools: exact LRU-leaf order, running out, and pins that survive
pressure within their budget."""

from __future__ import annotations

import pytest

from kvforge.cache import (
    BlockRemoved,
    NoFreeBlocksError,
    PinHandle,
    hash_block,
)
from tests.cache.conftest import A, B, free_ids, prefill, refs


# ---- eviction --------------------------------------------------------------------------------

def test_eviction_takes_the_lru_leaf_then_its_parent(make_manager):
    m = make_manager(num_blocks=6)
    a, b = A[:8], B[:8]
    prefill(m, 0, a + [0])  # blocks 0, 1 cached, 2 partial
    prefill(m, 1, b + [0])  # blocks 3, 4 cached, 5 partial
    m.free(0)  # a's chain is older than b's
    m.free(1)
    assert m.block_map() == "CC.CC." and free_ids(m) == [2, 5]
    m.take_events()
    m.add_sequence(2, 40)
    m.append(2, 16)  # 4 blocks: the 2 free ones, then a's leaf (1), then its parent (0)
    assert m.block_table(2) == [2, 5, 1, 0]
    h0 = hash_block(None, a[:4])
    assert m.take_events() == [BlockRemoved((hash_block(h0, a[4:]), h0))]
    assert h0 not in [n.block_hash for n in m.tree.nodes()]
    m.append(2, 1)  # b's leaf next
    assert m.block_table(2)[-1] == 4
    assert m.match_prefix(b + [0]).block_ids == (3,)
    assert m.stats().num_evictions == 3


def test_a_recently_matched_prefix_outlives_older_chains(make_manager):
    m = make_manager(num_blocks=6)
    prefill(m, 0, A[:8] + [0])  # 0, 1 cached
    prefill(m, 1, B[:8] + [0])  # 3, 4 cached
    m.free(0)
    m.free(1)
    prefill(m, 2, A[:4] + [9, 9, 9, 9])  # hits block 0 (touched now) and caches block 2 below it
    m.free(2)
    assert m.block_map() == "CCCCC." and free_ids(m) == [5]
    m.add_sequence(3, 40)
    m.append(3, 24)  # 6 blocks: the free 5, a's old leaf 1, b's chain 4 then 3, then 2 and its parent 0
    assert m.block_table(3) == [5, 1, 4, 3, 2, 0]


def test_running_out_counts_evictable_blocks_and_changes_nothing(make_manager):
    m = make_manager(num_blocks=3)
    prefill(m, 0, A[:9])
    m.free(0)
    m.add_sequence(1, 40)
    assert m.can_append(1, 12) and not m.can_append(1, 13)
    before = (free_ids(m), refs(m), m.block_map())
    with pytest.raises(NoFreeBlocksError, match=r"needs 4 new blocks but only 3 are free or evictable "
                                                r"\(1 free, 2 cached\)"):
        m.append(1, 13)
    assert (free_ids(m), refs(m), m.block_map()) == before


# ---- pins ------------------------------------------------------------------------------------

def test_a_pinned_prefix_survives_pressure_and_unpinned_blocks_go_first(manager):
    prefill(manager, 0, A)  # 0, 1 cached
    manager.free(0)
    handle = manager.pin(manager.match_prefix(A[:9]))
    assert handle == PinHandle(1, (0, 1), 8)
    assert manager.stats().num_pinned_blocks == 2 and manager.pins() == [handle]
    prefill(manager, 1, B + [0])  # blocks 3, 4, 5 cached, 2 partial... order from the free queue
    manager.free(1)
    manager.add_sequence(2, 40)
    manager.append(2, 32)  # 8 blocks: every block but the pinned two
    assert sorted(manager.block_table(2)) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert manager.stats().num_cached_blocks == 2 and not manager.can_append(2, 1)
    manager.free(2)
    assert prefill(manager, 3, A).num_tokens == 8
    manager.free(3)
    manager.unpin(handle)
    manager.unpin(handle)  # a second unpin is a no-op
    assert manager.stats().num_pinned_blocks == 0 and refs(manager) == [0] * 10


def test_pins_over_the_budget_are_refused_naming_the_budget(make_manager):
    m = make_manager(max_pinned_fraction=0.25)  # int(0.25 * 10) = 2 blocks
    prefill(m, 0, B + [0])
    assert m.pin_budget == 2
    with pytest.raises(ValueError, match=r"pinning 3 blocks \(3 not pinned yet\) would exceed the pin budget of 2 "
                                         r"blocks \(max_pinned_fraction 0.25 of 10\); 0 blocks are pinned already"):
        m.pin(m.match_prefix(B + [0]))
    two = m.pin(m.match_prefix(B[:9]))
    again = m.pin(m.match_prefix(B[:9]))  # the same blocks: no new budget
    assert m.stats().num_pinned_blocks == 2 and m.pool.blocks[0].ref_cnt == 3
    with pytest.raises(ValueError, match="2 blocks are pinned already"):
        m.pin(m.match_prefix(B + [0]))
    m.unpin(two)
    assert m.stats().num_pinned_blocks == 2  # `again` still holds them
    m.unpin(again)
    assert m.stats().num_pinned_blocks == 0


def test_an_empty_prefix_cannot_be_pinned(manager):
    with pytest.raises(ValueError, match="cannot pin an empty prefix: it fills no block"):
        manager.pin(manager.match_prefix([1, 2, 3]))


def test_a_foreign_or_forged_handle_unpins_nothing(manager):
    prefill(manager, 0, A)
    handle = manager.pin(manager.match_prefix(A))
    manager.unpin(PinHandle(handle.pin_id, (5,), 4))
    manager.unpin(PinHandle(99, (0, 1), 8))
    assert manager.stats().num_pinned_blocks == 2
    manager.unpin(handle)
