"""The Triton RoPE kernel against the torch reference (interpreted on CPU without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kvforge import ops  # noqa: E402
from kvforge.ops.triton.rope import apply_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, dim", [(9, 64), (3, 64), (4, 128)])
def test_triton_rope_equals_the_reference_on_strided_views_of_a_fused_projection(dtype, tol, heads, dim):
    tokens, kv_heads = 7, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEVICE).to(dtype)
    q = qkv[:, :heads * dim].view(tokens, heads, dim)  # a view with the fused row stride
    positions = torch.tensor([0, 1, 5, 17, 300, 4096, 70000], device=DEVICE)
    cos, sin = ops.rope_cos_sin(positions, ops.rope_inv_freq(dim, 500000.0).float().to(DEVICE), dtype)
    out = apply_rope(q, cos, sin)
    ref = ops.apply_rope(q.float(), cos.float(), sin.float())
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
