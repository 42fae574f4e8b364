"""Host-to-device staging of a step's metadata: built once on the host, copied in one non-blocking
copy from pinned memory (the GPU path of the runner); and the segment batch of a step whose rows read
chunk segments, a cascade graph's or an eager one's (SegmentStaging, `segment_reads`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

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
        self.packed: tuple[int, list] | None = None  # the steady step the host buffers hold (see pack)
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

    def fits(self, runs: Sequence[tuple[int, Sequence[ChunkPlacement]]], num_rows: int) -> bool:
        """Whether a step of `num_rows` rows whose composed runs have (pairs, placements) `runs` fits
        the buffers, a run's pairs being its (row, chunk) pairs (`RunReads.num_pairs`, or an upper
        bound such as its rows x its placements): at most `max_rows` rows, MAX_ROW_SEGMENTS
        placements a run, MAX_STEP_SEGMENTS distinct segments, `max_pairs` pairs, `max_blocks` pages
        a segment, and `max_masks` placements with recomputed tokens (of at most `max_keys` keys)."""
        if num_rows > self.max_rows:
            return False
        pairs, distinct, masked = 0, set(), {}
        for run_pairs, placements in runs:
            if len(placements) > MAX_ROW_SEGMENTS:
                return False
            pairs += run_pairs
            for p in placements:
                if len(p.recomputed) == p.num_tokens:
                    continue  # recomputed whole: read by none
                if len(p.page_indices) > self.max_blocks:
                    return False
                distinct.add((p.chunk_id, p.offset))
                if p.recomputed:
                    masked[id(p)] = p.num_tokens
        return (pairs <= self.max_pairs and len(distinct) <= MAX_STEP_SEGMENTS and len(masked) <= self.max_masks
                and max(masked.values(), default=0) <= self.host_masks.shape[1])

    def pack(self, reads: Sequence[RunReads], num_rows: int) -> None:
        """Fill the host buffers for a step of `num_rows` rows whose composed runs read `reads` (every
        other row reads no chunk): each row of a run the keys of each placement at or before its
        position, less the placement's recomputed ones (masked); the same (chunk, offset) is one
        segment however many rows read it. A step whose runs sit past all their chunks (`whole`) at
        the same rows with the same placements as the last packed step (a steady decode batch)
        changes nothing. ValueError where the step does not `fit`. Vectorized per (run, placement):
        a 500-row prompt over four chunks packs its ~1,000 pairs in numpy, not row by row."""
        steady = all(run.whole for run in reads)
        signature = [(run.first_row, len(run.positions), run.placements) for run in reads] if steady else None
        if steady and self.packed == (num_rows, signature):
            return
        if self.copied is not None:
            self.copied.synchronize()  # the last upload from the host buffers is done before they change
        self.packed = None  # until this packing is complete
        h = {name: host for name, (host, _) in self.views.items()}
        index: dict[tuple[str, int], int] = {}
        segments: list[ChunkPlacement] = []
        masks: dict[int, int] = {}  # id of a placement with recomputed tokens -> its mask row
        host_masks = self.host_masks.numpy()
        # (segment, row, visible keys, mask row) of each pair: one-row runs' as Python scalars (a decode
        # batch), longer runs' as arrays
        single: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
        ranges: list[tuple[int, np.ndarray, np.ndarray, int]] = []
        self.mask_width, cut = 0, False  # cut: a pair sees only the keys up to its row
        for run in reads:
            n = len(run.positions)
            if len(run.placements) > MAX_ROW_SEGMENTS:
                raise ValueError(f"a run reads {len(run.placements)} chunk segments; at most {MAX_ROW_SEGMENTS}")
            if run.first_row < 0 or run.first_row + n > num_rows:
                raise ValueError(f"a run's rows {run.first_row}..{run.first_row + n - 1} are not within the "
                                 f"step's {num_rows}")
            if not n:
                continue
            first, last = int(run.positions[0]), int(run.positions[-1])
            positions = np.asarray(run.positions, dtype=np.int64) if n > 1 else None
            for p in run.placements:
                if len(p.recomputed) == p.num_tokens or last < p.offset:
                    continue  # recomputed whole, or every row sits before the chunk: none reads it
                s = index.setdefault((p.chunk_id, p.offset), len(segments))
                if s == len(segments):
                    segments.append(p)
                m = masks.get(id(p), -1) if p.recomputed else -1
                if p.recomputed and m < 0:  # a new mask row: its request's recomputed tokens hidden
                    m = masks[id(p)] = len(masks)
                    if m >= self.max_masks or p.num_tokens > host_masks.shape[1]:
                        raise ValueError(f"a step reads more than {self.max_masks} chunks with recomputed tokens, "
                                         f"or one of more than {host_masks.shape[1]} keys")
                    host_masks[m, :p.num_tokens] = 0.0
                    host_masks[m, list(p.recomputed)] = -np.inf
                    self.mask_width = max(self.mask_width, p.num_tokens)
                if n == 1:
                    end = min(p.num_tokens, first - p.offset + 1)
                    for column, value in zip(single, (s, run.first_row, end, m)):
                        column.append(value)
                    cut = cut or end < p.num_tokens
                    continue
                seen = int(np.searchsorted(positions, p.offset))  # rows before it see none of it
                ends = np.minimum(positions[seen:] - (p.offset - 1), p.num_tokens)
                ranges.append((s, np.arange(run.first_row + seen, run.first_row + n), ends, m))
                cut = cut or int(ends[0]) < p.num_tokens
        if len(segments) > MAX_STEP_SEGMENTS:
            raise ValueError(f"a step reads {len(segments)} chunk segments; at most {MAX_STEP_SEGMENTS}")
        num_pairs = len(single[0]) + sum(len(rows) for _, rows, _, _ in ranges)
        if num_pairs > self.max_pairs:
            raise ValueError(f"a step reads {num_pairs} (row, segment) pairs; at most {self.max_pairs}")
        pair_seg, pair_row, pair_end, pair_mask = (
            np.concatenate([np.asarray(column, dtype=np.int64)] + parts) for column, parts in zip(single, (
                [np.full(len(rows), s) for s, rows, _, _ in ranges], [rows for _, rows, _, _ in ranges],
                [ends for _, _, ends, _ in ranges], [np.full(len(rows), m) for _, rows, _, m in ranges])))
        counts = np.bincount(pair_seg, minlength=len(segments))
        tile = ops.SEGMENT_TILE_PAIRS
        tiles = int(np.sum(-(-counts // tile)))
        splits = max(1, self.target_tasks // max(1, tiles * self.num_kv_heads))
        keys_per_split = [_keys_per_split(p.num_tokens, splits) for p in segments]
        num_splits = np.asarray([ceil_div(p.num_tokens, k) for p, k in zip(segments, keys_per_split)], dtype=np.int64)
        # Slots row-major: row r's pairs' splits are slots row_slots[r] .. row_slots[r + 1] - 1, its
        # pairs in segment order; a pair's first slot is the splits of the pairs before it so ordered.
        pair_splits = num_splits[pair_seg]
        by_row = np.lexsort((pair_seg, pair_row))
        before = np.cumsum(pair_splits[by_row])
        used = int(before[-1]) if num_pairs else 0
        if used > self.num_slots:
            raise RuntimeError(f"a cascade step needs {used} partial-result slots, more than the {self.num_slots} held")
        pair_slot = np.empty(num_pairs, dtype=np.int64)
        pair_slot[by_row] = before - pair_splits[by_row]
        row_slots = h["row_slots"]
        row_slots[0] = 0
        row_slots[1:num_rows + 1] = np.cumsum(np.bincount(pair_row, weights=pair_splits, minlength=num_rows),
                                              dtype=np.int64)
        # Pairs grouped by segment (rows ascending): a work item is up to `tile` consecutive pairs of
        # one segment over one split of its keys.
        by_seg = np.lexsort((pair_row, pair_seg))
        for name, column in (("pair_rows", pair_row), ("pair_slots", pair_slot), ("pair_ends", pair_end),
                             ("pair_masks", pair_mask)):
            h[name][:num_pairs] = column[by_seg]
        items, pair = [], 0
        for s, p in enumerate(segments):
            count, step = int(counts[s]), keys_per_split[s]
            for start_pair in range(pair, pair + count, tile):
                size = min(tile, pair + count - start_pair)
                items += [(s, start_pair, size, j * step, min((j + 1) * step, p.num_tokens), j)
                          for j in range(int(num_splits[s]))]
            pair += count
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
        self.slots_used = used
        self.packed, self.fresh = (num_rows, signature) if steady else None, True

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
    every chunk it reads (none recomputed, each chunk ending before the first row's position), as
    an unmasked cascade graph serves them (its segment kernel reads no pair end or mask)."""
    return (composition.position(start_pos) >= composition.chunks_end
            and not any(p.recomputed for p in composition.placements))


class RunReads(NamedTuple):
    """What the new rows of one composed run read of its chunks in a step (`segment_reads`): rows
    `first_row` .. `first_row + len(positions) - 1`, at the absolute `positions` (ascending), each
    reading the keys of every placement at or before its position, less the placement's recomputed
    ones (masked; a placement recomputed whole is read by none). `whole`: every row sits past every
    chunk, so what the rows read depends on the placements alone (a steady decode batch)."""

    first_row: int
    positions: Sequence[int]  # an int64 array, or a one-row run's (position,)
    placements: tuple[ChunkPlacement, ...]
    whole: bool

    @property
    def num_pairs(self) -> int:
        """The (row, chunk) pairs these rows read: each row and each placement at or before it,
        but for placements recomputed whole."""
        read = [p.offset for p in self.placements if len(p.recomputed) < p.num_tokens]
        if self.whole:
            return len(self.positions) * len(read)
        return len(self.positions) * len(read) - int(np.searchsorted(self.positions, read).sum())


def segment_reads(run: TokenRun, first_row: int) -> RunReads:
    """The chunk reads of the composed `run`'s new rows, packed from row `first_row` of the step."""
    comp = run.composition
    if len(run.token_ids) == 1:  # a decoding sequence: no array
        position = comp.position(run.start_pos)
        return RunReads(first_row, (position,), comp.placements, position >= comp.chunks_end)
    positions = composed_positions(comp, run.start_pos, len(run.token_ids))
    return RunReads(first_row, positions, comp.placements, not len(positions) or int(positions[0]) >= comp.chunks_end)


def composed_positions(composition: Composition, start: int, n: int) -> np.ndarray:
    """The absolute positions of a composed sequence's private tokens start .. start + n - 1
    (`Composition.position` of each, as an int64 array)."""
    own, prompt = composition.private_positions, len(composition.prompt_token_ids)
    k = len(own)
    generated = np.arange(prompt + max(start, k) - k, prompt + start + n - k, dtype=np.int64)
    if start >= k:
        return generated
    head = np.asarray(own[start:start + n], dtype=np.int64)
    return head if start + n <= k else np.concatenate((head, generated))


def _keys_per_split(num_tokens: int, splits: int) -> int:
    """Keys of each split when `num_tokens` keys are cut in up to `splits` pieces of at least
    SPLIT_KEYS keys, rounded up to the kernel's key tile (64)."""
    pieces = max(1, min(splits, num_tokens // SPLIT_KEYS))
    return 64 * ceil_div(ceil_div(num_tokens, pieces), 64)
