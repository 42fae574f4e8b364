"""Random add / match / append / commit / decode / fork / rollback / free / pin / reset sequences
keep every invariant (hypothesis state machines), with prefixes shared between sequences, salts, and
evictions.

The oracle for "a hit never serves wrong KV": an arena that records, for every slot a sequence
writes, what its KV would depend on (the extra keys and every token up to that position). A
sequence must read back its own history from every slot of its block table, matched blocks
included, and every cached block must hold the content its chain claims. A second machine runs
the same rules under a 3-valued hash, so collisions are everywhere; three more keep a real arena
in a quantized KV format (int8, int4, fp8) beside the oracle.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvforge import ops
from kvforge.cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheOverflowError,
    KVCache,
    KVCacheManager,
    NoFreeBlocksError,
    UnknownSequenceError,
    extra_keys,
    hashing,
)

NUM_BLOCKS, BLOCK_SIZE = 12, 4
KV_HEADS, HEAD_DIM = 2, 8  # of the quantized arenas
SEQ_IDS = st.integers(min_value=0, max_value=7)
# Prompts share prefixes: P1 starts with P0's first two blocks; P2 shares nothing.
PREFIXES = [list(range(1, 17)), list(range(1, 9)) + list(range(30, 38)), list(range(40, 56))]
SALTS = [b"", extra_keys("model", "f32", "tenant-a")]
PROMPTS = st.builds(lambda base, cut, tail: (PREFIXES[base][:cut] + tail) or [0],
                    st.integers(0, 2), st.integers(0, 16), st.lists(st.integers(0, 1), max_size=5))


class ManagerMachine(RuleBasedStateMachine):
    """The model: each sequence's tokens (its length), capacity, extra keys and slots; the arena
    oracle slot -> (extra, tokens up to the position written there); the live pins; and a mirror of
    the cached hashes rebuilt from KV events only, as a router would."""

    def __init__(self):
        super().__init__()
        self.m = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, bytes_per_block=64)
        self.tokens: dict[int, list[int]] = {}
        self.capacity: dict[int, int] = {}
        self.extra: dict[int, bytes] = {}
        self.slots: dict[int, list[int]] = {}
        self.arena: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self.pins = []
        self.mirror: set[bytes] = set()
        self.queried = self.hit = 0

    def blocks_for(self, length: int) -> int:
        return -(-length // BLOCK_SIZE)

    def write(self, seq_id: int, slots: list[int]) -> None:
        """Record what the engine would store in the slots of the last len(slots) positions."""
        tokens, extra = self.tokens[seq_id], self.extra[seq_id]
        first = len(tokens) - len(slots)
        for i, slot in enumerate(slots):
            self.arena[slot] = (extra, tuple(tokens[:first + i + 1]))
        self.slots[seq_id].extend(slots)

    def free_ids(self) -> list[int]:
        return [block.block_id for block in self.m.pool.free_queue.get_all_free_blocks()]

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """What the engine copies for a fork or a rollback's copy-on-write: the first `num_tokens`
        slots of block `src` into `dst`."""
        for o in range(num_tokens):
            self.arena[dst * BLOCK_SIZE + o] = self.arena[src * BLOCK_SIZE + o]

    def commit_tokens(self, seq_id: int, tokens: list[int]) -> None:
        """Commit, then check that a block table changes only where a committed block of the
        sequence's own was already cached (its twin takes its place and the copy is freed)."""
        m = self.m
        before, cached = m.block_table(seq_id), {node.block.block_id for node in m.tree.nodes()}
        m.commit(seq_id, tokens)
        for i, (old, new) in enumerate(zip(before, m.block_table(seq_id))):
            if old != new:
                assert i < len(tokens) // BLOCK_SIZE and new in cached and old not in cached
                # Freed, unless a fork of this sequence still holds it.
                holders = sum(m.block_table(other).count(old) for other in self.tokens if other != seq_id)
                assert m.pool.blocks[old].ref_cnt == holders
                self.slots[seq_id][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = range(new * BLOCK_SIZE,
                                                                                (new + 1) * BLOCK_SIZE)

    # ---- rules ------------------------------------------------------------------------------

    @initialize(salt=st.integers(0, 1))
    def warm_cache(self, salt):
        """Start with cached, evictable chains (as after two finished requests), so that hits and
        evictions happen early in every run."""
        for seq_id, prompt in ((0, PREFIXES[0] + [0]), (1, PREFIXES[2][:12] + [1])):
            self.add(seq_id, prompt, salt, room=0, commit=True)
            self.m.free(seq_id)
            for d in (self.tokens, self.capacity, self.extra, self.slots):
                del d[seq_id]

    @rule(seq_id=SEQ_IDS, prompt=PROMPTS, salt=st.integers(0, 1), room=st.integers(0, 12), commit=st.booleans())
    def add(self, seq_id, prompt, salt, room, commit):
        m, extra = self.m, SALTS[salt]
        if seq_id in self.tokens:
            try:
                m.add_sequence(seq_id, 40)
            except ValueError:
                return
            raise AssertionError("re-adding a registered sequence must raise")
        match = m.match_prefix(prompt, extra)
        n = len(prompt)
        assert match.num_query_tokens == n and match.num_tokens == len(match.block_ids) * BLOCK_SIZE
        assert match.num_tokens <= (n - 1) // BLOCK_SIZE * BLOCK_SIZE  # never the last token
        for pos in range(match.num_tokens):  # a hit serves exactly this prompt's KV
            slot = match.block_ids[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            assert self.arena[slot] == (extra, tuple(prompt[:pos + 1]))
        new = n - match.num_tokens
        revived = sum(1 for bid in match.block_ids if m.pool.blocks[bid].ref_cnt == 0)
        need = self.blocks_for(n) - len(match.block_ids)
        admit = m.can_admit(match, new)
        assert admit == (need <= m.num_available_blocks - revived)
        if not admit:
            return
        m.add_sequence(seq_id, n + room, match, extra)
        self.queried += n
        self.hit += match.num_tokens
        self.tokens[seq_id], self.capacity[seq_id], self.extra[seq_id] = list(prompt), n + room, extra
        self.slots[seq_id] = [bid * BLOCK_SIZE + o for bid in match.block_ids for o in range(BLOCK_SIZE)]
        if new:
            self.write(seq_id, m.append(seq_id, new))
        if commit:  # as the engine does once the prefill has run
            self.commit_tokens(seq_id, prompt)

    @rule(seq_id=SEQ_IDS, tail=st.lists(st.integers(0, 1), min_size=1, max_size=9))
    def append(self, seq_id, tail):
        m, n = self.m, len(tail)
        if seq_id not in self.tokens:
            try:
                m.append(seq_id, n)
            except UnknownSequenceError:
                return
            raise AssertionError("appending to an unknown sequence must raise")
        length, capacity = len(self.tokens[seq_id]), self.capacity[seq_id]
        need = self.blocks_for(length + n) - self.blocks_for(length)
        assert m.blocks_needed(seq_id, n) == need
        expect_ok = m.can_append(seq_id, n) and length + n <= capacity
        available = m.num_available_blocks
        try:
            slots = m.append(seq_id, n)
        except CacheOverflowError as e:
            assert length + n > capacity and e.position == capacity and e.seq_id == seq_id
            assert m.num_available_blocks == available
            return
        except NoFreeBlocksError:
            assert need > available and m.num_available_blocks == available
            return
        assert expect_ok and len(slots) == n
        assert m.num_available_blocks == available - need
        self.tokens[seq_id].extend(tail)
        self.write(seq_id, slots)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def commit(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[seq_id]
        k = data.draw(st.integers(0, len(tokens)))
        self.commit_tokens(seq_id, tokens[:k])

    @precondition(lambda self: self.tokens)
    @rule(token=st.integers(0, 1))
    def decode_all(self, token):
        m, ids = self.m, sorted(self.tokens)
        need = sum(1 for s in ids if len(self.tokens[s]) % BLOCK_SIZE == 0)
        full = [s for s in ids if len(self.tokens[s]) >= self.capacity[s]]
        available = m.num_available_blocks
        try:
            slots = m.append_decode(ids)
        except CacheOverflowError:
            assert full and m.num_available_blocks == available
            return
        except NoFreeBlocksError:
            assert not full and need > available and m.num_available_blocks == available
            return
        assert not full and need <= available
        for seq_id, slot in zip(ids, slots):
            self.tokens[seq_id].append(token)
            self.write(seq_id, [slot])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free_one(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        m = self.m
        table = m.block_table(seq_id)
        # Blocks only this sequence holds and that are not cached go back to the queue, tail first.
        released = [b for b in table[::-1] if m.pool.blocks[b].ref_cnt == 1 and m.pool.blocks[b].block_hash is None]
        m.free(seq_id)
        for d in (self.tokens, self.capacity, self.extra, self.slots):
            del d[seq_id]
        free = [b.block_id for b in m.pool.free_queue.get_all_free_blocks()]
        assert free[len(free) - len(released):] == released

    @rule(parent=SEQ_IDS, child=SEQ_IDS)
    def fork(self, parent, child):
        m = self.m
        if parent not in self.tokens or child in self.tokens:
            before = m.stats()
            with pytest.raises(ValueError):  # UnknownSequenceError is one
                m.fork(parent, child)
            assert m.stats() == before
            return
        length, available = len(self.tokens[parent]), m.num_available_blocks
        partial = length % BLOCK_SIZE != 0
        try:
            copy = m.fork(parent, child)
        except NoFreeBlocksError:
            assert partial and available == 0 and m.num_available_blocks == 0
            return
        assert (copy is not None) == partial
        slots = list(self.slots[parent])
        if copy is not None:  # what the engine copies in the arena
            src, dst = copy
            assert m.num_available_blocks == available - 1
            self.copy_block(src, dst, length % BLOCK_SIZE)
            slots = [dst * BLOCK_SIZE + s % BLOCK_SIZE if s // BLOCK_SIZE == src else s for s in slots]
        self.tokens[child], self.slots[child] = list(self.tokens[parent]), slots
        self.capacity[child], self.extra[child] = self.capacity[parent], self.extra[parent]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def rollback(self, data):
        m, unknown = self.m, min(set(range(9)) - self.tokens.keys())
        before = m.stats()
        with pytest.raises(UnknownSequenceError):
            m.rollback(unknown, 0)
        assert m.stats() == before
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens, table = self.tokens[seq_id], m.block_table(seq_id)
        length, available, queue, before = len(tokens), m.num_available_blocks, self.free_ids(), m.stats()
        n = data.draw(st.integers(-1, length + 1))
        if not 0 <= n <= length:
            with pytest.raises(ValueError, match="cannot roll back"):
                m.rollback(seq_id, n)
            assert m.stats() == before and m.block_table(seq_id) == table and self.free_ids() == queue
            return
        new, blocks = length - n, m.pool.blocks
        keep = self.blocks_for(new)
        last = blocks[table[keep - 1]] if n and new % BLOCK_SIZE else None
        copies = last is not None and (last.block_hash is not None or last.ref_cnt > 1)
        last_refs = last.ref_cnt if last is not None else 0
        # Emptied blocks only this sequence holds become available; uncached ones join the queue, tail first.
        emptied = [blocks[bid] for bid in table[keep:][::-1]]
        freed = sum(1 for block in emptied if block.ref_cnt == 1)
        queued = queue + [block.block_id for block in emptied if block.ref_cnt == 1 and block.block_hash is None]
        try:
            copy = m.rollback(seq_id, n)
        except NoFreeBlocksError:
            assert copies and available + freed == 0
            assert m.stats() == before and m.block_table(seq_id) == table and self.free_ids() == queue
            return
        assert (copy is not None) == copies
        slots = self.slots[seq_id][:new]
        if copy is None:
            assert m.block_table(seq_id) == table[:keep] and self.free_ids() == queued
            assert m.num_available_blocks == available + freed
        else:  # the new block is the head of the queue (or an evicted one); the copy is the engine's
            src, dst = copy
            assert src == table[keep - 1] and m.block_table(seq_id) == table[:keep - 1] + [dst]
            assert self.free_ids() == queued[1:] and (not queued or dst == queued[0])
            assert m.num_available_blocks == available + freed - 1 + (last_refs == 1)
            self.copy_block(src, dst, new % BLOCK_SIZE)
            slots = [dst * BLOCK_SIZE + s % BLOCK_SIZE if s // BLOCK_SIZE == src else s for s in slots]
        self.tokens[seq_id], self.slots[seq_id] = tokens[:new], slots

    @rule(seq_id=SEQ_IDS)
    def free_again(self, seq_id):
        if seq_id not in self.tokens:
            before = self.m.stats()
            self.m.free(seq_id)
            assert self.m.stats() == before

    @rule(prompt=PROMPTS, salt=st.integers(0, 1))
    def pin(self, prompt, salt):
        m = self.m
        match = m.match_prefix(prompt, SALTS[salt])
        pinned = {bid for handle in self.pins for bid in handle.block_ids}
        try:
            handle = m.pin(match)
        except ValueError as e:
            assert not match.block_ids or len(pinned | set(match.block_ids)) > m.pin_budget, e
            return
        assert match.block_ids and len(pinned | set(match.block_ids)) <= m.pin_budget
        assert handle.block_ids == match.block_ids and handle.num_tokens == match.num_tokens
        self.pins.append(handle)

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), again=st.booleans())
    def unpin(self, data, again):
        handle = data.draw(st.sampled_from(self.pins))
        self.m.unpin(handle)
        self.pins.remove(handle)
        if again:
            before = self.m.stats()
            self.m.unpin(handle)
            assert self.m.stats() == before

    @rule(roll=st.integers(0, 3))
    def reset(self, roll):
        if roll:  # a rare operation: it empties the cache
            return
        m = self.m
        in_use = any(b.ref_cnt for b in m.pool.blocks)
        try:
            m.reset_prefix_cache()
        except ValueError as e:
            assert in_use and "in use" in str(e)
            return
        assert not in_use and m.stats().num_cached_blocks == 0 and m.num_free_blocks == NUM_BLOCKS

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def integrity(self):
        self.m.check_integrity()

    @invariant()
    def matches_the_model(self):
        m, s = self.m, self.m.stats()
        assert m.num_sequences == len(self.tokens)
        assert s.num_tokens == sum(len(t) for t in self.tokens.values())
        assert s.num_used_blocks + s.num_evictable_blocks + s.num_free_blocks == NUM_BLOCKS
        assert s.num_pinned_blocks == len({bid for h in self.pins for bid in h.block_ids})
        assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (self.queried, self.hit)
        for seq_id, tokens in self.tokens.items():
            length, capacity = len(tokens), self.capacity[seq_id]
            assert (m.length(seq_id), m.remaining(seq_id)) == (length, capacity - length)
            assert len(m.block_table(seq_id)) == self.blocks_for(length)
            assert m.slot_mapping(seq_id, 0, length) == self.slots[seq_id][:length]

    @invariant()
    def every_sequence_reads_back_its_own_history(self):
        for seq_id, tokens in self.tokens.items():
            extra = self.extra[seq_id]
            for pos, slot in enumerate(self.m.slot_mapping(seq_id, 0, len(tokens))):
                assert self.arena[slot] == (extra, tuple(tokens[:pos + 1])), (seq_id, pos, slot)

    @invariant()
    def every_cached_block_holds_what_its_chain_claims(self):
        for node in self.m.tree.nodes():
            chain = []
            walk = node
            while walk.block is not None:
                chain.append(walk)
                walk = walk.parent
            tokens = tuple(t for n in reversed(chain) for t in n.token_ids)
            start = (len(chain) - 1) * BLOCK_SIZE
            for o in range(BLOCK_SIZE):
                assert self.arena[node.block.block_id * BLOCK_SIZE + o] == (node.extra, tokens[:start + o + 1])

    @invariant()
    def kv_events_mirror_the_cached_blocks(self):
        for event in self.m.take_events():
            if isinstance(event, BlockStored):
                assert not self.mirror & set(event.block_hashes)
                self.mirror |= set(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= self.mirror
                self.mirror -= set(event.block_hashes)
            else:
                assert isinstance(event, AllBlocksCleared)
                self.mirror.clear()
        assert self.mirror == {node.block_hash for node in self.m.tree.nodes()}


class CollidingManagerMachine(ManagerMachine):
    """The same rules and invariants under a hash with 3 values: most blocks collide."""

    def __init__(self):
        self._real_hash = hashing.hash_block
        hashing.hash_block = lambda parent, token_ids, extra=b"": bytes([self._real_hash(parent, token_ids,
                                                                                         extra)[0] % 3]) * 32
        super().__init__()

    def teardown(self):
        hashing.hash_block = self._real_hash


def _kv_of(extra: bytes, tokens: tuple[int, ...]) -> torch.Tensor:
    """The K and V `[2, KV_HEADS, HEAD_DIM]` a token's content stands for: a seeded draw per content."""
    seed = int.from_bytes(hashlib.sha256(extra + repr(tokens).encode()).digest()[:8], "little")
    return torch.randn(2, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


INV_FREQ = ops.rope_inv_freq(HEAD_DIM, 10000.0).float()
ROPE, UNROPE = ops.rope_table(INV_FREQ, 1024), ops.rope_table(-INV_FREQ, 1024)  # int4 keys' reads, undone


class QuantizedArenaMachine(ManagerMachine):
    """The same rules with a real arena in a quantized format beside the oracle: every write stores
    its content's K/V (quantized), every fork copies the block (scales included), and every
    sequence reads back, dequantized through its block table, its own K/V within the format's
    error (unit-normal values: half a step of int8, fp8's relative precision, and for int4 keys two
    steps of a block channel's range, re-quantized as the block fills)."""

    FORMAT, TOLERANCE = "int8", 0.05

    def __init__(self):
        super().__init__()
        self.kv = KVCache(1, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, torch.float32, kv_format=self.FORMAT)

    def write(self, seq_id: int, slots: list[int]) -> None:
        super().write(seq_id, slots)
        kv = torch.stack([_kv_of(*self.arena[slot]) for slot in slots])
        self.kv.store(0, kv[:, 0], kv[:, 1], slots)

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        super().copy_block(src, dst, num_tokens)
        self.kv.copy_block(src, dst)

    @invariant()
    def every_sequence_reads_back_its_own_kv_within_the_formats_error(self):
        for seq_id, tokens in self.tokens.items():
            if not tokens:  # rolled back to nothing
                continue
            table = torch.tensor(self.m.block_table(seq_id))
            k = ops.gather_seq_kv(self.kv.k[0], table, len(tokens), self.kv.k_scale[0], ROPE)
            v = ops.gather_seq_kv(self.kv.v[0], table, len(tokens), self.kv.v_scale[0])
            slots = self.m.slot_mapping(seq_id, 0, len(tokens))
            want = torch.stack([_kv_of(*self.arena[slot]) for slot in slots])
            if self.kv.layout.rotated:  # int4 keys are stored before RoPE and read rotated to their positions
                k = ops.rope_keys(k, UNROPE)
            assert (k - want[:, 0]).abs().max() <= self.TOLERANCE, (seq_id, self.FORMAT)
            assert (v - want[:, 1]).abs().max() <= self.TOLERANCE, (seq_id, self.FORMAT)


class Int4ArenaMachine(QuantizedArenaMachine):
    FORMAT, TOLERANCE = "int4", 1.0


class Fp8ArenaMachine(QuantizedArenaMachine):
    FORMAT, TOLERANCE = "fp8_e4m3", 0.25


SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None)
ManagerMachine.TestCase.settings = SETTINGS
CollidingManagerMachine.TestCase.settings = settings(SETTINGS, max_examples=100)
TestManagerMachine = ManagerMachine.TestCase
TestCollidingManagerMachine = CollidingManagerMachine.TestCase
for _machine in (QuantizedArenaMachine, Int4ArenaMachine, Fp8ArenaMachine):
    _machine.TestCase.settings = settings(SETTINGS, max_examples=40)
TestInt8ArenaMachine = QuantizedArenaMachine.TestCase
TestInt4ArenaMachine = Int4ArenaMachine.TestCase
TestFp8ArenaMachine = Fp8ArenaMachine.TestCase
