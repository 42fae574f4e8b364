"""ModelRunner: one step's scheduled token runs -> positions, slot mapping, block tables -> logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvforge.model.attention import AttentionMetadata, ForwardContext, PrefillSpan, forward_context
from kvforge.model.llama import LlamaForCausalLM


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
        # Packed order: decodes (one new token) first, batched; then prefills, one span each.
        decodes = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
        prefills = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        order = decodes + prefills
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_of: dict[int, int] = {}
        spans = []
        for i in order:
            c = chunks[i]
            n = len(c.token_ids)
            if n == 0 or len(c.slots) != n:
                raise ValueError(f"chunk {i}: {n} tokens but {len(c.slots)} slots")
            start = len(ids)
            ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + n))
            slots.extend(c.slots)
            row_of[i] = start + n - 1
            if n > 1:
                spans.append(PrefillSpan(start, n, c.start_pos, torch.tensor(list(c.block_table), dtype=torch.long)))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decodes=len(decodes),
            prefills=tuple(spans),
            **self._decode_tables([chunks[i] for i in decodes]),
        )
        ctx = ForwardContext(meta, self.k_caches, self.v_caches)
        with forward_context(ctx):
            hidden = self.model(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long))
        rows = [row_of[i] for i, c in enumerate(chunks) if c.needs_logits]
        return self.model.compute_logits(hidden[rows])

    def _decode_tables(self, chunks: list[SequenceChunk]) -> dict[str, torch.Tensor]:
        """Padded block tables and the valid-position mask for the decode rows."""
        if not chunks:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return {"decode_block_tables": empty, "decode_kv_mask": torch.zeros(0, self.block_size, dtype=torch.bool)}
        nb = max(len(c.block_table) for c in chunks)
        tables = torch.tensor([list(c.block_table) + [c.block_table[0]] * (nb - len(c.block_table)) for c in chunks],
                              dtype=torch.long)
        lengths = torch.tensor([c.start_pos + 1 for c in chunks], dtype=torch.long)
        mask = torch.arange(nb * self.block_size)[None, :] < lengths[:, None]
        return {"decode_block_tables": tables, "decode_kv_mask": mask}
