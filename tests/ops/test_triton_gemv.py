"""The Triton linear op against the torch reference: the one-row matrix-vector kernel over odd and
even shapes, tiles, bias and the fused SiLU-and-mul input, and the shapes it leaves to cuBLAS (CPU
interpreter without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at @jit time

from kvforge import ops  # noqa: E402
from kvforge.ops.triton import gemv as tlinear  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
TILES = [None, tlinear.GemvTiles(4, 32, 2), tlinear.GemvTiles(16, 64, 4)]
SHAPES = [(24, 64), (37, 96), (5, 256)] + ([(3072, 2048), (2048, 8192), (128256, 2048)] if DEVICE == "cuda" else [])


def _tensors(n, k, dtype, seed, wide=False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    x = torch.randn(1, 2 * k if wide else k, generator=g).to(DEVICE, dtype)
    return x, w, torch.randn(n, generator=g).to(DEVICE, dtype)


def _close(got, want, x, w):
    """Within rounding of the reference: another summation order, and one rounding of each product's
    input (the interpreter truncates float32 -> bf16 where the GPU rounds to nearest) scaled by the
    sum of the products' magnitudes."""
    assert got.dtype == want.dtype and got.shape == want.shape
    bound = 2 ** -7 * (x.float().abs() @ w.float().abs().T + 2 * want.float().abs())
    assert ((got.float() - want.float()).abs() <= bound).all(), (got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tiles", TILES, ids=str)
def test_gemv_matches_the_reference_with_and_without_bias(dtype, shape, tiles):
    x, w, b = _tensors(*shape, dtype, seed=sum(shape))
    _close(tlinear.gemv(x, w, None, tiles=tiles), ops.linear(x, w), x, w)
    _close(tlinear.gemv(x, w, b, tiles=tiles), ops.linear(x, w, b), x, w)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tiles", TILES, ids=str)
def test_gemv_takes_silu_and_mul_of_its_input_as_it_loads_it(shape, tiles):
    x, w, _ = _tensors(*shape, torch.bfloat16, seed=3, wide=True)
    x = x * 4  # the SiLU's curved part
    _close(tlinear.gemv(x, w, None, silu_and_mul_input=True, tiles=tiles), ops.silu_and_mul_linear(x, w),
           ops.silu_and_mul(x), w)


def test_the_op_sends_one_low_precision_row_to_the_kernel_and_the_rest_to_torch():
    x, w, b = _tensors(24, 64, torch.bfloat16, seed=1)
    x3 = torch.cat([x, x, x])
    _close(tlinear.linear(x, w, b), ops.linear(x, w, b), x, w)
    assert torch.equal(tlinear.linear(x3, w, b), F.linear(x3, w, b))  # cuBLAS: bit-equal to the reference
    x32, w32 = x.float(), w.float()
    assert torch.equal(tlinear.linear(x32, w32), F.linear(x32, w32))  # float32 is the reference dtype
    wide = torch.cat([x3, x3], dim=1)
    assert torch.equal(tlinear.silu_and_mul_linear(wide, w), F.linear(tlinear.silu_and_mul(wide), w))


def test_gemv_rejects_a_row_that_does_not_fit_the_weight():
    x, w, _ = _tensors(24, 64, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="does not fit"):
        tlinear.gemv(x[:, :32], w)
    with pytest.raises(ValueError, match="does not fit"):
        tlinear.gemv(x, w, silu_and_mul_input=True)  # needs [1, 2K]
