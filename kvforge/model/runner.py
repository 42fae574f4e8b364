"""ModelRunner: one step's scheduled token runs -> positions, slot mapping, block tables -> logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvforge import ops
from kvforge.model.attention import AttentionMetadata, DecodeGroup, ForwardContext, PrefillSpan, forward_context
from kvforge.model.llama import LlamaForCausalLM

# Decode rows are grouped by K/V length so short sequences are not padded to the longest one: a new
# group starts when a sequence is shorter than this fraction of its group's longest, once the group
# has at least MIN_GROUP rows (each group costs a few extra kernel calls per layer).
GROUP_LENGTH_RATIO = 0.6
MIN_GROUP = 8


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence to compute this step.

    Positions `start_pos .. start_pos + len(token_ids) - 1`; `slots` are their arena slots (already
    reserved by the cache manager); `block_table` covers every position up to the last new one.
    """

    token_ids: Sequence[int]
    start_pos: int
    slots: Sequence[int]
    block_table: Sequence[int]
    needs_logits: bool


class ModelRunner:
    """Runs the model over a packed batch. Owns no cache state: the arena tensors are lent to it."""

    def __init__(self, model: LlamaForCausalLM, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 block_size: int):
        self.model, self.k_caches, self.v_caches, self.block_size = model, k_caches, v_caches, block_size

    @torch.inference_mode()
    def run(self, chunks: Sequence[SequenceChunk]) -> torch.Tensor:
        """Compute every chunk; return float32 logits `[n, vocab]` for the chunks with `needs_logits`,
        in the order they were given. Writes the chunks' K/V into their slots."""
        if not chunks:
            raise ValueError("run() needs at least one chunk")
        for i, c in enumerate(chunks):
            if not c.token_ids or len(c.slots) != len(c.token_ids):
                raise ValueError(f"chunk {i}: {len(c.token_ids)} tokens but {len(c.slots)} slots")
        # Packed order: decodes (one new token each), longest K/V first, in groups; then prefills.
        decodes = sorted((i for i, c in enumerate(chunks) if len(c.token_ids) == 1),
                         key=lambda i: -chunks[i].start_pos)
        prefills = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_of: dict[int, int] = {}
        spans = []
        for i in decodes + prefills:
            c = chunks[i]
            n = len(c.token_ids)
            start = len(ids)
            ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + n))
            slots.extend(c.slots)
            row_of[i] = start + n - 1
            if n > 1:
                spans.append(PrefillSpan(start, n, c.start_pos, torch.tensor(list(c.block_table), dtype=torch.long)))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            decodes=self._decode_groups([chunks[i] for i in decodes]),
            prefills=tuple(spans),
        )
        ctx = ForwardContext(meta, self.k_caches, self.v_caches)
        with forward_context(ctx):
            hidden = self.model(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long))
        rows = [row_of[i] for i, c in enumerate(chunks) if c.needs_logits]
        return self.model.compute_logits(hidden[rows])

    def _decode_groups(self, chunks: list[SequenceChunk]) -> tuple[DecodeGroup, ...]:
        """Split decode rows (sorted longest first) into groups with padded block tables and masks."""
        groups, start = [], 0
        while start < len(chunks):
            longest = chunks[start].start_pos + 1
            end = start + 1
            while end < len(chunks) and (end - start < MIN_GROUP
                                         or chunks[end].start_pos + 1 >= GROUP_LENGTH_RATIO * longest):
                end += 1
            members = chunks[start:end]
            nb = len(members[0].block_table)
            tables = torch.tensor([list(c.block_table) + [c.block_table[0]] * (nb - len(c.block_table))
                                   for c in members], dtype=torch.long)
            lengths = torch.tensor([c.start_pos + 1 for c in members], dtype=torch.long)
            bias = ops.kv_bias_from_lengths(lengths, nb * self.block_size, torch.float32)
            groups.append(DecodeGroup(start, end - start, tables, bias))
            start = end
        return tuple(groups)
