"""Host-to-device staging of a step's metadata: built once on the host, copied in one non-blocking
copy from pinned memory (the GPU path of the runner); and the segment batch of a step whose rows read
chunk segments, a cascade graph's or an eager one's (SegmentStaging, `segment_reads`)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvforge import ops
from kvforge.config import ceil_div
from kvforge.model.attention import VarlenBatch
from kvforge.types import ChunkPlacement, Composition

if TYPE_CHECKING:
    from kvforge.model.runner import TokenRun

# (new tokens, K/V length including them, block table) of one sequence of a varlen batch
VarlenRow = tuple[int, int, Sequence[int]]


def num_splits_for(num_seqs: int, num_kv_heads: int, max_seq_len: int, max_query_len: int,
                   num_rows: int | None = None) -> int:
    """Key splits of the paged-attention kernel (see `kvforge.ops.triton.choose_num_splits`): enough
    for a batch whose programs (a sequence's query blocks x kv heads) cannot fill the GPU on their
    own, such as a decode at small batch or a short suffix after a long cached prefix."""
    from kvforge.ops.triton import choose_num_splits

    programs = num_seqs if max_query_len == 1 else num_seqs + (num_rows or num_seqs * max_query_len) // 32
    return choose_num_splits(programs, num_kv_heads, max_seq_len)


class HostStaging:
    """A pinned int32 host buffer (grown on demand) and the event of its last copy, so the buffer is
    never rewritten while a copy from it may still be in flight."""

    def __init__(self, device: torch.device, num_kv_heads: int):
        self.device, self.num_kv_heads = device, num_kv_heads
        self.host = torch.empty(1 << 16, dtype=torch.int32, pin_memory=True)
        self.copied: torch.cuda.Event | None = None

    def upload(self, ids: Sequence[int], positions: Sequence[int], slots: Sequence[int], rows: Sequence[int],
               varlen: Sequence[VarlenRow], private: Sequence[VarlenRow],
               gather: tuple[Sequence[int], Sequence[int]] = ((), ())) -> dict:
        """Copy the step's metadata to the device in one copy. Returns device tensors (int32) under
        "ids", "positions", "slots", "rows", the two lists of `gather` (index lists of one length)
        under "gather", and the VarlenBatch of each list under "varlen" and "private" (None for an
        empty list)."""
        pieces: list[np.ndarray] = [np.asarray(x, dtype=np.int32) for x in (ids, positions, slots, rows, *gather)]
        shapes: list[tuple[int, ...]] = [p.shape for p in pieces]
        for batch in (varlen, private):
            if batch:
                lens = np.asarray([q for q, _, _ in batch], dtype=np.int32)
                nb = max(len(t) for _, _, t in batch)
                tables = np.zeros((len(batch), nb), dtype=np.int32)
                for b, (_, _, table) in enumerate(batch):
                    tables[b, :len(table)] = table
                cu = np.zeros(len(batch) + 1, dtype=np.int32)
                np.cumsum(lens, out=cu[1:])
                for p in (cu, np.asarray([k for _, k, _ in batch], dtype=np.int32), tables):
                    pieces.append(p.reshape(-1))
                    shapes.append(p.shape)
        total = sum(p.size for p in pieces)
        if self.copied is not None:
            self.copied.synchronize()  # the last copy from `host` is done before it is rewritten
        if total > self.host.numel():
            self.host = torch.empty(2 * total, dtype=torch.int32, pin_memory=True)
        np.concatenate(pieces, out=self.host.numpy()[:total])
        dev = self.host[:total].to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        out, at, views = {}, 0, []
        for shape in shapes:
            size = int(np.prod(shape))
            views.append(dev[at:at + size].view(shape))
            at += size
        out["ids"], out["positions"], out["slots"], out["rows"] = views[:4]
        out["gather"] = (views[4], views[5])
        at = 6
        for name, batch in (("varlen", varlen), ("private", private)):
            if not batch:
                out[name] = None
                continue
            cu, seq_lens, tables = views[at:at + 3]
            at += 3
            max_q = max(q for q, _, _ in batch)
            max_k = max(k for _, k, _ in batch)
            rows = sum(q for q, _, _ in batch)
            out[name] = VarlenBatch(cu, seq_lens, tables, max_q,
                                    num_splits_for(len(batch), self.num_kv_heads, max_k, max_q, rows))
        return out


# A cascade decode step (SegmentStaging): chunk segments one sequence may read, distinct segments of
# one step, and the fewest keys a split of a segment's key range is worth.
MAX_ROW_SEGMENTS = 8
MAX_STEP_SEGMENTS = 64
SPLIT_KEYS = 256


class SegmentStaging:
    """The host and device buffers of a SegmentBatch (ops/cascade.py) for steps of up to `max_rows`
    rows, each reading at most MAX_ROW_SEGMENTS chunk segments (of up to `max_blocks` pages),
    MAX_STEP_SEGMENTS distinct ones and `max_pairs` (row, segment) pairs a step (default: every row
    reading MAX_ROW_SEGMENTS), and `max_masks` chunks with recomputed tokens (of up to `max_keys`
    keys; none by default). `pack` fills the pinned host buffers (once the last upload from them is
    done), `upload` copies them (non-blocking), and `batch(rows)` gives the device views a graph of
    `rows` rows reads, the same every step. The cascade graphs' staging serves their steps (whole
    and masked); the runner's serves eager steps with composed rows."""

    def __init__(self, max_rows: int, max_blocks: int, inv_freq: torch.Tensor, num_kv_heads: int,
                 device: torch.device, target_tasks: int | None = None, max_pairs: int | None = None,
                 max_masks: int = 0, max_keys: int = 0):
        from kvforge.ops.triton.cascade import num_sms

        self.num_kv_heads = num_kv_heads
        # Split a step's segments until its tasks (work items x kv heads) fill the GPU twice over
        # (`target_tasks` forces another count: tests, tuning).
        self.target_tasks = target_tasks or 2 * num_sms(device)
        pairs, segs, tile = max_pairs or max_rows * MAX_ROW_SEGMENTS, MAX_STEP_SEGMENTS, ops.SEGMENT_TILE_PAIRS
        self.max_rows, self.max_blocks, self.max_pairs = max_rows, max_blocks, pairs
        self.max_items = max(self.target_tasks // num_kv_heads, pairs // tile + segs) + 1
        self.num_slots = max(pairs, tile * self.target_tasks // num_kv_heads)
        self.inv_freq = inv_freq.detach().cpu()
        dim = 2 * len(self.inv_freq)
        self.rotation: dict[int, np.ndarray] = {}  # offset -> cos, sin of offset * inv_freq (float32)
        sizes = {"items": 6 * self.max_items, "num_items": 1, "pair_rows": pairs, "pair_slots": pairs,
                 "pair_ends": pairs, "pair_masks": pairs, "row_slots": max_rows + 1, "offsets": segs,
                 "rotations": segs * dim}
        self.host = torch.zeros(sum(sizes.values()), dtype=torch.int32, pin_memory=device.type == "cuda")
        self.dev = torch.zeros_like(self.host, device=device)
        self.host_tables = torch.zeros(segs, max_blocks, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.tables = torch.zeros_like(self.host_tables, device=device)
        self.max_masks = max_masks
        self.host_masks = torch.zeros(max(1, max_masks), max(1, max_keys), pin_memory=device.type == "cuda")
        self.masks = torch.zeros_like(self.host_masks, device=device)
        self.num_masks = self.mask_width = 0  # mask rows (and keys) the packed step uses
        self.partial = False  # whether a pair of the packed step sees only part of its segment
        self.written: list = [None] * segs  # the page list each table row holds (see pack_inputs)
        self.views: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        at = 0
        for name, size in sizes.items():
            host, dev = self.host.numpy()[at:at + size], self.dev[at:at + size]
            if name == "items":
                host, dev = host.reshape(6, -1), dev.view(6, -1)
            if name == "rotations":
                host, dev = host.view(np.float32).reshape(segs, dim), dev.view(torch.float32).view(segs, dim)
            self.views[name] = (host, dev)
            at += size
        self.num_tables = 0
        self.packed: tuple[list, int, list | None] | None = None  # what the host buffers hold: pack's arguments
        self.fresh = False  # the host buffers changed since the last upload
        self.slots_used = 0  # partial-result slots the packed step writes
        self.copied: torch.cuda.Event | None = None  # the last upload, on a CUDA device

    def batch(self, rows: int, packed: bool = False, masked: bool = False) -> ops.SegmentBatch:
        """The device views for steps of up to `rows` rows (a graph's, any step that fits), reading
        pair ends and masks with `masked` (a graph for rows that see part of a chunk); with `packed`,
        for the step just packed (an eager one), holding only the slots it writes and masked where
        it needs to be."""
        dev = {name: d for name, (_, d) in self.views.items()}
        return ops.SegmentBatch(dev["items"], dev["num_items"], dev["pair_rows"], dev["pair_slots"],
                                dev["row_slots"][:rows + 1], dev["offsets"], dev["rotations"], self.tables,
                                max(1, self.slots_used) if packed else self.num_slots, dev["pair_ends"],
                                dev["pair_masks"], self.masks, self.partial if packed else masked)

    def fits(self, rows: Sequence[Sequence[ChunkPlacement]]) -> bool:
        """Whether a step whose row r reads the segments `rows[r]` fits the buffers: at most `max_rows`
        rows, MAX_ROW_SEGMENTS segments a row, MAX_STEP_SEGMENTS distinct ones, `max_pairs` (row,
        segment) pairs, `max_blocks` pages a segment, and `max_masks` placements with recomputed
        tokens (of at most `max_keys` keys)."""
        if len(rows) > self.max_rows or sum(map(len, rows)) > self.max_pairs:
            return False
        distinct, masked = set(), {}
        for row in rows:
            if len(row) > MAX_ROW_SEGMENTS:
                return False
            for p in row:
                if len(p.page_indices) > self.max_blocks:
                    return False
                distinct.add((p.chunk_id, p.offset))
                if p.recomputed:
                    masked[id(p)] = p.num_tokens
        return (len(distinct) <= MAX_STEP_SEGMENTS and len(masked) <= self.max_masks
                and max(masked.values(), default=0) <= self.host_masks.shape[1])

    def pack(self, placements: Sequence[Sequence[ChunkPlacement]], num_rows: int,
             ends: Sequence[Sequence[int]] | None = None) -> None:
        """Fill the host buffers for a step whose row r reads the chunk segments `placements[r]`
        (none for a plain row; rows past len(placements), up to `num_rows`, read none): keys
        0..`ends[r][j] - 1` of `placements[r][j]` (all of them without `ends`), less its `recomputed`
        ones (masked). The same (chunk, offset) is one segment however many rows read it. A step
        whose rows hold the same placement objects as the last packed step's, with the same ends (a
        steady decode batch), changes nothing. ValueError where the step does not `fit`."""
        last = self.packed
        if (last is not None and last[1] == num_rows and len(last[0]) == len(placements) and last[2] == ends
                and all(map(operator.is_, last[0], placements))):
            return
        if self.copied is not None:
            self.copied.synchronize()  # the last upload from the host buffers is done before they change
        self.packed = None  # until this packing is complete
        h = {name: host for name, (host, _) in self.views.items()}
        index: dict[tuple[str, int], int] = {}
        segments: list[ChunkPlacement] = []
        readers: list[list[tuple[int, int, int]]] = []  # per segment, in row order: (row, visible keys, mask)
        masks: dict[int, int] = {}  # id of a placement with recomputed tokens -> its mask row
        host_masks = self.host_masks.numpy()
        self.mask_width, cut = 0, False  # cut: a pair sees only the keys up to its row
        for r, row in enumerate(placements):
            if len(row) > MAX_ROW_SEGMENTS:
                raise ValueError(f"row {r} reads {len(row)} chunk segments; at most {MAX_ROW_SEGMENTS}")
            for j, p in enumerate(row):
                s = index.setdefault((p.chunk_id, p.offset), len(segments))
                if s == len(segments):
                    segments.append(p)
                    readers.append([])
                m = masks.get(id(p), -1) if p.recomputed else -1
                if p.recomputed and m < 0:  # a new mask row: its request's recomputed tokens hidden
                    m = masks[id(p)] = len(masks)
                    if m >= self.max_masks or p.num_tokens > host_masks.shape[1]:
                        raise ValueError(f"a step reads more than {self.max_masks} chunks with recomputed tokens, "
                                         f"or one of more than {host_masks.shape[1]} keys")
                    host_masks[m, :p.num_tokens] = 0.0
                    host_masks[m, list(p.recomputed)] = -np.inf
                    self.mask_width = max(self.mask_width, p.num_tokens)
                end = p.num_tokens if ends is None else ends[r][j]
                cut = cut or end < p.num_tokens
                readers[s].append((r, end, m))
        if len(segments) > MAX_STEP_SEGMENTS:
            raise ValueError(f"a step reads {len(segments)} chunk segments; at most {MAX_STEP_SEGMENTS}")
        if sum(map(len, readers)) > self.max_pairs:
            raise ValueError(f"a step reads {sum(map(len, readers))} (row, segment) pairs; at most {self.max_pairs}")
        tile = ops.SEGMENT_TILE_PAIRS
        tiles = sum(ceil_div(len(rows), tile) for rows in readers)
        splits = max(1, self.target_tasks // max(1, tiles * self.num_kv_heads))
        # Slots row-major: row r's segments' splits are slots row_slots[r] .. row_slots[r + 1] - 1.
        keys_per_split = [_keys_per_split(p.num_tokens, splits) for p in segments]
        num_splits = [ceil_div(p.num_tokens, k) for p, k in zip(segments, keys_per_split)]
        base: dict[tuple[int, int], int] = {}  # (segment, row) -> its first slot
        row_slots = h["row_slots"]
        row_slots[0] = 0
        at = 0
        for r in range(num_rows):
            for p in placements[r] if r < len(placements) else ():
                s = index[(p.chunk_id, p.offset)]
                base[s, r] = at
                at += num_splits[s]
            row_slots[r + 1] = at
        if at > self.num_slots:
            raise RuntimeError(f"a cascade step needs {at} partial-result slots, more than the {self.num_slots} held")
        items, pair = [], 0
        for s, rows in enumerate(readers):
            p = segments[s]
            for first in range(0, len(rows), tile):
                count = min(tile, len(rows) - first)
                for j in range(num_splits[s]):
                    start = j * keys_per_split[s]
                    items.append((s, pair + first, count, start, min(start + keys_per_split[s], p.num_tokens), j))
            at_pairs = slice(pair, pair + len(rows))
            h["pair_rows"][at_pairs] = [r for r, _, _ in rows]
            h["pair_slots"][at_pairs] = [base[s, r] for r, _, _ in rows]
            h["pair_ends"][at_pairs] = [e for _, e, _ in rows]
            h["pair_masks"][at_pairs] = [m for _, _, m in rows]
            pair += len(rows)
            h["offsets"][s] = p.offset
            h["rotations"][s] = self._rotation(p.offset)
        if len(items) > self.max_items:
            raise RuntimeError(f"a cascade step has {len(items)} work items, more than the {self.max_items} held")
        if items:
            h["items"][:, :len(items)] = np.asarray(items, dtype=np.int32).T
        h["num_items"][0] = len(items)
        tables = self.host_tables.numpy()
        for s, p in enumerate(segments):
            if self.written[s] is not p.page_indices:
                tables[s, :len(p.page_indices)] = p.page_indices
                self.written[s] = p.page_indices
        self.num_tables = len(segments)
        self.widest = max((len(p.page_indices) for p in segments), default=0)
        self.num_masks = len(masks)
        self.partial = cut or bool(masks)
        self.slots_used = at
        self.packed, self.fresh = (list(placements), num_rows, None if ends is None else list(ends)), True

    def upload(self) -> None:
        """Copy the packed host buffers to the device buffers (non-blocking), if they changed."""
        if not self.fresh:
            return
        self.fresh = False
        self.dev.copy_(self.host, non_blocking=True)
        if self.num_tables:
            self.tables[:self.num_tables, :self.widest].copy_(self.host_tables[:self.num_tables, :self.widest],
                                                              non_blocking=True)
        if self.num_masks:
            self.masks[:self.num_masks, :self.mask_width].copy_(
                self.host_masks[:self.num_masks, :self.mask_width], non_blocking=True)
        if self.dev.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def _rotation(self, offset: int) -> np.ndarray:
        """cos then sin of offset * inv_freq (`ops.rope_cos_sin`, float32), computed once per offset."""
        if offset not in self.rotation:
            cos, sin = ops.rope_cos_sin(torch.tensor([offset]), self.inv_freq, torch.float32)
            self.rotation[offset] = torch.cat((cos, sin), dim=1)[0].numpy()
        return self.rotation[offset]


def sees_whole_chunks(composition: Composition, start_pos: int) -> bool:
    """Whether the rows of a composed sequence from its private token `start_pos` on see every key of
    every chunk it reads (none recomputed, each chunk ending before the first row's position), as a
    an unmasked cascade graph serves them (its segment kernel reads no pair end or mask)."""
    position = composition.position(start_pos)
    return all(not p.recomputed and p.offset + p.num_tokens <= position for p in composition.placements)


def segment_reads(run: TokenRun) -> tuple[list[tuple[ChunkPlacement, ...]], list[tuple[int, ...]]]:
    """For each new row of the composed `run`, in order: the chunk placements it reads and how many
    keys of each it sees (those at or before its position; a placement's recomputed keys are masked
    by the segment batch; a placement recomputed whole is not read). A row past all of its chunks
    (the query, a generated token) shares one pair of tuples with the run's other such rows: the
    composition's own placements where none is recomputed whole (so a steady decode batch packs
    the same objects every step)."""
    comp = run.composition
    placements = comp.placements
    if any(len(p.recomputed) == p.num_tokens for p in placements):
        placements = tuple(p for p in placements if len(p.recomputed) < p.num_tokens)
    whole = tuple(p.num_tokens for p in placements)
    past = max((p.offset + p.num_tokens for p in placements), default=0)
    reads, ends = [], []
    for j in range(run.start_pos, run.start_pos + len(run.token_ids)):
        pos = comp.position(j)
        if pos >= past:
            reads.append(placements)
            ends.append(whole)
            continue
        seen = [(p, min(p.num_tokens, pos - p.offset + 1)) for p in placements if pos >= p.offset]
        reads.append(tuple(p for p, _ in seen))
        ends.append(tuple(e for _, e in seen))
    return reads, ends


def _keys_per_split(num_tokens: int, splits: int) -> int:
    """Keys of each split when `num_tokens` keys are cut in up to `splits` pieces of at least
    SPLIT_KEYS keys, rounded up to the kernel's key tile (64)."""
    pieces = max(1, min(splits, num_tokens // SPLIT_KEYS))
    return 64 * ceil_div(ceil_div(num_tokens, pieces), 64)
