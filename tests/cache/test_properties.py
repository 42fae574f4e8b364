"""Random add / append / free sequences keep every invariant (hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvforge.cache import CacheOverflowError, KVCacheManager, NoFreeBlocksError, UnknownSequenceError

NUM_BLOCKS, BLOCK_SIZE = 12, 4
SEQ_IDS = st.integers(min_value=0, max_value=7)


class ManagerMachine(RuleBasedStateMachine):
    """The model: seq_id -> [length, capacity]; plus the slots each sequence has been handed."""

    def __init__(self):
        super().__init__()
        self.m = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, bytes_per_block=64)
        self.model: dict[int, list[int]] = {}
        self.slots: dict[int, list[int]] = {}

    def blocks_for(self, length: int) -> int:
        return -(-length // BLOCK_SIZE)

    @property
    def used_blocks(self) -> int:
        return sum(self.blocks_for(length) for length, _ in self.model.values())

    @rule(seq_id=SEQ_IDS, capacity=st.integers(min_value=1, max_value=40))
    def add(self, seq_id, capacity):
        if seq_id in self.model:
            try:
                self.m.add_sequence(seq_id, capacity)
            except ValueError:
                return
            raise AssertionError("re-adding a registered sequence must raise")
        self.m.add_sequence(seq_id, capacity)
        self.model[seq_id] = [0, capacity]
        self.slots[seq_id] = []

    @rule(seq_id=SEQ_IDS, n=st.integers(min_value=1, max_value=12))
    def append(self, seq_id, n):
        if seq_id not in self.model:
            try:
                self.m.append(seq_id, n)
            except UnknownSequenceError:
                return
            raise AssertionError("appending to an unknown sequence must raise")
        length, capacity = self.model[seq_id]
        need = self.blocks_for(length + n) - self.blocks_for(length)
        expect_ok = self.m.can_append(seq_id, n) and length + n <= capacity
        assert self.m.blocks_needed(seq_id, n) == need
        free_before = self.m.num_free_blocks
        try:
            slots = self.m.append(seq_id, n)
        except CacheOverflowError as e:
            assert length + n > capacity and e.position == capacity and e.seq_id == seq_id
            assert self.m.num_free_blocks == free_before
            return
        except NoFreeBlocksError:
            assert need > free_before
            assert self.m.num_free_blocks == free_before
            return
        assert expect_ok
        assert len(slots) == n
        assert self.m.num_free_blocks == free_before - need
        self.model[seq_id][0] += n
        self.slots[seq_id].extend(slots)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free_one(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.model)))
        table = self.m.block_table(seq_id)
        self.m.free(seq_id)
        del self.model[seq_id], self.slots[seq_id]
        free = [b.block_id for b in self.m.pool.free_queue.get_all_free_blocks()]
        assert free[len(free) - len(table):] == table[::-1]  # returned to the tail, last block first

    @rule(seq_id=SEQ_IDS)
    def free_again(self, seq_id):
        if seq_id not in self.model:
            before = self.m.stats()
            self.m.free(seq_id)
            assert self.m.stats() == before

    @invariant()
    def integrity(self):
        self.m.check_integrity()

    @invariant()
    def matches_the_model(self):
        m = self.m
        assert m.num_sequences == len(self.model)
        assert m.num_free_blocks == NUM_BLOCKS - self.used_blocks
        stats = m.stats()
        assert stats.num_tokens == sum(length for length, _ in self.model.values())
        assert stats.num_used_blocks == self.used_blocks
        for seq_id, (length, capacity) in self.model.items():
            assert (m.length(seq_id), m.capacity(seq_id), m.remaining(seq_id)) == (length, capacity,
                                                                                 capacity - length)
            assert len(m.block_table(seq_id)) == self.blocks_for(length)
            assert m.slot_mapping(seq_id, 0, length) == self.slots[seq_id]

    @invariant()
    def slots_are_unique_and_inside_own_blocks(self):
        seen = set()
        for seq_id, slots in self.slots.items():
            table = self.m.block_table(seq_id)
            for pos, slot in enumerate(slots):
                assert slot // BLOCK_SIZE == table[pos // BLOCK_SIZE] and slot % BLOCK_SIZE == pos % BLOCK_SIZE
            assert not seen & set(slots)
            seen |= set(slots)


ManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestManagerMachine = ManagerMachine.TestCase
