"""How a step's runs are packed into a CUDA graph's static inputs (host side, so it runs anywhere):
each sequence owns query_len rows, short runs are padded with rows that store nothing and sit after
their real tokens, the bucket's unused sequences attend to nothing, and the logits rows are listed
in run order. The graphs themselves are tested on a GPU (tests/gpu)."""

from __future__ import annotations

import numpy as np
import torch

from kvforge.model.cuda_graphs import IDS, LENGTHS, LOGIT_ROWS, POSITIONS, SLOTS, pack_decode, pack_inputs
from kvforge.model.runner import DecodeStep, TokenRun


def _buffers(rows: int, batch: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((5, rows), 7, dtype=np.int32), np.full((batch, blocks), 9, dtype=np.int32)


def test_decode_runs_fill_one_row_each_and_pad_the_bucket():
    inputs, tables = _buffers(8, 4, 3)
    runs = [TokenRun([11], 5, [40], [2, 3], True), TokenRun([12], 0, [50], [6], True)]
    assert pack_inputs(runs, 1, 4, inputs, tables) == 2
    assert inputs[IDS, :4].tolist() == [11, 12, 0, 0]
    assert inputs[POSITIONS, :4].tolist() == [5, 0, 0, 0]
    assert inputs[SLOTS, :4].tolist() == [40, 50, -1, -1]
    assert inputs[LENGTHS, :4].tolist() == [6, 1, 0, 0]
    assert inputs[LOGIT_ROWS, :2].tolist() == [0, 1]
    assert tables[0, :2].tolist() == [2, 3] and tables[1, 0] == 6


def test_verify_runs_own_query_len_rows_and_short_runs_are_padded_after_their_tokens():
    q, batch = 3, 4
    inputs, tables = _buffers(q * batch, batch, 4)
    runs = [TokenRun([1, 2, 3], 10, [100, 101, 102], [5, 6, 7], True, all_logits=True),  # a full verify run
            TokenRun([4], 20, [200], [8, 9], True),  # a plain decode riding along
            TokenRun([5, 6], 30, [300, 301], [1, 2], False)]  # a prefill piece needing no logits
    assert pack_inputs(runs, q, batch, inputs, tables) == 4
    assert inputs[IDS].tolist() == [1, 2, 3, 4, 0, 0, 5, 6, 0, 0, 0, 0]
    assert inputs[POSITIONS].tolist() == [10, 11, 12, 20, 0, 0, 30, 31, 0, 0, 0, 0]  # padding: position 0
    assert inputs[SLOTS].tolist() == [100, 101, 102, 200, -1, -1, 300, 301, -1, -1, -1, -1]
    # each sequence's K/V length counts its q rows, so row j of a run sees keys up to start_pos + j
    assert inputs[LENGTHS, :batch].tolist() == [13, 23, 33, 0]
    assert inputs[LOGIT_ROWS, :4].tolist() == [0, 1, 2, 3]
    assert tables[2, :2].tolist() == [1, 2] and tables[3].tolist() == [9, 9, 9, 9]  # unused rows untouched


def test_a_row_holding_the_same_table_object_is_not_copied_again_and_any_other_table_is():
    inputs, tables = _buffers(4, 4, 3)
    written = [None] * 4
    a, b = [2, 3], [6]
    pack_inputs([TokenRun([1], 20, [40], a, True), TokenRun([2], 0, [50], b, True)], 1, 4, inputs, tables, written)
    assert written[:2] == [a, b] and written[0] is a
    tables[0, :2] = -5  # what a row already holding `a` is not given again
    pack_inputs([TokenRun([3], 21, [41], a, True), TokenRun([4], 1, [51], [6], True)], 1, 4, inputs, tables, written)
    assert tables[0, :2].tolist() == [-5, -5]  # the same object: skipped
    tables[1, 0] = -5
    pack_inputs([TokenRun([3], 22, [42], b, True), TokenRun([4], 2, [52], a, True)], 1, 4, inputs, tables, written)
    assert tables[0, 0] == 6 and tables[1, :2].tolist() == [2, 3]  # rows that changed hands are rewritten


def test_a_decode_step_given_as_columns_packs_as_its_runs_do():
    step = DecodeStep([11, 12, 13], [5, 0, 17], [40, 50, 60], [[2, 3], [6], [1, 4]])
    by_runs, by_columns = _buffers(8, 4, 3), _buffers(8, 4, 3)
    assert pack_inputs(step.runs(), 1, 4, *by_runs) == pack_decode(step, 4, *by_columns) == 3
    assert np.array_equal(by_runs[0], by_columns[0]) and np.array_equal(by_runs[1], by_columns[1])
    written = [None] * 4
    pack_decode(step, 4, *by_columns, written)
    assert written[:3] == step.block_tables  # the table objects the rows now hold


def test_a_cascade_decode_step_puts_composed_rows_at_their_positions_and_shares_their_chunks():
    from kvforge.model.cuda_graphs import pack_cascade
    from kvforge.model.staging import SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement, Composition

    system = ChunkPlacement("sys", 0, 0, 40, tuple(range(10, 20)))
    doc = ChunkPlacement("doc", 1, 40, 8, (30, 31))
    # prompt: the system chunk, a document, a 4-token query; 2 tokens generated since
    comp = Composition((system, doc), tuple(range(52)), (48, 49, 50, 51))
    runs = [TokenRun([7], 5, [90], [1], True, comp),  # private token 5: position 48 + 4 + 1 = 53
            TokenRun([8], 9, [91], [2], True),  # a plain decode
            TokenRun([9], 4, [92], [3], True, Composition((system,), tuple(range(44)), (40, 41, 42, 43)))]
    inputs, tables = _buffers(8, 4, 3)
    staging = SegmentStaging(4, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"),
                             target_tasks=2)
    assert pack_cascade(runs, 1, 4, inputs, tables, staging) == 3
    assert inputs[POSITIONS, :4].tolist() == [53, 9, 44, 0]
    assert inputs[LENGTHS, :4].tolist() == [6, 10, 5, 0]  # composed rows attend to their private K/V
    host = {name: h for name, (h, _) in staging.views.items()}
    assert host["num_items"][0] == 2  # the system chunk once for rows 0 and 2, the document for row 0
    assert host["items"][:, :2].T.tolist() == [[0, 0, 2, 0, 40, 0], [1, 2, 1, 0, 8, 0]]
    assert host["pair_rows"][:3].tolist() == [0, 2, 0]
    assert host["row_slots"][:5].tolist() == [0, 2, 2, 3, 3]  # row 0: two slots, row 2: one
    assert host["pair_slots"][:3].tolist() == [0, 2, 1]
    assert host["offsets"][:2].tolist() == [0, 40]


def test_a_steady_cascade_batch_is_packed_and_copied_once_and_a_changed_one_again():
    from kvforge.model.staging import SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement

    a = (ChunkPlacement("a", 0, 0, 40, tuple(range(10, 20))),)
    b = (ChunkPlacement("b", 1, 0, 8, (30, 31)),)
    staging = SegmentStaging(4, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"), target_tasks=2)
    staging.pack(_decoding([a, (), a], 50), 4)
    staging.upload()
    assert staging.dev[:].tolist() == staging.host.tolist() and not staging.fresh
    staging.host.zero_()  # a steady batch (the same placement objects) does not touch the buffers
    staging.pack(_decoding([a, (), a], 51), 4)
    assert not staging.fresh and not staging.host.any()
    staging.pack(_decoding([a, b, a], 52), 4)  # a row's chunks changed
    assert staging.fresh and staging.views["num_items"][0][0] == 2
    staging.pack(_decoding([a, b, a], 20), 4)  # rows inside chunk "a": what they see moves every step
    staging.host.zero_()
    staging.pack(_decoding([a, b, a], 20), 4)
    assert staging.fresh and staging.views["pair_ends"][0][:2].tolist() == [21, 21]


def _decoding(rows, position):
    """One-row composed runs at `position` reading `rows[r]` (rows without placements read none)."""
    from kvforge.model.staging import RunReads

    return [RunReads(r, np.array([position]), row, position >= max(p.offset + p.num_tokens for p in row))
            for r, row in enumerate(rows) if row]


def test_a_composed_sequence_sees_its_chunks_whole_only_from_past_them_and_with_none_recomputed():
    import dataclasses

    from kvforge.model.staging import sees_whole_chunks
    from kvforge.types import ChunkPlacement, Composition

    system = ChunkPlacement("sys", 0, 0, 40, tuple(range(10, 20)))
    doc = ChunkPlacement("doc", 1, 40, 8, (30, 31))
    query = Composition((system, doc), tuple(range(52)), (48, 49, 50, 51))
    assert sees_whole_chunks(query, 0) and sees_whole_chunks(query, 6)  # the query, a generated token
    recompute = Composition((system, dataclasses.replace(doc, recomputed=(3,))), tuple(range(52)),
                            (43, 48, 49, 50, 51))
    assert not sees_whole_chunks(recompute, 0)  # the recomputed token sits inside the document
    assert not sees_whole_chunks(recompute, 1)  # and the document's token 3 stays hidden from the query


def test_the_segment_staging_fits_steps_within_its_buffers_and_an_eager_batch_holds_its_slots():
    import pytest

    from kvforge.model.staging import SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement

    a = (ChunkPlacement("a", 0, 0, 40, tuple(range(10, 13))),)
    nine = tuple(ChunkPlacement(f"c{i}", 1, 8 * i, 8, (i,)) for i in range(9))
    long = (ChunkPlacement("long", 0, 0, 17 * 16, tuple(range(17))),)
    staging = SegmentStaging(4, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"), target_tasks=2,
                             max_pairs=3)
    assert staging.fits([(1, a), (1, a)], 3)
    assert not staging.fits([(4, a)], 4)  # four (row, segment) pairs
    assert not staging.fits([], 5)  # five rows
    assert not staging.fits([(1, long)], 1)  # more pages than a table holds
    assert not SegmentStaging(4, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu")).fits([(1, nine)], 1)
    with pytest.raises(ValueError, match="pairs"):
        staging.pack(_decoding([a, a, a, a], 50), 4)
    with pytest.raises(ValueError, match="rows"):
        staging.pack(_decoding([a, a, a, a], 50), 3)  # a run past the step's rows
    staging.pack(_decoding([a, (), a], 50), 4)
    assert staging.batch(4, packed=True).num_slots == 2  # one split of one chunk for each of two rows
    assert staging.batch(4).num_slots == staging.num_slots


def test_an_eager_composed_row_reads_the_chunk_keys_at_or_before_it_and_masks_recomputed_ones():
    from kvforge.model.staging import SegmentStaging, segment_reads
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement, Composition

    system = ChunkPlacement("sys", 0, 0, 40, tuple(range(10, 13)))
    doc = ChunkPlacement("doc", 1, 40, 8, (30,), recomputed=(2, 3))
    gone = ChunkPlacement("gone", 1, 48, 2, (31,), recomputed=(0, 1))  # every token recomputed: never read
    # private tokens: the document's tokens 2 and 3 (positions 42, 43), then a 2-token query at 50, 51
    comp = Composition((system, doc, gone), tuple(range(52)), (42, 43, 48, 49, 50, 51))
    reads = segment_reads(TokenRun([1, 2, 3, 4, 5, 6], 0, range(6), [5], True, comp), 1)
    assert reads.first_row == 1 and reads.positions.tolist() == [42, 43, 48, 49, 50, 51] and not reads.whole
    assert segment_reads(TokenRun([7], 6, [6], [5], True, comp), 0).whole  # the first generated token
    staging = SegmentStaging(8, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"), target_tasks=2,
                             max_masks=1, max_keys=64)
    assert reads.num_pairs == 12  # "gone" is read by none, so needs no mask
    assert staging.fits([(12, comp.placements)], 7)
    assert not staging.fits([(12, comp.placements), (3, (doc, system, gone, _recomputing(system)))], 8)
    staging.pack([reads._replace(first_row=0)], 6)
    host = {name: h for name, (h, _) in staging.views.items()}
    assert host["pair_ends"][:12].tolist() == [40] * 6 + [3, 4, 8, 8, 8, 8]  # the system chunk's pairs first
    assert host["pair_masks"][:12].tolist() == [-1] * 6 + [0] * 6
    mask = staging.host_masks[0, :8]
    assert torch.isinf(mask[[2, 3]]).all() and (mask[[0, 1, 4, 5, 6, 7]] == 0).all()
    assert staging.batch(6, packed=True).masked and not staging.batch(6).masked


def test_a_composed_query_in_a_cascade_extend_graph_sits_at_its_positions_and_its_padding_reads_no_chunk():
    from kvforge.model.cuda_graphs import pack_cascade
    from kvforge.model.staging import SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement, Composition

    system = ChunkPlacement("sys", 0, 0, 40, tuple(range(10, 20)))
    doc = ChunkPlacement("doc", 1, 40, 8, (30, 31))
    comp = Composition((system, doc), tuple(range(51)), (48, 49, 50))  # a 3-token query after the chunks
    runs = [TokenRun([5, 6, 7], 0, [80, 81, 82], [1], True, comp),
            TokenRun([8, 9], 6, [90, 91], [2], True)]  # a plain prompt's 2-token suffix
    inputs, tables = np.full((5, 8), 7, dtype=np.int32), np.full((2, 3), 9, dtype=np.int32)
    staging = SegmentStaging(8, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"), target_tasks=2)
    assert pack_cascade(runs, 4, 2, inputs, tables, staging) == 2
    assert inputs[POSITIONS].tolist() == [48, 49, 50, 0, 6, 7, 0, 0]
    assert inputs[LENGTHS, :2].tolist() == [4, 10]  # the private K/V and its padding row; the plain run's
    assert inputs[LOGIT_ROWS, :2].tolist() == [2, 5]
    host = {name: h for name, (h, _) in staging.views.items()}
    assert host["pair_rows"][:6].tolist() == [0, 1, 2, 0, 1, 2]  # both chunks for the query's rows only
    assert host["row_slots"][:9].tolist() == [0, 2, 4, 6, 6, 6, 6, 6, 6]


def test_a_composed_step_takes_the_smallest_cascade_graph_that_holds_its_longest_run_masked_if_it_must():
    import dataclasses

    from kvforge.model.cuda_graphs import GraphShape, StepGraphs
    from kvforge.model.staging import SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement, Composition

    graphs = object.__new__(StepGraphs)  # the shape choice alone: no capture (that needs a GPU)
    graphs.segments = SegmentStaging(128, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"),
                                     target_tasks=2, max_masks=1, max_keys=64)
    graphs.cascade_lens, graphs.buckets = [1, 32, 128], {1: [1, 2, 4], 32: [1, 2, 4], 128: [1]}
    graphs.max_blocks, graphs.max_positions = 16, 256
    doc = ChunkPlacement("doc", 1, 0, 40, (30, 31, 32))

    def query(n, start=0, placement=doc):
        comp = Composition((placement,), tuple(range(40 + n)), tuple(range(40, 40 + n)))
        return TokenRun(list(range(n)), start, list(range(n)), [1], True, comp)

    decode = TokenRun([5], 9, [90], [2], True)
    assert graphs.cascade_shape([query(1, 3), decode]) == GraphShape(1, 2, cascade=True)  # a decode step
    assert graphs.cascade_shape([query(3), decode]) == GraphShape(32, 2, cascade=True)  # a query joins
    assert graphs.cascade_shape([query(40)]) == GraphShape(128, 1, cascade=True)
    assert graphs.cascade_shape([query(40), decode]) is None  # no 128-row graph of two sequences
    assert graphs.cascade_shape([query(200)]) is None  # longer than every cascade graph
    recomputing = dataclasses.replace(doc, recomputed=(4,))  # its keys less token 4: the masked graph
    assert graphs.cascade_shape([query(3, placement=recomputing), decode]) == GraphShape(32, 2, True, masked=True)
    assert graphs.cascade_shape([query(1, 3, recomputing)]) == GraphShape(1, 1, cascade=True, masked=True)
    another = dataclasses.replace(doc, recomputed=(4,))  # a second request's: a mask of its own
    assert graphs.cascade_shape([query(1, 3, recomputing), query(1, 3, another)]) is None  # room for one mask
    assert graphs.cascade_shape([query(3)._replace(all_logits=True)]) is None  # every row's logits: eager


def test_a_masked_cascade_graph_packs_each_rows_visible_chunk_keys_and_its_requests_recomputed_mask():
    from kvforge.model.cuda_graphs import pack_cascade
    from kvforge.model.staging import SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement, Composition

    system = ChunkPlacement("sys", 0, 0, 40, tuple(range(10, 13)))
    doc = ChunkPlacement("doc", 1, 40, 8, (30,), recomputed=(2, 3))
    # private tokens: the document's tokens 2 and 3 (positions 42, 43), then a 2-token query at 48, 49
    comp = Composition((system, doc), tuple(range(50)), (42, 43, 48, 49))
    runs = [TokenRun([5, 6, 7, 8], 0, [80, 81, 82, 83], [1], True, comp), TokenRun([9], 6, [90], [2], True)]
    inputs, tables = np.full((5, 8), 7, dtype=np.int32), np.full((2, 3), 9, dtype=np.int32)
    staging = SegmentStaging(8, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"), target_tasks=2,
                             max_masks=1, max_keys=64)
    assert pack_cascade(runs, 4, 2, inputs, tables, staging) == 2
    assert inputs[POSITIONS].tolist() == [42, 43, 48, 49, 6, 0, 0, 0]
    host = {name: h for name, (h, _) in staging.views.items()}
    assert host["pair_rows"][:8].tolist() == [0, 1, 2, 3] * 2  # the system chunk's pairs, then the document's
    assert host["pair_ends"][:8].tolist() == [40] * 4 + [3, 4, 8, 8]  # rows inside the document see up to themselves
    assert host["pair_masks"][:8].tolist() == [-1] * 4 + [0] * 4  # the request's recomputed tokens hidden
    assert torch.isinf(staging.host_masks[0, [2, 3]]).all() and staging.partial
    assert staging.batch(8, masked=True).masked and not staging.batch(8).masked


def _recomputing(placement):
    """`placement` with its first token recomputed by the request reading it."""
    import dataclasses

    return dataclasses.replace(placement, recomputed=(0,))


def test_packed_segment_batches_match_a_row_by_row_reading_of_random_steps():
    """Fuzz: random steps of composed runs (chunks at random offsets, recomputed tokens, rows inside
    and past the chunks, one-row and longer runs, chunks shared between runs) packed by run; each
    (row, chunk) pair, its visible keys and mask, every row's slots and every split's keys are
    checked against reading the step row by row."""
    import dataclasses
    import random

    from kvforge.model.staging import RunReads, SegmentStaging
    from kvforge.ops import rope_inv_freq
    from kvforge.types import ChunkPlacement

    rng = random.Random(0)
    for trial in range(150):
        staging = SegmentStaging(64, 16, rope_inv_freq(16, 10000.0).float(), 2, torch.device("cpu"),
                                 target_tasks=rng.choice([2, 16, 64]), max_masks=64, max_keys=256)
        shared = [ChunkPlacement(f"s{i}", 1, rng.randrange(0, 64), rng.randrange(1, 200),
                                 tuple(range(13 * i, 13 * i + 13))) for i in range(3)]
        reads, expected, first = [], set(), rng.randrange(0, 3)
        for _ in range(rng.randrange(1, 5)):
            placements = []
            for p in rng.sample(shared, rng.randrange(0, 4)):
                if rng.random() < 0.5:  # this request recomputes some of the chunk's tokens, or all
                    some = rng.sample(range(p.num_tokens), rng.randrange(1, p.num_tokens + 1))
                    hidden = range(p.num_tokens) if rng.random() < 0.1 else some
                    p = dataclasses.replace(p, recomputed=tuple(sorted(hidden)))
                placements.append(p)
            n = rng.choice([1, 1, rng.randrange(2, 12)])
            if first + n > 64:
                break
            positions = np.array(sorted(rng.sample(range(0, 300), n)), dtype=np.int64)
            past = max((p.offset + p.num_tokens for p in placements), default=0)
            reads.append(RunReads(first, tuple(positions.tolist()) if n == 1 else positions, tuple(placements),
                                  int(positions[0]) >= past))
            for j, pos in enumerate(positions.tolist()):
                for p in placements:
                    if pos >= p.offset and len(p.recomputed) < p.num_tokens:
                        expected.add((first + j, p.chunk_id, p.offset, min(p.num_tokens, pos - p.offset + 1),
                                      p.recomputed))
            first += n + rng.randrange(0, 3)
        num_rows = min(64, first)
        assert sum(r.num_pairs for r in reads) == len(expected)
        if not staging.fits([(r.num_pairs, r.placements) for r in reads], num_rows):
            continue
        staging.pack(reads, num_rows)
        h = {name: host for name, (host, _) in staging.views.items()}
        items = h["items"][:, :h["num_items"][0]].T.tolist()
        num_pairs = sum(count for _, first_pair, count, _, _, split in items if split == 0)
        segment_of = {}
        for seg, first_pair, count, _, _, _ in items:
            segment_of.update((pair, seg) for pair in range(first_pair, first_pair + count))
        packed = set()
        for pair in range(num_pairs):
            seg = segment_of[pair]
            chunk = next(p for p in shared if list(staging.host_tables[seg, :13]) == list(p.page_indices))
            assert h["offsets"][seg] == chunk.offset
            m = int(h["pair_masks"][pair])
            hidden = () if m < 0 else tuple(np.flatnonzero(np.isinf(staging.host_masks[m, :chunk.num_tokens].numpy())))
            packed.add((int(h["pair_rows"][pair]), chunk.chunk_id, chunk.offset, int(h["pair_ends"][pair]), hidden))
        assert packed == expected, trial
        # each pair's splits sit inside its row's slots, no two pairs share one, and the splits of a
        # (segment, pair tile) cover its keys once
        taken = set()
        for seg, first_pair, count, start, end, split in items:
            for pair in range(first_pair, first_pair + count):
                row, slot = int(h["pair_rows"][pair]), int(h["pair_slots"][pair]) + split
                assert h["row_slots"][row] <= slot < h["row_slots"][row + 1] and slot not in taken
                taken.add(slot)
        assert len(taken) == h["row_slots"][num_rows] == staging.slots_used
