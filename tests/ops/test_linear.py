"""The linear op: its packed CPU path against F.linear, the fused SiLU-and-mul product, and the model's use of
them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvforge import ops
from kvforge.config import ModelConfig
from kvforge.model.llama import Linear, LlamaForCausalLM

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 7, 32, 256, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 64, generator=g)
    want = F.linear(x, w, b)
    assert torch.equal(ops.linear(x, w, b), want)
    got = ops.linear(x, w, b, ops.pack_weight(w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_linear_reads_a_strided_input():
    w = torch.randn(32, 48)
    x = torch.randn(10, 96)[:, ::2]  # not contiguous
    torch.testing.assert_close(ops.linear(x, w, None, ops.pack_weight(w)), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("packed", [False, True])
def test_silu_and_mul_linear_is_the_down_projection_of_silu_gate_times_up(backend, packed):
    from kvforge.ops.library import backend as kernels

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(6, 2 * 40, generator=g), torch.randn(24, 40, generator=g)
    want = F.linear(F.silu(x[:, :40]) * x[:, 40:], w)
    got = kernels(backend).silu_and_mul_linear(x, w, ops.pack_weight(w) if packed else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_linear_projects_the_normalized_residual_stream_and_returns_the_sum(backend, residual):
    from kvforge.ops.library import backend as kernels

    g = torch.Generator().manual_seed(6)
    x, r = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    norm_w, w, b = torch.randn(40, generator=g), torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    total = x + r if residual else x
    want = F.linear(ops.rms_norm(total, norm_w, 1e-5), w, b)
    got, got_total = kernels(backend).rms_norm_linear(x, r if residual else None, norm_w, 1e-5, w, b, ops.pack_weight(w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_total, total)
    if not residual:
        assert got_total is x  # the first layer's stream is its input, not a copy


def test_only_float32_cpu_weights_pack():
    assert ops.can_pack(torch.randn(4, 4))
    assert not ops.can_pack(torch.randn(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float32 CPU"):
        ops.pack_weight(torch.randn(4, 4, dtype=torch.float16))


def test_a_pack_does_not_follow_later_changes_to_the_weight():
    layer = Linear(8, 8, bias=False)
    layer.pack()
    x = torch.randn(4, 8)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer(x), before)  # the documented contract: pack after the weights are final


def _tiny() -> LlamaForCausalLM:
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_the_model_packs_every_projection_and_casting_drops_the_packs():
    model = _tiny()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert model.pack_linears() == len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down per layer; lm_head
    assert all(m.packed is not None for m in linears)
    model.to(torch.bfloat16)
    assert all(m.packed is None for m in linears)
    assert model.pack_linears() == 0  # bfloat16 weights stay on F.linear
