"""Greedy sampling in Triton: same signature and result as `kvforge.ops.sample` (the torch reference).

Two launches whose sizes depend only on the logits' shape (so a CUDA graph captures them):

    grid (rows, column splits)    each program: the largest logit of BLOCK columns and its first index
    grid (rows,)                  the best of a row's splits, the first on ties

torch's own argmax gives each row to few blocks: at 64 rows x a 128k vocabulary it takes ~40 us on
an H200, where the split form reads the logits at memory speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # columns per program of the first launch


@triton.jit
def _split_argmax_kernel(x_ptr, best_ptr, index_ptr, vocab, stride_x, splits, BLOCK: tl.constexpr):
    row, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = split * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN wins, as in torch.argmax (counted as +inf)
    top = tl.max(x, 0)
    first = tl.min(tl.where(x == top, cols, vocab), 0)  # vocab: a split of -inf only loses every tie
    tl.store(best_ptr + row * splits + split, top)
    tl.store(index_ptr + row * splits + split, first)


@triton.jit
def _pick_kernel(best_ptr, index_ptr, out_ptr, splits, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK)
    ok = s < splits
    best = tl.load(best_ptr + row * splits + s, mask=ok, other=float("-inf"))
    index = tl.load(index_ptr + row * splits + s, mask=ok, other=vocab)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, index, vocab), 0)
    tl.store(out_ptr + row, first.to(tl.int64))  # a row of -inf only: 0, as torch.argmax


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """`kvforge.ops.sample.greedy_tokens` in Triton: int64 `[n]`, each row's first largest logit."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"greedy_tokens needs logits [n, vocab] with vocab > 0, got {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    splits = triton.cdiv(vocab, _BLOCK)
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n:
        best = torch.empty(n, splits, dtype=torch.float32, device=logits.device)
        index = torch.empty(n, splits, dtype=torch.int32, device=logits.device)
        _split_argmax_kernel[(n, splits)](logits, best, index, vocab, logits.stride(0), splits, BLOCK=_BLOCK,
                                          num_warps=8)
        _pick_kernel[(n,)](best, index, out, splits, vocab, BLOCK=triton.next_power_of_2(splits), num_warps=1)
    return out
