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


@pytest.mark.parametrize("residual", [False, True], ids=["first-layer", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tiles", TILES, ids=str)
def test_rms_norm_gemv_normalizes_the_residual_stream_as_it_loads_it(residual, shape, tiles):
    x, w, b = _tensors(*shape, torch.bfloat16, seed=4)
    r = (torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 3).to(DEVICE, torch.bfloat16)
    norm_w = (1 + torch.rand(shape[1], generator=torch.Generator().manual_seed(6))).to(DEVICE, torch.bfloat16)
    res = r if residual else None
    got, total = tlinear.rms_norm_gemv(x, res, norm_w, 1e-5, w, b, tiles=tiles)
    want, want_total = ops.rms_norm_linear(x, res, norm_w, 1e-5, w, b)
    if INTERPRETED:  # it truncates float32 -> bf16 where the GPU rounds to nearest, one ulp apart
        torch.testing.assert_close(total, want_total, atol=1e-2, rtol=1.6e-2)
    else:  # one round-to-nearest of the float32 sum, as torch does
        assert torch.equal(total, want_total)
    _close(got, want, ops.rms_norm(want_total, norm_w, 1e-5), w)
    assert (total is x) == (not residual)


def test_rms_norm_gemv_rejects_a_norm_weight_or_residual_that_does_not_fit():
    x, w, _ = _tensors(24, 64, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="do not fit"):
        tlinear.rms_norm_gemv(x, None, torch.ones(32, dtype=x.dtype, device=DEVICE), 1e-5, w)
    with pytest.raises(ValueError, match="do not fit"):
        tlinear.rms_norm_gemv(x, torch.cat([x, x]), torch.ones(64, dtype=x.dtype, device=DEVICE), 1e-5, w)


def test_the_op_sends_one_low_precision_row_to_the_kernel_and_the_rest_to_torch():
    x, w, b = _tensors(24, 64, torch.bfloat16, seed=1)
    x3 = torch.cat([x, x, x])
    _close(tlinear.linear(x, w, b), ops.linear(x, w, b), x, w)
    assert torch.equal(tlinear.linear(x3, w, b), F.linear(x3, w, b))  # cuBLAS: bit-equal to the reference
    x32, w32 = x.float(), w.float()
    assert torch.equal(tlinear.linear(x32, w32), F.linear(x32, w32))  # float32 is the reference dtype
    wide = torch.cat([x3, x3], dim=1)
    assert torch.equal(tlinear.silu_and_mul_linear(wide, w), F.linear(tlinear.silu_and_mul(wide), w))
    norm_w = torch.ones(64, dtype=x.dtype, device=DEVICE)
    h, total = tlinear.add_rms_norm(x3, x3, norm_w, 1e-5)
    got, got_total = tlinear.rms_norm_linear(x3, x3, norm_w, 1e-5, w, b)
    assert torch.equal(got, F.linear(h, w, b)) and torch.equal(got_total, total)


def test_gemv_rejects_a_row_that_does_not_fit_the_weight():
    x, w, _ = _tensors(24, 64, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="does not fit"):
        tlinear.gemv(x[:, :32], w)
    with pytest.raises(ValueError, match="does not fit"):
        tlinear.gemv(x, w, silu_and_mul_input=True)  # needs [1, 2K]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("residual", [False, True], ids=["first-layer", "residual"])
@pytest.mark.parametrize("shape", [(4, 2, 16, 48), (3, 1, 8, 40)] + (
    [(32, 8, 64, 2048), (9, 3, 64, 576)] if DEVICE == "cuda" else []), ids=str)
def test_qkv_rope_store_kv_projects_rotates_and_stores_one_row_in_one_kernel(bias, residual, shape):
    heads, kv_heads, dim, hidden = shape
    g = torch.Generator().manual_seed(hidden + heads)
    n = (heads + 2 * kv_heads) * dim
    x, r = (torch.randn(1, hidden, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    norm_w = (1 + torch.rand(hidden, generator=g)).to(DEVICE, torch.bfloat16)
    w = (torch.randn(n, hidden, generator=g) / hidden ** 0.5).to(DEVICE, torch.bfloat16)
    b = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16) if bias else None
    angles = 37.0 * ops.rope_inv_freq(dim, 10000.0)[None, :]
    cos, sin = angles.cos().to(DEVICE, torch.bfloat16), angles.sin().to(DEVICE, torch.bfloat16)
    pages = [torch.zeros(3, 4, kv_heads, dim, dtype=torch.bfloat16, device=DEVICE) for _ in range(4)]
    slots = torch.tensor([6], device=DEVICE)
    res = r if residual else None
    q, total = tlinear.qkv_rope_store_kv(x, res, norm_w, 1e-5, w, b, heads, cos, sin, pages[0], pages[1], slots)
    want_q, want_total = ops.qkv_rope_store_kv(x, res, norm_w, 1e-5, w, b, heads, cos, sin, pages[2], pages[3], slots)
    torch.testing.assert_close(total, want_total, atol=1e-2, rtol=1.6e-2)
    # the projection's outputs differ by the reference's rounding of the normalized row; RoPE rotates them
    for got, want in ((q, want_q), (pages[0], pages[2]), (pages[1], pages[3])):
        torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=4e-2)
    assert pages[0].flatten(0, 1)[6].abs().sum() > 0 and pages[0].flatten(0, 1)[:6].abs().sum() == 0  # only slot 6
    skipped = [torch.zeros_like(pages[0]) for _ in range(2)]
    tlinear.qkv_rope_store_kv(x, res, norm_w, 1e-5, w, b, heads, cos, sin, *skipped, torch.tensor([-1], device=DEVICE))
    assert skipped[0].abs().sum() == 0 and skipped[1].abs().sum() == 0  # padding: nothing stored


def test_qkv_rope_store_kv_sends_several_rows_and_float32_to_the_unfused_ops():
    heads, kv_heads, dim, hidden = 4, 2, 16, 48
    g = torch.Generator().manual_seed(9)
    n = (heads + 2 * kv_heads) * dim
    for rows, dtype in ((3, torch.bfloat16), (1, torch.float32)):
        x = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
        w = torch.randn(n, hidden, generator=g).to(DEVICE, dtype)
        norm_w = torch.ones(hidden, dtype=dtype, device=DEVICE)
        cos, sin = torch.ones(rows, dim // 2, dtype=dtype, device=DEVICE), torch.zeros(rows, dim // 2, dtype=dtype,
                                                                                        device=DEVICE)
        pages = [torch.zeros(2, 4, kv_heads, dim, dtype=dtype, device=DEVICE) for _ in range(4)]
        slots = torch.arange(rows, device=DEVICE)
        q, _ = tlinear.qkv_rope_store_kv(x, None, norm_w, 1e-5, w, None, heads, cos, sin, pages[0], pages[1], slots)
        qkv, _ = tlinear.rms_norm_linear(x, None, norm_w, 1e-5, w)
        assert torch.equal(q, qkv[:, :heads * dim].reshape(rows, heads, dim))  # cos 1, sin 0: q unrotated
