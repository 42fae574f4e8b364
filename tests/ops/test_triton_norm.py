"""RMSNorm, fused add + RMSNorm and SiLU-and-mul: the torch references against naive formulas and the
model's modules, and the Triton kernels against the references (CPU interpreter without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at @jit time

from kvforge import ops  # noqa: E402
from kvforge.model.llama import RMSNorm  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
EPS = 1e-5
# bf16: the interpreter truncates float32 -> bf16 where the GPU rounds to nearest, one ulp apart.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


# -- the torch references ----------------------------------------------------------------------------

def test_rms_norm_reference_is_the_naive_formula_and_the_model_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    w = torch.randn(40, generator=g, dtype=torch.float64)
    naive = x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w
    torch.testing.assert_close(ops.rms_norm(x.float(), w.float(), EPS), naive.float(), atol=1e-6, rtol=1e-6)
    module = RMSNorm(40, EPS).bfloat16()
    with torch.no_grad():
        module.weight.copy_(w)
    xb = x.bfloat16()
    assert torch.equal(ops.rms_norm(xb, module.weight.detach(), EPS), module(xb).detach())


def test_add_rms_norm_reference_adds_in_the_activation_dtype_then_normalizes():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(5, 32, generator=g).bfloat16(), torch.randn(5, 32, generator=g).bfloat16()
    w = torch.randn(32, generator=g).bfloat16()
    normed, total = ops.add_rms_norm(x, r, w, EPS)
    assert total.dtype == torch.bfloat16 and torch.equal(total, x + r)
    assert torch.equal(normed, ops.rms_norm(x + r, w, EPS))


def test_silu_and_mul_reference_is_gate_sigmoid_times_up():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2 * 24, generator=g, dtype=torch.float64)
    gate, up = x[:, :24], x[:, 24:]
    torch.testing.assert_close(ops.silu_and_mul(x), gate * torch.sigmoid(gate) * up)
    xb = x.bfloat16()
    assert torch.equal(ops.silu_and_mul(xb), F.silu(xb[:, :24]).mul_(xb[:, 24:]))  # the model's MLP


# -- the Triton kernels --------------------------------------------------------------------------------

triton = pytest.importorskip("triton")
from kvforge.ops.triton import norm as tnorm  # noqa: E402

SIZES = [(3, 100), (2, 1000)] + ([(512, 2048), (7, 8192)] if DEVICE == "cuda" else [(1, 8192)])


def _x(g, tokens, width, dtype, wide=False):
    """Rows of `width`, or (wide) a strided view into rows of width + 8."""
    if wide:
        return torch.randn(tokens, width + 8, generator=g).to(dtype).to(DEVICE)[:, 3:3 + width]
    return torch.randn(tokens, width, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_rms_norm_kernel_matches_the_reference(dtype, size):
    g = torch.Generator().manual_seed(size[1])
    x = _x(g, *size, dtype, wide=True)
    w = _x(g, 1, size[1], dtype)[0]
    out = tnorm.rms_norm(x, w, EPS)
    assert out.dtype == dtype and out.shape == size
    torch.testing.assert_close(out, ops.rms_norm(x, w, EPS), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_add_rms_norm_kernel_matches_the_reference_and_leaves_inputs_alone(dtype, size):
    g = torch.Generator().manual_seed(size[1] + 1)
    x, r = _x(g, *size, dtype), _x(g, *size, dtype, wide=True)
    w = _x(g, 1, size[1], dtype)[0]
    x0, r0 = x.clone(), r.clone()
    normed, total = tnorm.add_rms_norm(x, r, w, EPS)
    ref_normed, ref_total = ops.add_rms_norm(x, r, w, EPS)
    if INTERPRETED:
        torch.testing.assert_close(total, ref_total, **TOL[dtype])
    else:  # one round-to-nearest of the float32 sum, as torch does
        assert torch.equal(total, ref_total)
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])
    assert torch.equal(x, x0) and torch.equal(r, r0)


def test_rms_norm_kernel_promotes_like_torch_with_a_float32_weight():
    g = torch.Generator().manual_seed(3)
    x = _x(g, 4, 64, torch.bfloat16)
    w = torch.randn(64, generator=g).to(DEVICE)
    out = tnorm.rms_norm(x, w, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ops.rms_norm(x, w, EPS), **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("size", [(3, 2 * 100), (2, 2 * 1500)] + ([(64, 2 * 8192)] if DEVICE == "cuda" else []),
                         ids=str)
def test_silu_and_mul_kernel_matches_the_reference(dtype, size):
    g = torch.Generator().manual_seed(size[1] + 2)
    x = _x(g, *size, dtype, wide=True) * 4
    out = tnorm.silu_and_mul(x)
    assert out.dtype == dtype and out.shape == (size[0], size[1] // 2)
    torch.testing.assert_close(out, ops.silu_and_mul(x), **TOL[dtype])


def test_kernels_accept_zero_rows():
    empty = torch.zeros(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert tnorm.rms_norm(empty, w, EPS).shape == (0, 64)
    assert [t.shape for t in tnorm.add_rms_norm(empty, empty, w, EPS)] == [(0, 64), (0, 64)]
    assert tnorm.silu_and_mul(empty).shape == (0, 32)
