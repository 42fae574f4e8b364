"""The greedy-token kernel against its torch reference (interpreted on CPU, real shapes on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at @jit time

from kvforge import ops  # noqa: E402

triton = pytest.importorskip("triton")
from kvforge.ops.triton import sample as tsample  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5), (3, 4096), (5, 9000), (2, 49152)])
def test_greedy_tokens_kernel_matches_torch_argmax(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    assert torch.equal(tsample.greedy_tokens(logits), ops.greedy_tokens(logits))


def test_greedy_tokens_kernel_takes_the_first_of_tied_maxima_across_splits():
    logits = torch.zeros(4, 9000, device=DEVICE)
    logits[0, [7000, 100, 5000]] = 3.0  # tied in two splits: the first index wins
    logits[1, [8999, 4096]] = 1.0
    logits[2] = float("-inf")  # nothing but -inf: index 0, as torch
    logits[3, 4095] = 2.0
    logits[3, 4096] = 2.0
    assert tsample.greedy_tokens(logits).tolist() == [100, 4096, 0, 4095] == ops.greedy_tokens(logits).tolist()


def test_greedy_tokens_kernel_reads_strided_rows_and_no_rows():
    logits = torch.randn(6, 300, device=DEVICE)[::2, :250]
    assert torch.equal(tsample.greedy_tokens(logits), logits.argmax(dim=-1))
    assert tsample.greedy_tokens(torch.empty(0, 10, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="vocab > 0"):
        tsample.greedy_tokens(torch.empty(2, 0, device=DEVICE))
