"""The kvforge:: custom ops: registered with fake implementations, so torch.compile traces a function
that rotates and stores K/V and attends through them in one graph (the model's attention on the GPU),
with the same results as calling the references."""

from __future__ import annotations

import pytest
import torch

from kvforge import ops
from kvforge.ops import library


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    blocks, bs, kv_heads, heads, dim = 6, 4, 2, 4, 8
    k_cache = torch.randn(blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks, bs, kv_heads, dim, generator=g)
    # two sequences: a prefill of 3 tokens after 2 cached ones, a decode at length 7
    q = torch.randn(4, heads, dim, generator=g)
    k = torch.randn(4, kv_heads, dim, generator=g)
    v = torch.randn(4, kv_heads, dim, generator=g)
    slots = torch.tensor([2, 3, 4, 14], dtype=torch.int32)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    lens = torch.tensor([5, 7], dtype=torch.int32)
    tables = torch.tensor([[0, 1], [5, 3]], dtype=torch.int32)
    cos, sin = ops.rope_cos_sin(torch.tensor([2, 3, 4, 6]), ops.rope_inv_freq(dim, 10000.0).float(), torch.float32)
    return q, k, v, cos, sin, k_cache, v_cache, slots, cu, lens, tables


def _step(q, k, v, cos, sin, k_cache, v_cache, slots, cu, lens, tables):
    q = torch.ops.kvforge.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    torch.ops.kvforge.paged_attention(q, k_cache, v_cache, cu, lens, tables, 0.35, out, lse, 3, 1)
    return out, lse


def test_the_ops_are_registered_under_the_kvforge_namespace():
    assert all(hasattr(torch.ops.kvforge, name) for name in ("store_kv", "rope_store_kv", "paged_attention"))


def test_the_custom_ops_equal_the_torch_references_on_cpu():
    q, k, v, cos, sin, k_cache, v_cache, slots, cu, lens, tables = _batch()
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ops.store_kv(ops.apply_rope(k, cos, sin), v, ref_k, ref_v, slots.long())
    ref_out, ref_lse = torch.empty_like(q), torch.empty(q.shape[:2])
    ops.paged_attention(ops.apply_rope(q, cos, sin), ref_k, ref_v, cu, lens, tables, 0.35, ref_out, ref_lse, 3, 1)
    out, lse = _step(q, k, v, cos, sin, k_cache, v_cache, slots, cu, lens, tables)
    torch.testing.assert_close(k_cache, ref_k)
    torch.testing.assert_close(v_cache, ref_v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_torch_compile_traces_the_ops_in_one_graph_and_gives_the_same_results():
    eager_inputs, compiled_inputs = _batch(1), _batch(1)
    expected = _step(*eager_inputs)
    compiled = torch.compile(_step, backend="aot_eager", fullgraph=True)
    got = compiled(*compiled_inputs)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(compiled_inputs[5], eager_inputs[5])  # the arena was written in place


def test_an_unknown_backend_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="torch, cpu, triton"):
        library.backend("cuda-magic")
