"""Chunk pages on a bare KVCacheManager: allocation, budget, users, and immunity to prefix-cache eviction."""

from __future__ import annotations

import pytest

from kvforge.cache import NoFreeBlocksError
from tests.cache.conftest import A, B, free_ids, prefill, refs


def _state(m):
    return free_ids(m), refs(m), m.block_map(), m.stats()


def test_a_chunk_takes_whole_blocks_written_from_position_zero(make_manager):
    m = make_manager(num_blocks=10, block_size=4, max_chunk_fraction=0.5)
    pages = m.allocate_chunk("doc", 10)
    assert pages.chunk_id == "doc" and pages.num_tokens == 10 and len(pages.block_ids) == 3
    assert m.chunk_pages("doc") == pages
    bs = m.block_size
    want = [b * bs + i for b in pages.block_ids for i in range(bs)][:10]
    assert m.chunk_slot_mapping("doc", 0, 10) == want
    assert m.chunk_slot_mapping("doc", 3, 6) == want[3:6]
    for bid in pages.block_ids:
        block = m.pool.blocks[bid]
        assert block.ref_cnt == 1 and block.block_hash is None
    s = m.stats()
    assert (s.num_chunks, s.num_chunk_blocks, s.num_used_blocks, s.num_sequences) == (1, 3, 3, 0)
    assert m.num_available_blocks == 7
    m.check_integrity()


def test_freeing_a_chunk_gives_every_block_back(make_manager):
    m = make_manager(num_blocks=10, max_chunk_fraction=0.5)
    before = _state(m)
    pages = m.allocate_chunk("doc", 9)
    m.check_integrity()
    m.free_chunk("doc")
    m.check_integrity()
    assert sorted(free_ids(m)) == list(range(10))
    assert refs(m) == before[1] and m.stats().num_chunks == 0 and m.stats().num_chunk_blocks == 0
    with pytest.raises(ValueError, match="unknown chunk id 'doc'"):
        m.chunk_pages("doc")
    # The id may be used again, for other content.
    assert len(m.allocate_chunk("doc", 1).block_ids) == 1
    assert pages.num_tokens == 9


def test_chunks_never_exceed_their_budget_and_a_refusal_changes_nothing(make_manager):
    m = make_manager(num_blocks=10, block_size=4, max_chunk_fraction=0.3)
    assert m.chunk_budget == 3
    m.allocate_chunk("a", 8)  # 2 blocks
    before = _state(m)
    with pytest.raises(ValueError, match=r"needs 2 blocks but the chunk budget is 3 blocks.*2 are taken"):
        m.allocate_chunk("b", 5)
    assert _state(m) == before
    m.allocate_chunk("b", 4)  # exactly fills the budget
    with pytest.raises(ValueError, match="chunk budget"):
        m.allocate_chunk("c", 1)
    m.check_integrity()
    m.free_chunk("a")
    m.allocate_chunk("c", 8)
    assert m.stats().num_chunk_blocks == 3
    m.check_integrity()


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_a_chunk_fraction_outside_zero_to_one_is_refused(make_manager, fraction):
    with pytest.raises(ValueError, match="max_chunk_fraction must be in"):
        make_manager(max_chunk_fraction=fraction)


def test_a_zero_chunk_fraction_admits_no_chunk(make_manager):
    m = make_manager(max_chunk_fraction=0.0)
    assert m.chunk_budget == 0
    with pytest.raises(ValueError, match="chunk budget is 0 blocks"):
        m.allocate_chunk("a", 1)


@pytest.mark.parametrize("chunk_id, num_tokens, message", [
    ("", 4, "a chunk id is a non-empty string"),
    (7, 4, "a chunk id is a non-empty string"),
    ("empty", 0, "is empty"),
    ("negative", -3, "is empty"),
])
def test_bad_ids_and_empty_chunks_are_refused_and_change_nothing(make_manager, chunk_id, num_tokens, message):
    m = make_manager()
    before = _state(m)
    with pytest.raises(ValueError, match=message):
        m.allocate_chunk(chunk_id, num_tokens)
    assert _state(m) == before


def test_a_registered_id_cannot_be_allocated_again(make_manager):
    m = make_manager(max_chunk_fraction=0.5)
    m.allocate_chunk("a", 4)
    before = _state(m)
    with pytest.raises(ValueError, match="already registered"):
        m.allocate_chunk("a", 4)
    assert _state(m) == before


def test_slots_outside_the_chunk_and_unknown_ids_are_refused(make_manager):
    m = make_manager(max_chunk_fraction=0.5)
    m.allocate_chunk("a", 6)
    with pytest.raises(ValueError, match=r"positions \[4, 7\) are not within its 6 tokens"):
        m.chunk_slot_mapping("a", 4, 7)
    with pytest.raises(ValueError, match="not within"):
        m.chunk_slot_mapping("a", 3, 2)
    with pytest.raises(ValueError, match="unknown chunk id 'b'; registered chunks: a"):
        m.chunk_slot_mapping("b", 0, 1)
    with pytest.raises(ValueError, match="unknown chunk id"):
        m.free_chunk("b")


def test_a_chunk_in_use_cannot_be_freed_until_every_user_releases_it(make_manager):
    m = make_manager(max_chunk_fraction=0.5)
    m.allocate_chunk("a", 4)
    m.allocate_chunk("b", 4)
    m.acquire_chunks(["a", "b"])
    m.acquire_chunks(["a"])
    before = _state(m)
    with pytest.raises(ValueError, match=r"chunk 'a' is in use by 2 request"):
        m.free_chunk("a")
    assert _state(m) == before
    m.release_chunks(["a"])
    with pytest.raises(ValueError, match="in use by 1 request"):
        m.free_chunk("a")
    m.release_chunks(["a", "b"])
    m.free_chunk("a")
    m.free_chunk("b")
    assert m.stats().num_chunks == 0 and m.stats().num_used_blocks == 0
    m.check_integrity()


def test_acquiring_an_unknown_chunk_counts_no_user_of_the_others(make_manager):
    m = make_manager(max_chunk_fraction=0.5)
    m.allocate_chunk("a", 4)
    with pytest.raises(ValueError, match="unknown chunk id 'nope'"):
        m.acquire_chunks(["a", "nope"])
    m.free_chunk("a")  # not in use: the failed acquire counted nothing


def test_releasing_more_often_than_acquired_is_a_bug(make_manager):
    m = make_manager(max_chunk_fraction=0.5)
    m.allocate_chunk("a", 4)
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        m.release_chunks(["a"])


def test_chunk_pages_are_never_evicted_under_prefix_cache_pressure(make_manager):
    m = make_manager(num_blocks=8, block_size=4, max_chunk_fraction=0.25)
    pages = m.allocate_chunk("doc", 7)  # 2 blocks; 6 left for sequences
    m.check_integrity()
    for seq_id in range(12):
        tokens = [1000 * seq_id + t for t in range(13)]  # 3 full blocks cached, 1 partial
        prefill(m, seq_id, tokens)
        m.check_integrity()
        m.free(seq_id)
        m.check_integrity()
        for bid in pages.block_ids:
            assert m.pool.blocks[bid].ref_cnt == 1 and m.pool.blocks[bid].block_hash is None
        assert not set(pages.block_ids) & set(free_ids(m))
    assert m.stats().num_evictions > 0
    assert m.chunk_pages("doc") == pages and m.stats().num_chunk_blocks == 2
    # A sequence may take every block but the chunk's, never theirs.
    m.add_sequence(99, 40)
    assert m.can_append(99, 24) and not m.can_append(99, 25)
    table_slots = m.append(99, 24)
    assert not {s // 4 for s in table_slots} & set(pages.block_ids)
    with pytest.raises(NoFreeBlocksError):
        m.append(99, 1)
    m.check_integrity()


def test_allocating_a_chunk_evicts_cached_blocks_but_never_running_ones(make_manager):
    m = make_manager(num_blocks=6, block_size=4, max_chunk_fraction=1.0)
    prefill(m, 0, A[:8] + [0])  # blocks 0, 1 cached, 2 partial
    m.free(0)
    prefill(m, 1, B[:12], commit=False)  # 3 blocks held by a running sequence
    assert m.num_free_blocks == 1 and m.num_available_blocks == 3
    pages = m.allocate_chunk("doc", 12)  # needs 3: the free one and both cached ones
    assert m.stats().num_evictions == 2 and m.stats().num_cached_blocks == 0
    assert not set(pages.block_ids) & set(m.block_table(1))
    m.check_integrity()
    before = _state(m)
    with pytest.raises(NoFreeBlocksError):
        m.allocate_chunk("more", 1)
    assert _state(m) == before


def test_reset_prefix_cache_keeps_chunk_pages(make_manager):
    m = make_manager(num_blocks=10, block_size=4, max_chunk_fraction=0.5)
    pages = m.allocate_chunk("doc", 8)
    prefill(m, 0, A)
    m.free(0)
    assert m.stats().num_cached_blocks == 2
    m.reset_prefix_cache()  # chunk pages do not count as blocks in use
    m.check_integrity()
    s = m.stats()
    assert s.num_cached_blocks == 0 and s.num_used_blocks == 2 and s.num_chunk_blocks == 2
    assert m.chunk_pages("doc") == pages
    assert all(m.pool.blocks[b].ref_cnt == 1 for b in pages.block_ids)
    # A running sequence still blocks the reset, chunks or not.
    prefill(m, 1, B)
    with pytest.raises(ValueError, match="in use"):
        m.reset_prefix_cache()
    m.free(1)
    m.reset_prefix_cache()


def test_stats_and_dump_show_chunks_only_when_there_are_some(make_manager):
    m = make_manager(num_blocks=10, block_size=4, max_chunk_fraction=0.5)
    assert "Chunks:" not in m.dump_stats()
    m.allocate_chunk("a", 5)
    m.allocate_chunk("b", 3)
    s = m.stats()
    assert (s.num_chunks, s.num_chunk_blocks, s.num_used_blocks) == (2, 3, 3)
    assert "  Chunks: 2 in 3 blocks" in m.dump_stats().splitlines()
    assert m.block_map() == "XXX......."
    m.free_chunk("a")
    assert "  Chunks: 1 in 1 blocks" in m.dump_stats().splitlines()
    m.free_chunk("b")
    assert "Chunks:" not in m.dump_stats()
