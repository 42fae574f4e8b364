"""Uniform steps captured in CUDA graphs, one per (query length, batch-size bucket) (nano-vllm's
scheme, with vLLM's uniform-decode shape for speculative verification).

A graph of query length q and batch bs computes bs sequences of q new tokens each: sequence i owns
rows i*q .. i*q + q - 1. Static input buffers hold the rows' token ids, positions and slots, the
sequences' K/V lengths and block tables, and which rows' logits to return. A step of n runs of up
to q tokens each fills them: a run of fewer than q tokens is padded with rows that store nothing
(slot -1) and sit after its real tokens, so causality hides them from the real rows; the bucket's
unused sequences store nothing and attend to nothing (length 0). q = 1 is the plain decode step
(every row's logits); q = k + 1 verifies k drafted tokens per sequence (speculative decoding),
where a plain decode or a short catch-up run rides along padded; the extend graphs (q in
EXTEND_QUERY_LENS) run prefills of up to 512 tokens (a prompt, a prompt's suffix after its cached
prefix), with one logits row per sequence. A cascade graph (q = 1, or an extend length: a composed
prompt's query) also reads the chunk segments of the sequences composed from chunks, from a
SegmentBatch whose counts live on the device (staging.SegmentStaging packs it); each is captured
twice: for rows that see their chunks whole, and masked, for rows that see part of a chunk (a
recomputed token inside it, or chunk tokens its request recomputes, hidden). Graphs are captured
largest first into one memory pool.

A graph's logits stay in the model's dtype; a replay casts the rows it returns to float32. Decode
graphs (q = 1) also take each row's greedy token inside the graph (`greedy_tokens`), so a step
that needs only those (async scheduling) reads no logits at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from operator import is_not
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvforge.model.attention import AttentionMetadata, VarlenBatch, forward_context
from kvforge.model.staging import MAX_STEP_SEGMENTS, SegmentStaging, num_splits_for, sees_whole_chunks, segment_reads
from kvforge.ops import library as ops_library

if TYPE_CHECKING:
    from kvforge.model.runner import DecodeStep, ModelRunner, PendingTokens, TokenRun

# Rows of the largest graph of query length > 1 (vLLM's default largest capture size, in tokens):
# past it a step is compute-bound and runs eagerly at no loss.
MAX_GRAPH_ROWS = 512
# Query lengths of the extend graphs: prefills of up to MAX_GRAPH_ROWS rows (a prompt's suffix after a
# cached prefix, a prompt, a decode batch joined by one), which eagerly spend far longer launching
# kernels than running them: a 512-token prompt of the 1B shape took 19 ms eagerly on the H200 and
# 3.0 ms as a graph. One logits row per sequence (its last token's), so prompt log-probabilities run
# eagerly. A run pads to the smallest length that holds it.
EXTEND_QUERY_LENS = (32, 128, 256, 512)

# Rows of the host/device input buffer (int32 [6, rows]); SOURCES (read outside the graphs): for
# pending tokens, the row of the previous step's tokens holding each row's id, or -1.
IDS, POSITIONS, SLOTS, LOGIT_ROWS, LENGTHS, SOURCES = range(6)


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then multiples of 16, and `max_batch` itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


@dataclass(frozen=True)
class GraphShape:
    """The graph a step replays: `query_len` rows per sequence, `batch` sequences; `cascade`: a step
    whose sequences may be composed from chunks (their chunk segments read once per step): a decode
    step (query length 1) or a composed prompt's query (an extend length); `masked` (cascade only):
    its rows may see part of a chunk (the segment batch reads each pair's end and mask)."""

    query_len: int
    batch: int
    cascade: bool = False
    masked: bool = False


def pack_inputs(runs: Sequence[TokenRun], query_len: int, batch: int, inputs: np.ndarray,
                tables: np.ndarray, written: list | None = None) -> int:
    """Write `runs` (each of 1..query_len tokens, at most `batch` of them) into a graph's host
    buffers: `inputs` int32 [>= 5, >= batch * query_len] (see IDS .. LENGTHS; LENGTHS uses the first
    `batch` entries) and `tables` int32 [>= len(runs), >= every run's block table]. Returns the
    number of logits rows: each run's last `num_logits` rows, in run order, are listed first in
    LOGIT_ROWS. Padding rows get token 0, position 0 (their RoPE only: the attention kernel places
    rows by LENGTHS, so every position stays inside the model's rope table), slot -1; the bucket's
    unused sequences length 0. Only `tables[:len(runs)]` is written (a padding row reads nothing).
    `written` (one entry per row of `tables`, kept by the caller across calls) names the block-table
    object each row last received: a row already holding this run's table object is not rewritten,
    so a caller that reuses a sequence's table list while it is unchanged skips its copy."""
    if query_len == 1:  # the hot decode path: one token and one logits row per run
        return _pack_columns([r.token_ids[0] for r in runs], [r.start_pos for r in runs], [r.slots[0] for r in runs],
                             [r.block_table for r in runs], batch, inputs, tables, written)
    q, rows = query_len, batch * query_len
    inputs[:, :rows] = 0
    inputs[SLOTS, :rows] = -1
    _pack_tables([r.block_table for r in runs], tables, written)
    at = 0
    for i, r in enumerate(runs):
        n, base = len(r.token_ids), i * q
        inputs[IDS, base:base + n] = r.token_ids
        inputs[POSITIONS, base:base + n] = np.arange(r.start_pos, r.start_pos + n)
        inputs[SLOTS, base:base + n] = r.slots
        inputs[LENGTHS, i] = r.start_pos + q
        inputs[LOGIT_ROWS, at:at + r.num_logits] = np.arange(base + n - r.num_logits, base + n)
        at += r.num_logits
    return at


def pack_decode(step: DecodeStep, batch: int, inputs: np.ndarray, tables: np.ndarray, written: list | None = None) -> int:
    """`pack_inputs` for a plain decode step given as columns (one token and one logits row per
    sequence; no compositions), with no TokenRun per sequence: the same buffers, the same contract."""
    return _pack_columns(step.token_ids, step.positions, step.slots, step.block_tables, batch, inputs, tables, written)


def pack_cascade(runs: Sequence[TokenRun], query_len: int, batch: int, inputs: np.ndarray, tables: np.ndarray,
                 segments: SegmentStaging, written: list | None = None) -> int:
    """`pack_inputs` for a cascade graph: runs of up to `query_len` tokens, some composed from chunks
    (see `StepGraphs.cascade_shape`). A composed run's rows sit at their absolute positions, attend
    to its private K/V (its block table, `start_pos` + its rows) and read its chunks' segments,
    packed into `segments` (`segment_reads`: each row the keys it sees; a padding row reads none)."""
    reads = [segment_reads(r, i * query_len) for i, r in enumerate(runs) if r.composition is not None]
    if query_len == 1:
        positions = [r.start_pos for r in runs]
        for read in reads:
            positions[read.first_row] = read.positions[0]
        k = _pack_columns([r.token_ids[0] for r in runs], positions, [r.slots[0] for r in runs],
                          [r.block_table for r in runs], batch, inputs, tables, written, [r.start_pos + 1 for r in runs])
    else:
        k = pack_inputs(runs, query_len, batch, inputs, tables, written)
        for read in reads:
            inputs[POSITIONS, read.first_row:read.first_row + len(read.positions)] = read.positions
    segments.pack(reads, batch * query_len)
    return k


def _pack_columns(token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[Sequence[int]],
                  batch: int, inputs: np.ndarray, tables: np.ndarray, written: list | None,
                  lengths: list[int] | None = None) -> int:
    """The decode columns into the buffers; K/V lengths `lengths`, by default each position + 1."""
    k = len(token_ids)
    inputs[:, :batch] = 0
    inputs[SLOTS, :batch] = -1
    _pack_tables(block_tables, tables, written)
    inputs[IDS, :k] = token_ids
    inputs[POSITIONS, :k] = positions
    inputs[SLOTS, :k] = slots
    if lengths is None:
        np.add(inputs[POSITIONS, :k], 1, out=inputs[LENGTHS, :k])
    else:
        inputs[LENGTHS, :k] = lengths
    inputs[LOGIT_ROWS, :k] = np.arange(k)
    return k


def _pack_tables(block_tables: list[Sequence[int]], tables: np.ndarray, written: list | None) -> None:
    k = len(block_tables)
    stale = range(k) if written is None else compress(range(k), map(is_not, written, block_tables))
    for i in stale:
        table = block_tables[i]
        tables[i, :len(table)] = table
    if written is not None:
        written[:k] = block_tables


class StepGraphs:
    """The captured graphs of one runner (whose arena they read and write): query length 1 (decode)
    up to `max_batch` sequences; each longer query length in `query_lens` (verification: every row's
    logits) and in EXTEND_QUERY_LENS (one logits row per sequence) up to MAX_GRAPH_ROWS rows; and
    for query length 1 and the extend lengths, cascade graphs too (sequences composed from chunks,
    each chunk segment read once for all the rows that read it; plain pages only), whole and masked."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int, query_lens: Sequence[int] = (1,)):
        if max_batch <= 0:
            raise ValueError(f"max_graph_batch must be positive, got {max_batch}")
        if any(q < 1 for q in query_lens):
            raise ValueError(f"graph query lengths must be >= 1, got {list(query_lens)}")
        # logits rows per sequence of each query length: q (verify: every row), or 1
        self.logits_per_seq = {q: 1 for q in EXTEND_QUERY_LENS} | {q: q for q in query_lens} | {1: 1}
        self.buckets: dict[int, list[int]] = {}
        for q in sorted(self.logits_per_seq):
            most = max_batch if q == 1 else min(max_batch, MAX_GRAPH_ROWS // q)
            if most >= 1:
                self.buckets[q] = graph_buckets(most)
        self.max_blocks = max_blocks
        self.max_positions = max_blocks * runner.block_size
        model, dev = runner.model, runner.device
        kv_heads = model.cfg.num_kv_heads
        # Cascade graphs (decode, and the extend lengths: a composed prompt's query) read plain pages,
        # as the runner's eager segment batch does (quantized ones keep composed steps eager).
        quantized = runner.segments is None
        self.cascade_lens = [] if quantized else [q for q in self.buckets
                                                  if q == 1 or q in EXTEND_QUERY_LENS and self.logits_per_seq[q] == 1]
        self.segments = None if quantized else SegmentStaging(
            max(q * self.buckets[q][-1] for q in self.cascade_lens), max_blocks, model.inv_freq, kv_heads, dev,
            max_masks=MAX_STEP_SEGMENTS, max_keys=self.max_positions)
        rows = max(q * b[-1] for q, b in self.buckets.items())
        with torch.inference_mode():
            self.inputs = torch.zeros(6, rows, dtype=torch.int32, device=dev)
            self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
            self.host_inputs = torch.zeros(6, rows, dtype=torch.int32, pin_memory=True)
            self.host_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, pin_memory=True)
            self.written: list = [None] * max_batch  # the block-table object each host table row holds
            self.copied: torch.cuda.Event | None = None
            self.graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
            self.logits: dict[GraphShape, torch.Tensor] = {}  # in the model's dtype
            self.tokens: dict[GraphShape, torch.Tensor] = {}  # decode graphs: each row's greedy token
            greedy = ops_library.backend("triton").greedy_tokens
            # the query offsets of each query length: [0, q, 2q, ...], kept alive for the graphs to read
            self.cu = {q: torch.arange(0, q * sizes[-1] + 1, q, dtype=torch.int32, device=dev)
                       for q, sizes in self.buckets.items()}
            ids, positions, slots, logit_rows, lengths, _ = self.inputs
            slots.fill_(-1)
            pool = None
            shapes = [GraphShape(q, bs) for q, sizes in self.buckets.items() for bs in sizes]
            shapes += [GraphShape(q, bs, cascade=True, masked=masked) for q in self.cascade_lens
                       for bs in self.buckets[q] for masked in (False, True)]
            for shape in sorted(shapes, key=lambda s: (-s.query_len * s.batch, s.cascade, s.masked)):
                q, bs = shape.query_len, shape.batch
                n = q * bs
                meta = AttentionMetadata(
                    slot_mapping=slots[:n], num_varlen_rows=n,
                    varlen=VarlenBatch(self.cu[q][:bs + 1], lengths[:bs], self.tables[:bs], q,
                                       num_splits_for(bs, kv_heads, self.max_positions, q, n)),
                    segments=self.segments.batch(n, masked=shape.masked) if shape.cascade else None)
                ctx = dataclasses.replace(runner.pages(), metadata=meta)

                def step(ctx=ctx, n=n, q=q, k=bs * self.logits_per_seq[q]):
                    with forward_context(ctx):
                        hidden = model(ids[:n], positions[:n])
                        logits = model.compute_logits(hidden if q == 1 else hidden.index_select(0, logit_rows[:k]),
                                                      float32=False)
                        return logits, greedy(logits) if q == 1 else None

                step()  # compile and warm the kernels outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[shape], tokens = step()
                if tokens is not None:
                    self.tokens[shape] = tokens
                pool = graph.pool()
                self.graphs[shape] = graph
            torch.cuda.synchronize(dev)

    def shape_for(self, runs: Sequence[TokenRun]) -> GraphShape | None:
        """The smallest graph that can run this step, or None: runs of at most a captured query length
        each, within its largest bucket, none with more blocks than the static tables hold or reaching
        past them once padded, and none needing more logits rows than the graph gives a sequence
        (query length 1: exactly its one). A step with a run composed from chunks: `cascade_shape`."""
        if any([r.composition is not None for r in runs]):
            return self.cascade_shape(runs)
        if max([len(r.block_table) for r in runs]) > self.max_blocks:
            return None
        longest = max([len(r.token_ids) for r in runs])
        if any([r.all_logits for r in runs]):
            logits = [r.num_logits for r in runs]
            most_logits, one_each = max(logits), all(n == 1 for n in logits)
        else:  # a run's logits rows are its needs_logits (no per-run property call on the decode path)
            needs = [r.needs_logits for r in runs]
            most_logits, one_each = int(any(needs)), all(needs)
        last = max([r.start_pos for r in runs])
        for q, sizes in self.buckets.items():
            if q < longest or len(runs) > sizes[-1] or most_logits > self.logits_per_seq[q]:
                continue
            if (q == 1 and not one_each) or last + q > self.max_positions:
                continue
            return GraphShape(q, next(b for b in sizes if b >= len(runs)))
        return None

    def cascade_shape(self, runs: Sequence[TokenRun]) -> GraphShape | None:
        """The cascade graph for a step of runs (each needing its last token's logits only), some
        composed from chunks: the smallest cascade query length that holds the longest run (1: a
        decode step; an extend length: a composed prompt's query), in its smallest bucket that holds
        the runs, masked where a composed run does not see its chunks whole (`sees_whole_chunks`);
        or None: too many runs or tokens, a table longer than the static tables, a position past
        them, or segments the staging does not hold (`SegmentStaging.fits`)."""
        if self.segments is None:
            return None
        longest = max([len(r.token_ids) for r in runs])
        q = next((q for q in self.cascade_lens if q >= longest and len(runs) <= self.buckets[q][-1]), None)
        if q is None:
            return None
        reads, masked = [], False
        for r in runs:
            if not r.needs_logits or r.all_logits or len(r.block_table) > self.max_blocks:
                return None
            c, n = r.composition, len(r.token_ids)
            last = r.start_pos + n - 1 if c is None else c.position(r.start_pos + n - 1)
            if last >= self.max_positions or r.start_pos + q > self.max_positions:
                return None
            if c is not None:
                reads.append((n * len(c.placements), c.placements))  # packing reads no more
                masked = masked or not sees_whole_chunks(c, r.start_pos)
        if not self.segments.fits(reads, q * len(runs)):
            return None
        return GraphShape(q, next(b for b in self.buckets[q] if b >= len(runs)), cascade=True, masked=masked)

    def decode_shape(self, step: DecodeStep) -> GraphShape | None:
        """`shape_for` of a plain decode step given as columns: the smallest decode bucket that holds
        it, or None (too many sequences, a table longer than the static tables, a position past them)."""
        sizes, k = self.buckets[1], len(step.token_ids)
        if (k > sizes[-1] or max(map(len, step.block_tables)) > self.max_blocks
                or max(step.positions) >= self.max_positions):
            return None
        return GraphShape(1, next(b for b in sizes if b >= k))

    def run_decode(self, step: DecodeStep, shape: GraphShape, pending: PendingTokens | None = None,
                   greedy: bool = False) -> torch.Tensor:
        """`run` for a plain decode step given as columns (`shape` from `decode_shape(step)`)."""
        if self.copied is not None:
            self.copied.synchronize()  # the host buffers are free to rewrite
        k = pack_decode(step, shape.batch, self.host_inputs.numpy(), self.host_tables.numpy(), self.written)
        return self._replay(shape, k, max(map(len, step.block_tables)), k, pending, greedy)

    def run(self, runs: Sequence[TokenRun], shape: GraphShape, pending: PendingTokens | None = None,
            greedy: bool = False) -> torch.Tensor:
        """Replay the graph of `shape` (from `shape_for(runs)`) over `runs`; the float32 logits rows of
        the runs (`num_logits` each), in run order, or with `greedy` (decode graphs only) each row's
        greedy token (int64, a view of the graph's output: valid until its next replay). `pending`
        (for one-token runs): ids gathered on the device from the previous step's tokens before the
        replay; nothing waits for them."""
        if self.copied is not None:
            self.copied.synchronize()  # the host buffers are free to rewrite
        if shape.cascade:
            num_logits = pack_cascade(runs, shape.query_len, shape.batch, self.host_inputs.numpy(),
                                      self.host_tables.numpy(), self.segments, self.written)
            self.segments.upload()
        else:
            num_logits = pack_inputs(runs, shape.query_len, shape.batch, self.host_inputs.numpy(),
                                     self.host_tables.numpy(), self.written)
        return self._replay(shape, len(runs), max([len(r.block_table) for r in runs]), num_logits, pending, greedy)

    def _replay(self, shape: GraphShape, k: int, nb: int, num_logits: int,
                pending: PendingTokens | None, greedy: bool) -> torch.Tensor:
        """Copy the packed host buffers of `k` sequences (tables of up to `nb` blocks) to the device,
        gather the pending ids, replay; the first `num_logits` rows of the graph's logits (float32),
        or of its greedy tokens."""
        assert not greedy or shape in self.tokens, "greedy tokens come from decode graphs (query length 1)"
        q = shape.query_len
        n = q * shape.batch
        if pending is not None:  # sequence i's rows start at i * q; a pending run is its first row
            sources = self.host_inputs.numpy()[SOURCES]
            if q > 1:
                sources[:n] = -1
            sources[:k * q:q] = pending.rows
        self.inputs[:, :n].copy_(self.host_inputs[:, :n], non_blocking=True)
        self.tables[:k, :nb].copy_(self.host_tables[:k, :nb], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        if pending is not None:
            ids = self.inputs[IDS, :k * q]
            if q == 1 and list(pending.rows) == list(range(k)):  # the previous step's batch, in its order
                ids.copy_(pending.tokens[:k])
            else:
                sources = self.inputs[SOURCES, :k * q]
                gathered = pending.tokens.index_select(0, sources.clamp(min=0)).to(torch.int32)
                ids.copy_(torch.where(sources >= 0, gathered, ids))
        self.graphs[shape].replay()
        if greedy:
            return self.tokens[shape][:num_logits]
        return self.logits[shape][:num_logits].float()
