"""Decode steps captured in CUDA graphs, one per batch-size bucket (nano-vllm's scheme).

Static input buffers hold the step's token ids, positions, slots, K/V lengths and block tables;
a step of n decodes fills the first n rows, pads the bucket with rows that store nothing (slot -1)
and attend to nothing (length 0), and replays the bucket's graph, which runs the whole model and
the logits. Graphs are captured largest first into one memory pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvforge.model.attention import AttentionMetadata, VarlenBatch, forward_context
from kvforge.model.staging import num_splits_for

if TYPE_CHECKING:
    from kvforge.model.runner import ModelRunner, TokenRun


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then multiples of 16, and `max_batch` itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    """The captured decode graphs of one runner (whose arena they read and write)."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks: int):
        if max_batch <= 0:
            raise ValueError(f"max_graph_batch must be positive, got {max_batch}")
        self.buckets = graph_buckets(max_batch)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        model, dev = runner.model, runner.device
        kv_heads = model.cfg.num_kv_heads
        with torch.inference_mode():
            # One int32 buffer: ids, positions, slots, K/V lengths ([4, max_batch]), and the tables.
            self.inputs = torch.zeros(4, max_batch, dtype=torch.int32, device=dev)
            self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=dev)
            self.cu = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)
            self.host_inputs = torch.zeros(4, max_batch, dtype=torch.int32, pin_memory=True)
            self.host_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, pin_memory=True)
            self.copied: torch.cuda.Event | None = None
            self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
            self.logits: dict[int, torch.Tensor] = {}
            ids, positions, slots, lengths = self.inputs
            slots.fill_(-1)
            pool = None
            for bs in reversed(self.buckets):
                meta = AttentionMetadata(
                    slot_mapping=slots[:bs], num_varlen_rows=bs,
                    varlen=VarlenBatch(self.cu[:bs + 1], lengths[:bs], self.tables[:bs], 1,
                                       num_splits_for(bs, kv_heads, max_blocks * runner.block_size, 1)))
                ctx = dataclasses.replace(runner.pages(), metadata=meta)

                def step(ctx=ctx, bs=bs) -> torch.Tensor:
                    with forward_context(ctx):
                        return model.compute_logits(model(ids[:bs], positions[:bs]))

                step()  # compile and warm the kernels outside the capture
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[bs] = step()
                pool = graph.pool()
                self.graphs[bs] = graph
            torch.cuda.synchronize(dev)

    def serves(self, runs: Sequence[TokenRun]) -> bool:
        """Whether a graph can run this step: only decodes of plain sequences that all need logits,
        at most `max_batch` of them, and none with more blocks than the static tables hold."""
        return len(runs) <= self.max_batch and all(
            len(r.token_ids) == 1 and r.composition is None and r.num_logits == 1
            and len(r.block_table) <= self.max_blocks for r in runs)

    def run(self, runs: Sequence[TokenRun]) -> torch.Tensor:
        """Replay the smallest bucket that holds `runs`; logits `[len(runs), vocab]` in run order
        (a view of the graph's output, valid until the next replay)."""
        n = len(runs)
        bs = next(b for b in self.buckets if b >= n)
        if self.copied is not None:
            self.copied.synchronize()  # the host buffers are free to rewrite
        host = self.host_inputs.numpy()
        host[0, :n] = [r.token_ids[0] for r in runs]
        host[1, :n] = [r.start_pos for r in runs]
        host[2, :n] = [r.slots[0] for r in runs]
        host[3, :n] = [r.start_pos + 1 for r in runs]
        host[:, n:bs] = 0
        host[2, n:bs] = -1
        nb = max(len(r.block_table) for r in runs)
        tables = self.host_tables.numpy()
        for i, r in enumerate(runs):
            tables[i, :len(r.block_table)] = r.block_table
        self.inputs[:, :bs].copy_(self.host_inputs[:, :bs], non_blocking=True)
        self.tables[:n, :nb].copy_(self.host_tables[:n, :nb], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        self.graphs[bs].replay()
        return self.logits[bs][:n]



