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


@pytest.mark.parametrize("fmt,per_token", [("int8", 2 * 30 * 3 * (64 + 2)),
                                           ("int4", 30 * 3 * (2 * 32 + 2 + 3 * 2 * 64 / 16))])
def test_info_reports_a_quantized_formats_bytes_per_token_and_its_larger_capacity(fmt, per_token, capsys):
    assert main(["info", "--kv-cache-dtype", fmt, "--kv-cache-memory", str(64 << 20)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_cache_dtype"] == fmt and info["kv_bytes_per_token"] == per_token
    assert info["num_blocks"] == (64 << 20) // (per_token * 16)


def test_a_bad_kv_cache_dtype_is_refused_naming_the_choices(capsys):
    assert main(["info", "--kv-cache-dtype", "int3"]) != 0
    assert "kv_cache_dtype must be one of auto, int8, int4, fp8_e4m3, fp8_e5m2" in capsys.readouterr().err


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


def test_generate_with_a_disk_tier_leaves_the_prompt_for_the_next_run(tmp_path, capsys):
    prompt = "Paris, the capital of France, lies on the Seine; its museums, bridges and cafes make it"
    argv = ["generate", prompt, "--max-tokens", "4", "--temperature", "0",
            "--kv-cache-memory", str(32 << 20), "--kv-tiers", f"disk:{tmp_path}:1GiB", "host:64MiB"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert list(tmp_path.rglob("*.kvb"))  # written back when the run closed its LLM
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_generate_with_speculative_decoding_prints_the_same_text(capsys):
    prompt = "Repeat exactly: one two three four five six seven eight. Repeat exactly: one two three"
    argv = ["generate", prompt, "--max-tokens", "12", "--temperature", "0", "--kv-cache-memory", str(32 << 20)]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']) == 0
    assert capsys.readouterr().out == plain
    assert main([*argv, "--speculative-config", '{"method": "draft", "model": "smollm2-135m", '
                                                 '"num_speculative_tokens": 3, "draft_kv_cache_memory": 8388608}']) == 0
    assert capsys.readouterr().out == plain
    assert main([*argv, "--speculative-config", '{"method": "draft"}']) != 0
    assert "speculative method 'draft' needs model" in capsys.readouterr().err


def test_serve_passes_a_draft_model_speculative_config_to_the_engine(monkeypatch):
    from kvforge.server.serve import Server

    started = []

    class Started:
        def run(self):
            pass

    def from_config(engine_config, server_config):
        started.append(engine_config)
        return Started()

    monkeypatch.setattr(Server, "from_config", from_config)
    spec = '{"method": "draft", "model": "smollm2-135m", "num_speculative_tokens": 2, "draft_kv_cache_memory": 4096}'
    assert main(["serve", "--speculative-config", spec]) == 0
    assert started[0].speculative.method == "draft" and started[0].speculative.model == "smollm2-135m"
    assert (started[0].speculative.num_speculative_tokens, started[0].speculative.draft_kv_cache_memory) == (2, 4096)
