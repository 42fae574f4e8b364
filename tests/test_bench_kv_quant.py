"""Smoke test of bench/kv_quant.py at a tiny size (in a subprocess: the bench wraps an engine function)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kv_quant_bench_prints_one_json_line():
    args = ["--device", "cpu", "--formats", "int8", "int4@32", "--window", "64", "--windows", "2", "--prompts", "2",
            "--decode-requests", "2", "--new-tokens", "4", "--repeats", "1", "--kv-cache-mib", "64"]
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "kv_quant.py"), *args], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    [line] = run.stdout.splitlines()
    result = json.loads(line)
    assert result["ppl_tokens"] == 126 and result["kl_tokens"] == 63
    int8 = result["int8"]
    assert int8["capacity_ratio"] > 1.9 and int8["capacity_tokens"] > result["auto"]["capacity_tokens"]
    assert abs(int8["ppl_increase"]) < 0.05 and 0 <= int8["mean_kl"] < 0.05
    assert 0 <= int8["greedy_prefix_agreement"] <= int8["greedy_token_agreement"] <= 1
    assert int8["decode_tok_s"] > 0 and "int8_target_met" in result
    assert result["int4@32"]["capacity_ratio"] > 3.2 and "int4@32_target_met" in result
