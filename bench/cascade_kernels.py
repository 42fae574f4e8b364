"""Cascade and norm kernels on the GPU: Triton vs the torch reference, at the Llama-3.2-1B shape.

chunk_attention: `--rows` decoding requests (one query token each, 32 heads, 8 kv heads, D 64, bf16)
over one shared `--chunk`-token chunk in pages of 16, re-rotated by 5000; bytes = the chunk's K/V
once + q + out/lse, so `gbps` against ~4.2 TB/s (H200 copy) says how near the memory roofline it
runs. `--sweep` also times the row tile and split count around the heuristic's choice (tuning).
rms_norm / add_rms_norm / silu_and_mul: 512 tokens, hidden 2048, intermediate 8192.

    .venv/bin/python bench/cascade_kernels.py [--rows 64] [--chunk 4096] [--sweep] [--seed 0]

Prints one JSON line (`{"skipped": ...}` without a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvforge import ops  # noqa: E402


def _time_us(fn) -> float:
    from triton.testing import do_bench
    return 1000 * do_bench(fn, warmup=50, rep=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "needs a GPU"}))
        return
    from kvforge.ops.triton import cascade, norm

    torch.manual_seed(args.seed)
    dev, dt = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, dim, page, offset = 32, 8, 64, 16, 5000
    pages = -(-args.chunk // page)
    k_cache = torch.randn(pages + 64, page, kv_heads, dim, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(pages + 64, device=dev)[:pages].to(torch.int32)
    q = torch.randn(args.rows, heads, dim, device=dev, dtype=dt)
    inv = ops.rope_inv_freq(dim, 500000.0).to(dev, torch.float32)
    call = (q, k_cache, v_cache, table, args.chunk, offset, inv, None, dim ** -0.5)
    nbytes = 2 * args.chunk * kv_heads * dim * 2 + q.numel() * 2 + args.rows * heads * (dim + 1) * 4
    triton_us = _time_us(lambda: cascade.chunk_attention(*call))
    torch_us = _time_us(lambda: ops.chunk_attention(*call))
    rows = args.rows * heads // kv_heads
    block_m, _, _, splits = cascade._chunk_config(rows, kv_heads, args.chunk, dev)
    result = {
        "bench": "cascade_kernels", "device": torch.cuda.get_device_name(), "rows": args.rows, "chunk": args.chunk,
        "chunk_attention_us": round(triton_us, 2), "chunk_attention_gbps": round(nbytes / triton_us / 1e3, 1),
        "torch_reference_us": round(torch_us, 2), "block_m": block_m, "splits": splits,
    }
    if args.sweep:
        result["sweep_us"] = {
            f"m{bm}_s{s}": round(_time_us(lambda: cascade._chunk_attention(*call, num_splits=s, block_m=bm)), 2)
            for bm in (16, 32, 64, 128) for s in (1, 2, 4, 8, 16, 32)}
    x = torch.randn(512, 2048, device=dev, dtype=dt)
    res = torch.randn_like(x)
    w = torch.randn(2048, device=dev, dtype=dt)
    gate_up = torch.randn(512, 2 * 8192, device=dev, dtype=dt)
    for name, fast, ref, args_ in (("rms_norm", norm.rms_norm, ops.rms_norm, (x, w, 1e-5)),
                                   ("add_rms_norm", norm.add_rms_norm, ops.add_rms_norm, (x, res, w, 1e-5)),
                                   ("silu_and_mul", norm.silu_and_mul, ops.silu_and_mul, (gate_up,))):
        result[f"{name}_us"] = round(_time_us(lambda: fast(*args_)), 2)
        result[f"{name}_torch_us"] = round(_time_us(lambda: ref(*args_)), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
