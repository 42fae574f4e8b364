"""KV events and reset_prefix_cache: the exact event sequence, the bounded buffer, and reset refused
while blocks are in use."""

from __future__ import annotations

import pytest

from kvforge.cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    hash_block,
)
from tests.cache.conftest import A, B, free_ids, prefill


# ---- reset and events ------------------------------------------------------------------------

def test_reset_is_refused_while_blocks_are_in_use_then_clears_everything(manager):
    prefill(manager, 0, A)
    handle = manager.pin(manager.match_prefix(A))
    with pytest.raises(ValueError, match=r"reset_prefix_cache\(\) refused while 3 blocks are in use "
                                         r"\(1 sequences, 1 pins\)"):
        manager.reset_prefix_cache()
    manager.free(0)
    with pytest.raises(ValueError, match="refused while 2 blocks are in use"):
        manager.reset_prefix_cache()
    manager.unpin(handle)
    manager.take_events()
    manager.reset_prefix_cache()
    assert manager.take_events() == [AllBlocksCleared()]
    assert sorted(free_ids(manager)) == list(range(10)) and manager.block_map() == ".........."
    s = manager.stats()
    assert (s.num_cached_blocks, s.num_evictable_blocks, s.num_free_blocks) == (0, 0, 10)
    assert manager.match_prefix(A).num_tokens == 0


def test_events_report_stores_evictions_and_clears_in_order(make_manager):
    m = make_manager(num_blocks=4)
    h0 = hash_block(None, A[:4])
    h1 = hash_block(h0, A[4:8])
    m.add_sequence(0, 40)
    m.append(0, 9)
    m.commit(0, A[:9])
    m.append(0, 3)
    m.commit(0, A[:9] + [1, 2, 3])
    h2 = hash_block(h1, [A[8], 1, 2, 3])
    m.free(0)
    m.add_sequence(1, 40)
    m.append(1, 8)  # the free block 3, then leaf 2
    assert m.take_events() == [
        BlockStored((h0, h1), None, tuple(A[:8]), 4),
        BlockStored((h2,), h1, (A[8], 1, 2, 3), 4),
        BlockRemoved((h2,)),
    ]
    assert m.take_events() == []
    m.free(1)
    m.reset_prefix_cache()
    assert m.take_events() == [AllBlocksCleared()]


def test_the_event_buffer_keeps_the_newest_and_counts_what_it_dropped(make_manager):
    m = make_manager(max_kv_events=2)
    for i, seq in enumerate((A, B, A[:4] * 3)):
        prefill(m, i, seq)
    events = m.take_events()
    assert [len(e.block_hashes) for e in events] == [3, 2]  # B's three blocks, then the two A[:4]*3 adds
    assert m.num_dropped_events == 1
    quiet = make_manager(max_kv_events=0)
    prefill(quiet, 0, A)
    assert quiet.take_events() == [] and quiet.num_dropped_events == 0
