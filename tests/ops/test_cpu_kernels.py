"""The native CPU kernels (kvforge.ops.cpu) against their torch references, same signatures."""

import logging

import pytest
import torch

from kvforge import ops
from kvforge.ops import cpu
from kvforge.ops.library import backend, backend_for

pytestmark = pytest.mark.skipif(not cpu.enabled(), reason="KVFORGE_CPU_KERNELS=0 turns the native kernels off")


def test_native_kernels_build_and_serve_the_cpu():
    assert cpu.available(), "the native CPU kernels did not build (see the logged warning)"
    assert backend_for(torch.device("cpu")) is cpu


@pytest.fixture
def fresh_choice():
    """Forget which backend was chosen, before and after (both are cached)."""
    cpu.available.cache_clear()
    backend_for.cache_clear()
    yield
    cpu.available.cache_clear()
    backend_for.cache_clear()


def test_turned_off_the_cpu_runs_the_references(monkeypatch, fresh_choice):
    monkeypatch.setenv("KVFORGE_CPU_KERNELS", "0")
    assert not cpu.available()
    assert backend_for(torch.device("cpu")) is backend("torch")


def test_a_failed_build_is_logged_and_the_references_serve(monkeypatch, caplog, fresh_choice):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu, "build", broken)
    with caplog.at_level(logging.WARNING, logger="kvforge.ops.cpu"):
        assert not cpu.available()
    assert "no compiler here" in caplog.text
    assert backend_for(torch.device("cpu")) is backend("torch")
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("hidden", [64, 576, 77])
def test_rms_norm_and_add_rms_norm_equal_the_reference(rows, hidden):
    x, r, w = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5))
    normed, total = cpu.add_rms_norm(x, r, w, 1e-6)
    ref_normed, ref_total = ops.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(normed, ref_normed)


def test_norms_read_strided_rows_and_leave_their_inputs_alone():
    wide = torch.randn(5, 200)
    x, r, w = wide[:, :64], wide[:, 100:164], torch.randn(64)
    before = wide.clone()
    normed, total = cpu.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(normed, ops.add_rms_norm(x, r, w, 1e-5)[0])
    torch.testing.assert_close(total, x + r)
    assert torch.equal(wide, before)


@pytest.mark.parametrize("rows,inter", [(1, 1536), (33, 100), (260, 7)])
def test_silu_and_mul_equals_the_reference(rows, inter):
    x = torch.randn(rows, 2 * inter) * 6
    torch.testing.assert_close(cpu.silu_and_mul(x), ops.silu_and_mul(x))


@pytest.mark.parametrize("heads,dim", [(9, 64), (3, 64), (2, 10)])
def test_rope_equals_the_reference_on_a_strided_view(heads, dim):
    rows = 37
    qkv = torch.randn(rows, (heads + 2) * dim)
    x = qkv[:, dim:dim + heads * dim].view(rows, heads, dim)  # a slice of a fused projection
    cos, sin = ops.rope_cos_sin(torch.arange(rows) * 7, ops.rope_inv_freq(dim, 10000.0).float(), torch.float32)
    torch.testing.assert_close(cpu.apply_rope(x, cos, sin), ops.apply_rope(x, cos, sin))


def test_store_kv_writes_rows_at_their_slots_and_skips_padding_like_the_reference():
    kv = torch.randn(9, 6, 16)
    k, v = kv[:, :3], kv[:, 3:]  # strided halves, as the fused projection gives them
    slots = torch.tensor([5, 0, -1, 17, 3, 30, -1, 8, 12])
    got = [torch.randn(4, 8, 3, 16) for _ in range(2)]
    want = [t.clone() for t in got]
    cpu.store_kv(k, v, *got, slots)
    ops.store_kv(k, v, *want, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="past the arena"):
        cpu.store_kv(k, v, *got, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 32]))


def _paged(lengths, block_size, kv_heads, dim, num_blocks):
    kc, vc = torch.randn(num_blocks, block_size, kv_heads, dim), torch.randn(num_blocks, block_size, kv_heads, dim)
    perm = torch.randperm(num_blocks).tolist()
    tables = [[perm.pop() for _ in range(-(-n // block_size))] for n in lengths]
    width = max(map(len, tables))
    padded = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])
    return kc, vc, padded


@pytest.mark.parametrize("lengths,block_size,heads,kv_heads", [
    ([1], 16, 9, 3),
    ([5, 17, 3, 64], 4, 6, 2),
    ([1300, 1, 513], 16, 9, 3),  # several key splits per sequence, merged by log-sum-exp
    ([40, 700], 32, 4, 4),       # no GQA
    ([9, 2], 8, 8, 1),           # one KV head for all
])
def test_decode_attention_reads_blocks_in_place_like_the_reference(lengths, block_size, heads, kv_heads):
    dim = 64
    kc, vc, tables = _paged(lengths, block_size, kv_heads, dim, num_blocks=sum(-(-n // block_size) for n in lengths) + 3)
    q = torch.randn(len(lengths), heads, dim)
    seq_lens = torch.tensor(lengths)
    got = cpu.decode_attention(q, kc, vc, tables, seq_lens, dim ** -0.5)
    want = ops.decode_attention(q, kc, vc, tables, seq_lens, dim ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_decode_attention_rejects_lengths_its_block_table_cannot_hold():
    kc, vc, tables = _paged([5], 4, 1, 16, num_blocks=4)
    with pytest.raises(RuntimeError, match="seq_lens"):
        cpu.decode_attention(torch.randn(1, 2, 16), kc, vc, tables, torch.tensor([9]), 1.0)


def test_other_dtypes_and_quantized_pages_take_the_reference():
    x, w = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5))
    layout = ops.kv_layout("int8", 4, 2, 8, torch.float32)
    k, v, ks, vs = layout.allocate(6, 4, 2, torch.device("cpu"))
    kv = torch.randn(7, 2, 8)
    ops.store_kv(kv, kv, k, v, torch.arange(7), ks, vs)
    tables, lens, q = torch.tensor([[0, 1]]), torch.tensor([7]), torch.randn(1, 4, 8)
    torch.testing.assert_close(cpu.decode_attention(q, k, v, tables, lens, 0.3, ks, vs),
                               ops.decode_attention(q, k, v, tables, lens, 0.3, ks, vs))
