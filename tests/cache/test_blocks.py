"""Block, FreeBlockQueue and BlockPool: queue order, O(1) removal, ref counts, failed calls change nothing."""

from __future__ import annotations

import pytest

from kvforge.cache import Block, BlockPool, FreeBlockQueue, NoFreeBlocksError


def ids(blocks: list[Block]) -> list[int]:
    return [b.block_id for b in blocks]


def queue_of(n: int) -> tuple[list[Block], FreeBlockQueue]:
    blocks = [Block(i) for i in range(n)]
    return blocks, FreeBlockQueue(blocks)


# ---- FreeBlockQueue --------------------------------------------------------------------------

def test_queue_holds_blocks_in_the_order_given():
    _, queue = queue_of(5)
    assert len(queue) == 5
    assert ids(queue.get_all_free_blocks()) == [0, 1, 2, 3, 4]


def test_popleft_takes_the_head_and_append_puts_at_the_tail():
    blocks, queue = queue_of(3)
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    assert ids(queue.get_all_free_blocks()) == [1, 2, 0]
    assert ids(queue.popleft_n(2)) == [1, 2]
    assert ids(queue.get_all_free_blocks()) == [0]


def test_popped_blocks_are_unlinked():
    blocks, queue = queue_of(3)
    popped = queue.popleft_n(2) + [queue.popleft()]
    assert all(b.prev_free is None and b.next_free is None for b in popped)
    assert len(queue) == 0 and queue.get_all_free_blocks() == []


def test_popleft_on_an_empty_queue_raises():
    _, queue = queue_of(0)
    with pytest.raises(NoFreeBlocksError, match="empty"):
        queue.popleft()


def test_popleft_n_past_the_length_raises_and_changes_nothing():
    _, queue = queue_of(3)
    with pytest.raises(NoFreeBlocksError, match="cannot pop 4 blocks: the free queue holds 3"):
        queue.popleft_n(4)
    assert ids(queue.get_all_free_blocks()) == [0, 1, 2]
    assert queue.popleft_n(0) == []


def test_remove_from_the_middle_links_the_neighbours():
    blocks, queue = queue_of(5)
    queue.remove(blocks[2])
    assert ids(queue.get_all_free_blocks()) == [0, 1, 3, 4]
    assert blocks[1].next_free is blocks[3] and blocks[3].prev_free is blocks[1]
    queue.remove(blocks[0])
    queue.remove(blocks[4])
    assert ids(queue.get_all_free_blocks()) == [1, 3]
    assert len(queue) == 2


def test_remove_then_append_moves_a_block_to_the_tail():
    blocks, queue = queue_of(4)
    queue.remove(blocks[1])
    queue.append(blocks[1])
    assert ids(queue.get_all_free_blocks()) == [0, 2, 3, 1]


def test_removing_half_a_large_queue_from_the_middle_keeps_it_linked():
    # remove() relinks the two neighbours only (no scan): a large queue stays cheap to edit.
    blocks, queue = queue_of(100_000)
    for block in blocks[25_000:75_000]:
        queue.remove(block)
    assert len(queue) == 50_000
    assert ids(queue.get_all_free_blocks()[24_999:25_001]) == [24_999, 75_000]


def test_appending_a_queued_block_or_removing_an_unqueued_one_raises():
    blocks, queue = queue_of(2)
    with pytest.raises(ValueError, match="block 1 is already in the free queue"):
        queue.append(blocks[1])
    popped = queue.popleft()
    with pytest.raises(ValueError, match="block 0 is not in the free queue"):
        queue.remove(popped)
    assert ids(queue.get_all_free_blocks()) == [1]


def test_append_n_keeps_the_given_order():
    blocks, queue = queue_of(4)
    taken = queue.popleft_n(4)
    queue.append_n(reversed(taken))
    assert ids(queue.get_all_free_blocks()) == [3, 2, 1, 0]


# ---- BlockPool -------------------------------------------------------------------------------

def test_pool_starts_with_every_block_free_in_id_order():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert ids(pool.blocks) == [0, 1, 2, 3]
    assert ids(pool.free_queue.get_all_free_blocks()) == [0, 1, 2, 3]
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)


def test_allocate_takes_from_the_head_with_ref_count_one():
    pool = BlockPool(4)
    got = pool.allocate(3)
    assert ids(got) == [0, 1, 2]
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 0]
    assert pool.num_free_blocks == 1


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError, match="requested 3 blocks but only 2 are free"):
        pool.allocate(3)
    assert pool.num_free_blocks == 2
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 0, 0]
    assert ids(pool.free_queue.get_all_free_blocks()) == [2, 3]


def test_free_returns_blocks_to_the_tail_in_the_order_given():
    pool = BlockPool(5)
    a = pool.allocate(3)
    pool.free(a[::-1])  # tail first
    assert ids(pool.free_queue.get_all_free_blocks()) == [3, 4, 2, 1, 0]
    assert ids(pool.allocate(3)) == [3, 4, 2]  # the tail block of the freed sequence is reused first


def test_a_shared_block_is_freed_only_when_its_last_reference_drops():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.incref([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free([block])
    assert block.ref_cnt == 0 and ids(pool.free_queue.get_all_free_blocks()) == [1, 2, 0]


def test_incref_on_a_free_block_takes_it_out_of_the_queue():
    pool = BlockPool(4)
    pool.incref([pool.blocks[2]])
    assert pool.blocks[2].ref_cnt == 1
    assert ids(pool.free_queue.get_all_free_blocks()) == [0, 1, 3]


def test_freeing_a_free_block_raises_and_changes_nothing():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError, match="block 2 is already free"):
        pool.free([a, pool.blocks[2]])
    assert a.ref_cnt == 1 and b.ref_cnt == 1
    assert ids(pool.free_queue.get_all_free_blocks()) == [2]


def test_allocate_clears_a_hash_left_on_a_freed_block():
    pool = BlockPool(1)
    (block,) = pool.allocate(1)
    block.block_hash = b"cached"
    pool.free([block])
    assert block.block_hash == b"cached"  # kept while free: lazy eviction
    assert pool.allocate(1)[0].block_hash is None


@pytest.mark.parametrize("n", [0, -1])
def test_pool_needs_a_positive_size(n):
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        BlockPool(n)
