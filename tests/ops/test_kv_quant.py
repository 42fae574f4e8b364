"""Quantized KV pages (ops/quant.py): round-trip error bounds per format, the int4 key blocks'
re-quantization as a block fills, and attention over quantized pages against float attention."""

import pytest
import torch

from kvforge import ops

BS, H, D = 4, 2, 8
QUANTIZED = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
INV_FREQ = ops.rope_inv_freq(D, 10000.0).float()
ROPE = ops.rope_table(INV_FREQ, 128)  # int4 pages hold keys before RoPE: their readers rotate with it


def _arena(fmt, num_blocks=6, dtype=torch.float32):
    layout = ops.kv_layout(fmt, BS, H, D, dtype)
    return layout, layout.allocate(num_blocks, BS, H, torch.device("cpu"))


# Relative error bound per element, as a fraction of the row's (per-token formats) or the block
# channel's (int4 keys) range: half a quantization step (int4 values: half the widest gap between
# codebook levels), plus float16 rounding of the scales.
_INT4_GAP = max(b - a for a, b in zip(ops.INT4_VALUE_LEVELS, ops.INT4_VALUE_LEVELS[1:]))
ROW_BOUND = {"int8": 0.5 / 127 + 2e-3, "int4": 0.5 * _INT4_GAP + 2e-3, "fp8_e4m3": 2 ** -4 + 2e-3,
             "fp8_e5m2": 2 ** -3 + 2e-3}


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_row_round_trip_error_is_within_half_a_step_of_the_rows_absmax(fmt):
    torch.manual_seed(0)
    x = torch.randn(32, H, D) * torch.logspace(-3, 2, 32)[:, None, None]
    data, scale = ops.quantize_rows(x, fmt)
    y = ops.dequantize_rows(data, scale)
    err = (y - x).abs().amax(dim=-1)
    bound = ROW_BOUND[fmt] * x.abs().amax(dim=-1)
    assert (err <= bound + 1e-7).all(), (err / x.abs().amax(dim=-1)).max()


def test_int4_values_are_stored_as_the_nearest_codebook_level():
    torch.manual_seed(7)
    x = torch.randn(64, H, D)
    data, scale = ops.quantize_rows(x, "int4")
    y = ops.dequantize_rows(data, scale)
    levels = torch.tensor(ops.INT4_VALUE_LEVELS)
    codebook = torch.cat((-levels.flip(0), levels))[None, None, None, :] * scale.float()[..., None, None]
    codebook = codebook.expand(*x.shape, 16)
    nearest = codebook.gather(-1, (x[..., None] - codebook).abs().argmin(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(y, nearest, rtol=0, atol=1e-6)


def test_int4_value_codebook_has_less_error_on_normal_rows_than_evenly_spaced_levels():
    torch.manual_seed(8)
    x = torch.randn(4096, 1, 64)  # what Hadamard-rotated value rows look like
    codebook_mse = (ops.dequantize_rows(*ops.quantize_rows(x, "int4")) - x).pow(2).mean()
    step = x.abs().amax(-1, keepdim=True) / 7  # 15 levels from -absmax to absmax
    even_mse = ((x / step).round().clamp(-7, 7) * step - x).pow(2).mean()
    assert codebook_mse < 0.8 * even_mse, (codebook_mse, even_mse)


def test_zero_rows_round_trip_to_zero_in_every_format():
    for fmt in QUANTIZED:
        data, scale = ops.quantize_rows(torch.zeros(3, H, D), fmt)
        assert torch.equal(ops.dequantize_rows(data, scale), torch.zeros(3, H, D))


def test_int4_channel_blocks_keep_each_channels_offset_and_range():
    torch.manual_seed(0)
    # A channel with a large offset and a small spread, beside channels near zero: per channel,
    # each keeps its own 16 levels.
    x = torch.randn(2, BS, H, D) * 0.1
    x[..., 3] += 50.0
    codes, scale = ops.quantize_channels(x, torch.ones(2, BS, dtype=torch.bool))
    y = ops.dequantize_channels(codes, scale)
    spread = x.amax(dim=1) - x.amin(dim=1)  # [2, H, D]
    assert ((y - x).abs() <= (spread / 15 * 0.5 + 0.05)[:, None]).all()
    assert (y[..., 0] - x[..., 0]).abs().max() < 0.02


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_store_then_gather_dequantizes_what_was_stored_in_block_table_order(fmt):
    torch.manual_seed(1)
    layout, (kc, vc, ks, vs) = _arena(fmt)
    k, v = torch.randn(7, H, D), torch.randn(7, H, D)
    slots = torch.tensor([8, 9, 10, 11, 4, 5, 6])  # block 2 whole, then block 1 partly
    ops.store_kv(k, v, kc, vc, slots, ks, vs)
    table = torch.tensor([2, 1])
    gk = ops.gather_seq_kv(kc, table, 7, ks, ROPE)
    gv = ops.gather_seq_kv(vc, table, 7, vs)
    if fmt == "int4":  # keys stored before RoPE come back rotated to their positions 0..6
        k = ops.rope_keys(k, ROPE)
    tol = 0.6 if fmt in ("int4", "fp8_e5m2") else 0.2
    assert gk.dtype == torch.float32
    assert (gk - k).abs().max() < tol and (gv - v).abs().max() < tol


def test_int4_keys_are_rotated_to_their_positions_as_they_are_read():
    """Keys go into int4 pages before RoPE; every reader rotates key i of a sequence to position i
    (a chunk read at an offset: to offset + i), whatever block holds it."""
    torch.manual_seed(5)
    _, (kc, vc, ks, vs) = _arena("int4")
    k = torch.randn(6, H, D)
    ops.store_kv(k, k, kc, vc, torch.tensor([20, 21, 22, 23, 12, 13]), ks, vs)  # blocks 5, then 3
    stored = ops.dequantize_blocks(kc, ks, torch.tensor([5, 3])).flatten(0, 1)[:6]  # before RoPE
    assert (stored - k).abs().max() < 0.3
    read = ops.gather_seq_kv(kc, torch.tensor([5, 3]), 6, ks, ROPE)
    cos, sin = ops.rope_cos_sin(torch.arange(6), INV_FREQ, torch.float32)
    torch.testing.assert_close(read, ops.apply_rope(stored, cos, sin))
    cos, sin = ops.rope_cos_sin(torch.arange(100, 106), INV_FREQ, torch.float32)
    at_100 = ops.gather_seq_kv(kc, torch.tensor([5, 3]), 6, ks, ROPE, start=100)
    torch.testing.assert_close(at_100, ops.apply_rope(stored, cos, sin))
    with pytest.raises(ValueError, match="before RoPE"):
        ops.gather_seq_kv(kc, torch.tensor([5, 3]), 6, ks)


def test_hadamard_transform_is_the_orthogonal_sylvester_matrix_and_spreads_an_outlier_channel():
    h = ops.hadamard_transform(torch.eye(64))
    assert (h.abs() == 1 / 8).all() and (h[0] > 0).all() and torch.equal(h, h.T)  # normalized, symmetric
    assert torch.equal(h[1, :4], torch.tensor([1, -1, 1, -1]) / 8)  # Sylvester's order
    torch.testing.assert_close(h @ h, torch.eye(64))  # orthogonal
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(ops.hadamard_transform(ops.hadamard_transform(x)), x)  # its own inverse
    with pytest.raises(ValueError, match="power-of-2"):
        ops.hadamard_transform(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="power of 2"):
        ops.kv_layout("int4", BS, H, 48, torch.float32)
    # A row with one outlier channel: absmax int4 rounds every other channel to 0, the rotated
    # row keeps them.
    torch.manual_seed(6)
    x = torch.randn(64, 1, 64)
    x[:, :, 5] = 40.0
    plain = ops.dequantize_rows(*ops.quantize_rows(x, "int4"))
    rotated = ops.hadamard_transform(ops.dequantize_rows(*ops.quantize_rows(ops.hadamard_transform(x), "int4")))
    assert (rotated - x).pow(2).mean() < 0.5 * (plain - x).pow(2).mean()


def test_int4_block_keeps_its_first_key_whole_and_out_of_the_other_keys_ranges():
    torch.manual_seed(9)
    x = torch.randn(1, BS, H, D)
    x[0, 0] = 300.0  # an attention sink's outlier key
    codes, scale = ops.quantize_channels(x, torch.ones(1, BS, dtype=torch.bool))
    y = ops.dequantize_channels(codes, scale)
    assert torch.equal(y[0, 0], x[0, 0].half().float())
    rest = x[0, 1:]
    assert ((y[0, 1:] - rest).abs() <= (rest.amax(0) - rest.amin(0)) / 30 + 2e-3).all()


def test_int4_keys_written_token_by_token_match_one_write_of_the_block_when_the_range_holds():
    torch.manual_seed(2)
    _, (kc, vc, ks, vs) = _arena("int4")
    _, (kc2, vc2, ks2, vs2) = _arena("int4")
    k, v = torch.randn(BS, H, D), torch.randn(BS, H, D)
    # The first token holds every channel's extremes, so later tokens never widen a range.
    k[0] = 5.0
    k[1] = -5.0
    ops.store_kv(k[:2], v[:2], kc, vc, torch.tensor([4, 5]), ks, vs)
    for i in range(2, BS):
        ops.store_kv(k[i:i + 1], v[i:i + 1], kc, vc, torch.tensor([4 + i]), ks, vs)
    ops.store_kv(k, v, kc2, vc2, torch.arange(4, 4 + BS), ks2, vs2)
    assert torch.equal(kc[1], kc2[1]) and torch.equal(ks[1], ks2[1])


def test_int4_keys_requantized_as_a_block_fills_stay_within_two_steps_of_the_block_range():
    torch.manual_seed(3)
    _, (kc, vc, ks, vs) = _arena("int4")
    k = torch.randn(BS, H, D) * torch.arange(1, BS + 1)[:, None, None]  # each token widens the range
    for i in range(BS):
        ops.store_kv(k[i:i + 1], k[i:i + 1], kc, vc, torch.tensor([i]), ks, vs)
    y = ops.dequantize_blocks(kc, ks, torch.tensor([0]))[0]
    step = (k.amax(dim=0) - k.amin(dim=0)) / 15
    assert ((y - k).abs() <= 2 * step + 1e-3).all()


def test_int4_key_block_ignores_stale_positions_after_the_last_new_token():
    _, (kc, vc, ks, vs) = _arena("int4")
    big = torch.full((BS, H, D), 100.0)
    ops.store_kv(big, big, kc, vc, torch.arange(BS), ks, vs)  # block 0 reused later
    small = torch.randn(2, H, D)
    ops.store_kv(small, small, kc, vc, torch.tensor([0, 1]), ks, vs)  # a new sequence's first tokens
    y = ops.dequantize_blocks(kc, ks, torch.tensor([0]))[0, :2]
    assert (y - small).abs().max() < (small.amax() - small.amin()) / 15


def test_negative_slots_are_skipped_in_quantized_stores():
    _, (kc, vc, ks, vs) = _arena("int8")
    x = torch.ones(2, H, D)
    ops.store_kv(x, x, kc, vc, torch.tensor([-1, 3]), ks, vs)
    assert kc.view(-1, H, D)[3].abs().sum() > 0 and int((kc != 0).sum()) == H * D


@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("fp8_e4m3", 0.1), ("fp8_e5m2", 0.2), ("int4", 0.25)])
def test_paged_attention_over_quantized_pages_is_close_to_float_attention(fmt, tol):
    """Documented tolerance: the max abs difference of outputs (unit-variance K/V, 7 keys) stays
    under `tol`: ~2% of the values' scale for int8, 10-20% for fp8, 25% for int4."""
    torch.manual_seed(4)
    lens = [7, 3]
    heads = 4
    _, (kf, vf, _, _) = _arena("auto")
    _, (kc, vc, ks, vs) = _arena(fmt)
    tables = torch.tensor([[0, 1], [2, 3]])
    for b, n in enumerate(lens):
        k, v = torch.randn(n, H, D), torch.randn(n, H, D)
        slots = torch.tensor([int(tables[b, i // BS]) * BS + i % BS for i in range(n)])
        ops.store_kv(ops.rope_keys(k, ROPE), v, kf, vf, slots)
        ops.store_kv(k if fmt == "int4" else ops.rope_keys(k, ROPE), v, kc, vc, slots, ks, vs)  # int4: before RoPE
    q = torch.randn(sum(lens), heads, D)
    cu = torch.tensor([0, 7, 10])
    seq_lens = torch.tensor(lens)
    ref, out = torch.empty_like(q), torch.empty_like(q)
    ops.paged_attention(q, kf, vf, cu, seq_lens, tables, 0.35, ref)
    ops.paged_attention(q, kc, vc, cu, seq_lens, tables, 0.35, out, k_scale=ks, v_scale=vs, rope_table=ROPE)
    assert (out - ref).abs().max() < tol


def test_layouts_report_the_bytes_of_their_scales():
    assert ops.kv_layout("auto", 16, 3, 64, torch.float16).bytes_per_block(16, 3) == 2 * 16 * 3 * 64 * 2
    int8 = ops.kv_layout("int8", 16, 3, 64, torch.float32).bytes_per_block(16, 3)
    assert int8 == 2 * (16 * 3 * 64 + 16 * 3 * 2)
    int4 = ops.kv_layout("int4", 16, 3, 64, torch.float32).bytes_per_block(16, 3)
    assert int4 == 2 * 16 * 3 * 32 + 3 * 3 * 64 * 2 + 16 * 3 * 2  # codes, key min / step / first key, value scales
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ops.check_kv_format("int3")
