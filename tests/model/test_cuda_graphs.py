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
    assert pack_cascade(runs, 4, inputs, tables, staging) == 3
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
    staging.pack([a, (), a], 4)
    staging.upload()
    assert staging.dev[:].tolist() == staging.host.tolist() and not staging.fresh
    staging.host.zero_()  # a steady batch (the same placement objects) does not touch the buffers
    staging.pack([a, (), a], 4)
    assert not staging.fresh and not staging.host.any()
    staging.pack([a, b, a], 4)  # a row's chunks changed
    assert staging.fresh and staging.views["num_items"][0][0] == 2
