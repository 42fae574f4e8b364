"""The command line: help everywhere, `info`, `generate` (streamed and batched), clear errors."""

from __future__ import annotations

import json

import pytest

from kvforge.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["info", "--help"]])
def test_help_is_available_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: kvforge" in capsys.readouterr().out


def test_info_reports_config_kv_bytes_and_capacity(capsys):
    assert main(["info", "--model", "smollm2-135m", "--kv-cache-memory", str(64 << 20)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["num_layers"] == 30 and info["config"]["num_kv_heads"] == 3
    assert info["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert info["num_blocks"] == (64 << 20) // (info["kv_bytes_per_token"] * 16)
    assert info["capacity_tokens"] == info["num_blocks"] * 16


def test_generate_streams_one_prompt_and_prints_stats(capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "8", "--temperature", "0",
                 "--kv-cache-memory", str(32 << 20), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "Block map" in out


def test_generate_batches_several_prompts(capsys):
    assert main(["generate", "Hello", "def fib(n):", "--max-tokens", "4", "--temperature", "0",
                 "--kv-cache-memory", str(32 << 20)]) == 0
    assert capsys.readouterr().out.count("--- ") == 2


def test_errors_are_reported_without_a_traceback(capsys):
    assert main(["generate", "hi", "--max-tokens", "-1"]) == 2
    assert "max_tokens must be an integer >= 1" in capsys.readouterr().err
