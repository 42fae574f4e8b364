"""Host-to-device staging of a step's metadata: built once on the host, copied in one non-blocking
copy from pinned memory (the GPU path of the runner)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvforge.model.attention import VarlenBatch

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
               varlen: Sequence[VarlenRow], private: Sequence[VarlenRow]) -> dict:
        """Copy the step's metadata to the device in one copy. Returns device tensors (int32) under
        "ids", "positions", "slots", "rows" and the VarlenBatch of each list under "varlen" and
        "private" (None for an empty list)."""
        pieces: list[np.ndarray] = [np.asarray(x, dtype=np.int32) for x in (ids, positions, slots, rows)]
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
        at = 4
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
