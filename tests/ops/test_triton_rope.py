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


def _layer_inputs(dtype, heads=9, kv_heads=3, dim=64, tokens=6, blocks=5, block_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # strided views, as the model's
    positions = torch.tensor([0, 3, 17, 300, 4096, 9][:tokens], device=DEVICE)
    cos, sin = ops.rope_cos_sin(positions, ops.rope_inv_freq(dim, 10000.0).float().to(DEVICE), dtype)
    cache = torch.randn(2, blocks, block_size, kv_heads, dim, generator=g).to(DEVICE, dtype)
    return (q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim), cos, sin,
            cache[0], cache[1])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_rope_store_kv_kernel_rotates_q_and_k_and_stores_k_v_as_the_reference(dtype, tol, slot_dtype):
    from kvforge.ops.triton.attention import rope_store_kv

    q, k, v, cos, sin, k_cache, v_cache = _layer_inputs(dtype)
    slots = torch.tensor([7, -1, 0, 19, 8, -1], dtype=slot_dtype, device=DEVICE)  # -1: padding rows
    ref_k, ref_v = k_cache.float().clone(), v_cache.float().clone()
    want = ops.rope_store_kv(q.float(), k.float(), v.float(), cos.float(), sin.float(), ref_k, ref_v, slots)
    got = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache.float(), ref_k, atol=tol, rtol=tol)
    assert torch.equal(v_cache.float(), ref_v)  # values are copied, untouched by RoPE, padding rows skipped


def test_rope_store_kv_reference_is_apply_rope_then_store_kv():
    q, k, v, cos, sin, k_cache, v_cache = (t.cpu() for t in _layer_inputs(torch.float32, seed=1))
    slots = torch.tensor([3, 4, 5, 6, 7, -1])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ops.store_kv(ops.apply_rope(k, cos, sin), v, ref_k, ref_v, slots)
    assert torch.equal(ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots), ops.apply_rope(q, cos, sin))
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_rope_store_kv_kernel_refuses_quantized_pages_and_misfit_shapes():
    from kvforge.ops.triton.attention import rope_store_kv

    q, k, v, cos, sin, k_cache, v_cache = _layer_inputs(torch.float32)
    slots = torch.arange(6, device=DEVICE)
    with pytest.raises(ValueError, match="plain, contiguous pages"):
        rope_store_kv(q, k, v, cos, sin, k_cache.to(torch.int8), v_cache.to(torch.int8), slots)
    with pytest.raises(ValueError, match="do not fit"):
        rope_store_kv(q, k, v[:, :2], cos, sin, k_cache, v_cache, slots)
