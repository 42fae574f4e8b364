"""ModelRunner: one step's scheduled token runs -> positions, slot mapping, block tables -> logits."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from kvforge import ops
from kvforge.config import ceil_div
from kvforge.model.attention import (
    AttentionMetadata,
    ChunkSegment,
    ComposedSpan,
    DecodeGroup,
    ForwardContext,
    PrefillSpan,
    forward_context,
    plan_cascade,
)
from kvforge.model.cuda_graphs import StepGraphs
from kvforge.model.llama import LlamaForCausalLM
from kvforge.model.staging import MAX_STEP_SEGMENTS, HostStaging, RunReads, SegmentStaging, segment_reads
from kvforge.types import Composition

# Decode rows are grouped by K/V length so short sequences are not padded to the longest one: a new
# group starts when a sequence is shorter than this fraction of its group's longest, once the group
# has at least MIN_GROUP rows (each group costs a few extra kernel calls per layer).
GROUP_LENGTH_RATIO = 0.6
MIN_GROUP = 8
# The rows of an eager step, and its (composed row, chunk segment) pairs, that the runner's segment
# batch holds (a step with more reads its chunks call by call, `plan_cascade`).
EAGER_SEGMENT_ROWS = 8192
EAGER_SEGMENT_PAIRS = 8192


class TokenRun(NamedTuple):
    """New tokens of one sequence to compute this step (a NamedTuple: a decode step builds one per
    sequence, at a fifth of a frozen dataclass's cost).

    Positions `start_pos .. start_pos + len(token_ids) - 1`; `slots` are their arena slots (already
    reserved by the cache manager); `block_table` covers every position up to the last new one.
    With a `composition`, `start_pos` counts the sequence's private tokens (see `Composition`),
    whose absolute positions the composition gives, and `block_table` holds only those.
    `needs_logits` asks for the logits of the last new token; `all_logits` for those of every new
    token (prompt log-probabilities). A `block_table` list is never modified once passed: a graph
    replay skips copying a table object its buffer row already holds (`pack_inputs`).
    """

    token_ids: Sequence[int]
    start_pos: int
    slots: Sequence[int]
    block_table: Sequence[int]
    needs_logits: bool
    composition: Composition | None = None
    all_logits: bool = False

    @property
    def num_logits(self) -> int:
        """Rows of logits this run gets: its new tokens' last `num_logits`."""
        return len(self.token_ids) if self.all_logits else int(self.needs_logits)


class DecodeStep(NamedTuple):
    """A decode step as columns, entry i for sequence i: one new token `token_ids[i]` at
    `positions[i]`, stored at `slots[i]`, its K/V through `block_tables[i]`, its logits returned;
    with `compositions`, sequence i is composed from chunks where `compositions[i]` is not None
    (`positions[i]` then counts its private tokens, as TokenRun.start_pos does). Async scheduling
    builds it with no TokenRun per plain sequence (`ModelRunner.run_decode`); the same contract as
    the equivalent runs (`runs()`), a table list never modified once passed."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[Sequence[int]]
    compositions: list[Composition | None] | None = None

    def runs(self) -> list[TokenRun]:
        compositions = self.compositions or [None] * len(self.token_ids)
        return [TokenRun([t], p, [s], b, True, c)
                for t, p, s, b, c in zip(self.token_ids, self.positions, self.slots, self.block_tables, compositions)]


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens the host has not read yet (async scheduling): `tokens` (int64 `[n]`, on the
    arena's device) are the previous step's sampled tokens; where `rows[i] >= 0`, run i is one token
    whose id is `tokens[rows[i]]` (its TokenRun holds a placeholder), gathered on the device. Where
    `rows[i]` is -1 the run's own token ids stand."""

    tokens: torch.Tensor
    rows: Sequence[int]


class ModelRunner:
    """Runs the model over a packed batch. Owns no cache state: the arena tensors are lent to it.

    The arena's device picks the path. On CPU, attention goes through the torch references (decode
    rows in length groups, prefills one by one). On CUDA, the step's metadata is built once on the
    host, copied in non-blocking copies from pinned memory, and every layer runs the Triton
    kernels (through the `kvforge::` custom ops when torch.compile traces it); with `cuda_graphs`, decode-only steps of up to
    `max_graph_batch` sequences replay a CUDA graph captured at construction (batch-size buckets,
    largest first, one memory pool), as do steps whose runs have at most q tokens each for every q in
    `graph_query_lens` (speculative verification: q = k + 1; see `cuda_graphs.py`), and nothing in a
    step waits for the device except reading the logits.
    """

    def __init__(self, model: LlamaForCausalLM, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 block_size: int, cuda_graphs: bool = False, max_graph_batch: int = 256,
                 max_model_len: int | None = None, k_scales: list[torch.Tensor | None] | None = None,
                 v_scales: list[torch.Tensor | None] | None = None, graph_query_lens: Sequence[int] = (1,)):
        self.model, self.k_caches, self.v_caches, self.block_size = model, k_caches, v_caches, block_size
        self.k_scales, self.v_scales = k_scales, v_scales  # quantized pages' scales (ops/quant.py), or None
        # int4 pages (ops/quant.py): keys stored before RoPE, read with a rope table of every
        # position; values stored rotated by a Hadamard matrix.
        self.rope_table = None
        self.rotated = k_scales is not None and ops.format_of(k_caches[0], k_scales[0]) in ops.ROTATED_FORMATS
        if self.rotated:
            self.rope_table = ops.rope_table(model.inv_freq, max_model_len or model.cfg.max_position_embeddings)
        self.device = k_caches[0].device
        self.on_gpu = self.device.type == "cuda"
        if cuda_graphs and not self.on_gpu:
            raise ValueError("cuda_graphs needs the arena on a CUDA device")
        self.staging = HostStaging(self.device, model.cfg.num_kv_heads) if self.on_gpu else None
        max_blocks = ceil_div(max_model_len or model.cfg.max_position_embeddings, block_size)
        # Eager steps with composed rows read their chunks as one segment batch, as cascade graphs do
        # (plain pages only, which StepGraphs reads off `segments`), with masks for recomputed tokens
        # and causality.
        self.segments = None
        if self.on_gpu and (k_scales is None or k_scales[0] is None):
            self.segments = SegmentStaging(EAGER_SEGMENT_ROWS, max_blocks, model.inv_freq, model.cfg.num_kv_heads,
                                           self.device, max_pairs=EAGER_SEGMENT_PAIRS, max_masks=MAX_STEP_SEGMENTS,
                                           max_keys=max_blocks * block_size)
        self.graphs = None
        if cuda_graphs:
            self.graphs = StepGraphs(self, max_graph_batch, max_blocks, graph_query_lens)

    @torch.inference_mode()
    def run(self, runs: Sequence[TokenRun], pending: PendingTokens | None = None) -> torch.Tensor:
        """Compute every run; return float32 logits (on the arena's device): `num_logits` rows per run
        (the last new token's with `needs_logits`, every new token's with `all_logits`), in the order
        the runs were given. Writes the runs' K/V into their slots. With `pending`, some runs' input
        token is still on the device (see PendingTokens), gathered there without waiting."""
        if not runs:
            raise ValueError("run() needs at least one token run")
        num_tokens = [len(c.token_ids) for c in runs]
        if 0 in num_tokens or num_tokens != [len(c.slots) for c in runs]:
            i = next(i for i, c in enumerate(runs) if not c.token_ids or len(c.slots) != len(c.token_ids))
            raise ValueError(f"run {i}: {num_tokens[i]} tokens but {len(runs[i].slots)} slots")
        if pending is not None and (len(pending.rows) != len(runs) or (max(num_tokens) > 1 and any(
                i >= 0 and n != 1 for n, i in zip(num_tokens, pending.rows)))):
            raise ValueError("pending tokens need one row (or -1) per run, and only one-token runs can be pending")
        shape = None if self.graphs is None else self.graphs.shape_for(runs)
        if shape is not None:
            return self.graphs.run(runs, shape, pending)
        return self._forward(runs, self.pages(), pending=pending)

    @torch.inference_mode()
    def run_decode(self, step: DecodeStep, pending: PendingTokens | None = None) -> torch.Tensor:
        """The greedy token (int64, on the arena's device) of each sequence of `step`: `run(step.runs(),
        pending)`'s argmax, taken inside the decode graph when one runs the step (no logits leave
        it), so it is valid until that graph's next replay. A plain step is packed straight from the
        columns (the host's share of a batched decode step is per sequence); a step with composed
        sequences goes through a cascade decode graph, or eagerly."""
        k = len(step.token_ids)
        if not k or not len(step.positions) == len(step.slots) == len(step.block_tables) == k:
            raise ValueError(f"a decode step needs one position, slot and block table per token, got {k} tokens")
        if pending is not None and len(pending.rows) != k:
            raise ValueError("pending tokens need one row (or -1) per run, and only one-token runs can be pending")
        graphs = self.graphs
        if graphs is not None and step.compositions is None:
            shape = graphs.decode_shape(step)
            if shape is not None:
                return graphs.run_decode(step, shape, pending, greedy=True)
        runs = step.runs()
        if graphs is not None and step.compositions is not None:
            shape = graphs.cascade_shape(runs)
            if shape is not None:
                return graphs.run(runs, shape, pending, greedy=True)
        return ops.greedy_tokens(self.run(runs, pending))  # an eager step: one argmax launch

    def pages(self) -> ForwardContext:
        """The arena as a forward context sees it (metadata filled in per step)."""
        return ForwardContext(None, self.k_caches, self.v_caches, self.model.inv_freq, self.k_scales, self.v_scales,
                              self.rope_table, self.rotated)

    def _forward(self, runs: Sequence[TokenRun], pages: ForwardContext, num_layers: int | None = None,
                 pending: PendingTokens | None = None) -> torch.Tensor:
        """One eager forward of `runs` over the arena tensors of `pages`; logits of the runs that need
        them (or, with `num_layers`, nothing: the probe's K/V are what it is for). `pending`: the runs'
        input tokens still on the device, gathered into the step's ids there."""
        # Packed order: decodes (one new token each), longest K/V first; then prefills; then the
        # sequences composed from document chunks.
        plain = [i for i, c in enumerate(runs) if c.composition is None]
        decodes = sorted((i for i in plain if len(runs[i].token_ids) == 1), key=lambda i: -runs[i].start_pos)
        prefills = [i for i in plain if len(runs[i].token_ids) > 1]
        composed = [i for i, c in enumerate(runs) if c.composition is not None]
        # On the GPU, composed rows join the plain rows' varlen batch (their private K/V) and read their
        # chunks through one segment batch (when it holds the step), each row the keys it sees.
        reads: dict[int, RunReads] | None = None  # composed run -> its rows' chunk reads
        if composed and self.segments is not None:
            first = sum(len(runs[i].token_ids) for i in decodes + prefills)
            reads = {}
            for i in composed:
                reads[i] = segment_reads(runs[i], first)
                first += len(runs[i].token_ids)
            if not self.segments.fits([(r.num_pairs, r.placements) for r in reads.values()], first):
                reads = None
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        end_of: dict[int, int] = {}  # run -> its rows end here (exclusive)
        spans, composed_spans = [], []
        private: list[tuple[int, int, Sequence[int]]] = []  # composed runs: (new tokens, K/V length, table)
        for i in decodes + prefills + composed:
            c = runs[i]
            n = len(c.token_ids)
            start = len(ids)
            ids.extend(c.token_ids)
            if c.composition is None:
                positions.extend(range(c.start_pos, c.start_pos + n))
                if n > 1 and not self.on_gpu:
                    spans.append(PrefillSpan(start, n, c.start_pos, _table_tensor(c.block_table)))
            elif reads is not None:  # the new rows' positions; their reads are packed below
                positions.extend(reads[i].positions)
            else:
                own = [c.composition.position(j) for j in range(c.start_pos + n)]  # every private token so far
                positions.extend(own[c.start_pos:])
                composed_spans.append(self._composed_span(start, c, own, self.device))
                private.append((n, c.start_pos + n, c.block_table))
            slots.extend(c.slots)
            end_of[i] = start + n
        # packed rows whose token is pending, and the pending row each one reads
        gather = ([], []) if pending is None else ([end_of[i] - 1 for i, r in enumerate(pending.rows) if r >= 0],
                                                   [r for r in pending.rows if r >= 0])
        rows = [r for i, c in enumerate(runs) for r in range(end_of[i] - c.num_logits, end_of[i])]
        composed_spans = tuple(composed_spans)
        cascade = plan_cascade(composed_spans, self.device) if composed_spans else ()
        if self.on_gpu:
            in_varlen = decodes + prefills + (composed if reads is not None else [])
            varlen = [(len(runs[i].token_ids), runs[i].start_pos + len(runs[i].token_ids), runs[i].block_table)
                      for i in in_varlen]
            dev = self.staging.upload(ids=ids, positions=positions, slots=slots, rows=rows,
                                      varlen=varlen, private=private, gather=gather)
            segments = None
            if reads is not None:
                self.segments.pack(list(reads.values()), len(ids))
                self.segments.upload()
                segments = self.segments.batch(len(ids), packed=True)
            meta = AttentionMetadata(
                slot_mapping=dev["slots"], composed=composed_spans,
                varlen=dev["varlen"] if in_varlen else None,
                num_varlen_rows=sum(len(runs[i].token_ids) for i in in_varlen),
                cascade=cascade, private=dev["private"] if private else None, segments=segments)
            ids_t, positions_t, rows_t = dev["ids"], dev["positions"], dev["rows"]
            gather_at, gather_src = dev["gather"]
        else:
            meta = AttentionMetadata(
                slot_mapping=torch.tensor(slots, dtype=torch.long),
                decodes=self._decode_groups([runs[i] for i in decodes]),
                prefills=tuple(spans), composed=composed_spans, cascade=cascade)
            ids_t, positions_t = torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
            rows_t = torch.tensor(rows, dtype=torch.long)
            gather_at, gather_src = (torch.tensor(g, dtype=torch.long) for g in gather)
        if gather[0]:
            ids_t.index_copy_(0, gather_at.long(), pending.tokens.index_select(0, gather_src).to(ids_t.dtype))
        ctx = dataclasses.replace(pages, metadata=meta)
        with forward_context(ctx):
            hidden = self.model(ids_t, positions_t, num_layers=num_layers)
        if num_layers is not None:
            return hidden
        return self.model.compute_logits(hidden.index_select(0, rows_t))

    @staticmethod
    def _composed_span(start: int, c: TokenRun, own_positions: list[int], device: torch.device) -> ComposedSpan:
        """The cascade metadata of a composed sequence's rows: what each row may see at each level.
        `own_positions` are the absolute positions of its private tokens up to the last new one."""
        comp, n = c.composition, len(c.token_ids)
        own_pos = torch.tensor(own_positions)[None, :]  # [1, private_len]
        q_pos = own_pos[0, c.start_pos:, None]  # [n, 1]
        segments, rows, biases = [], [], []
        for p in comp.placements:
            table = torch.tensor(p.page_indices, dtype=torch.int32 if device.type == "cuda" else torch.long)
            segments.append(ChunkSegment((p.chunk_id, p.offset), p.level, table.to(device), p.num_tokens, p.offset))
            hidden = (p.offset + torch.arange(p.num_tokens))[None, :] > q_pos  # [n, chunk]
            if p.recomputed:
                hidden[:, list(p.recomputed)] = True
            # Rows are in position order and see more of a chunk the later they sit: the rows that
            # see any key are a suffix.
            sees = (~hidden).any(dim=1)
            first = int(sees.int().argmax()) if sees.any() else n
            rows.append(first)
            hidden = hidden[first:]
            biases.append(torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf")) if hidden.any() else None)
        causal = own_pos > q_pos
        private = torch.zeros(causal.shape).masked_fill_(causal, float("-inf")) if causal.any() else None
        return ComposedSpan(start, n, tuple(segments), tuple(rows), tuple(biases),
                            _table_tensor(c.block_table), private, own_pos.shape[1])

    @torch.inference_mode()
    def kv_deviation(self, token_ids: Sequence[int], segments: Sequence[tuple[Sequence[int], int, int]],
                     layer: int) -> list[torch.Tensor]:
        """How far each chunk token's stored K/V is from its K/V in context, at `layer`.

        Runs the first `layer + 1` layers over `token_ids` at positions 0..T-1 with full causal
        attention, into scratch tensors (the arena is only read). For each segment (page ids,
        offset, length) returns `[length]`: the squared distance between the K/V computed in context
        at positions offset.. and the chunk's stored K/V (keys re-rotated to offset), summed over
        heads and dims."""
        t, bs = len(token_ids), self.block_size
        nb = ceil_div(t, bs)
        scratch = self._scratch_pages(nb, layer + 1)
        probe = TokenRun(list(token_ids), 0, range(t), range(nb), needs_logits=False)
        self._forward([probe], scratch, num_layers=layer + 1)
        k_full = scratch.k_caches[layer].flatten(0, 1)[:t].float()
        v_full = scratch.v_caches[layer].flatten(0, 1)[:t].float()
        quant = self.pages().scales(layer)
        out = []
        for pages, offset, n in segments:
            table = torch.tensor(list(pages), device=self.device)
            k = ops.chunk_keys(self.k_caches[layer], table, n, offset, self.model.inv_freq, quant.get("k_scale"),
                               self.rope_table).float()
            v = ops.gather_seq_kv(self.v_caches[layer], table, n, quant.get("v_scale"))
            v = ops.hadamard_transform(v) if self.rotated else v.float()  # int4 values are stored rotated
            dk = (k_full[offset:offset + n] - k).pow(2).sum(dim=(1, 2))
            dv = (v_full[offset:offset + n] - v).pow(2).sum(dim=(1, 2))
            out.append(dk + dv)
        return out

    @torch.inference_mode()
    def full_precision_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits `[vocab]` of the last of `token_ids` (positions 0..T-1), computed from
        scratch with K/V in the model's dtype whatever the arena's format: the reference a quantized
        cache is measured against. The arena is not touched."""
        t = len(token_ids)
        nb = ceil_div(t, self.block_size)
        probe = TokenRun(list(token_ids), 0, range(t), range(nb), needs_logits=True)
        return self._forward([probe], self._scratch_pages(nb, self.model.cfg.num_layers))[0]

    def _scratch_pages(self, num_blocks: int, num_layers: int) -> ForwardContext:
        """Fresh unquantized pages of `num_blocks` blocks for the first `num_layers` layers."""
        cfg = self.model.cfg
        shape = (num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        dtype = self.model.embed_tokens.weight.dtype
        k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        return ForwardContext(None, k, v, self.model.inv_freq)

    def _decode_groups(self, runs: list[TokenRun]) -> tuple[DecodeGroup, ...]:
        """Split decode rows (sorted longest first) into groups with padded block tables and masks."""
        groups, start = [], 0
        while start < len(runs):
            longest = runs[start].start_pos + 1
            end = start + 1
            while end < len(runs) and (end - start < MIN_GROUP
                                         or runs[end].start_pos + 1 >= GROUP_LENGTH_RATIO * longest):
                end += 1
            members = runs[start:end]
            nb = len(members[0].block_table)
            tables = torch.tensor([list(c.block_table) + [c.block_table[0]] * (nb - len(c.block_table))
                                   for c in members], dtype=torch.long)
            lengths = torch.tensor([c.start_pos + 1 for c in members], dtype=torch.long)
            groups.append(DecodeGroup(start, end - start, tables, lengths))
            start = end
        return tuple(groups)


def _table_tensor(table: Sequence[int]) -> torch.Tensor:
    """A block table as an int64 CPU tensor, converted through numpy (a quarter of `torch.tensor`'s cost
    on a list of a long prompt's 2048 block ids)."""
    return torch.from_numpy(np.array(table, dtype=np.int64))
