"""Device, dtype and load format: resolved by the engine, validated up front, shown by `kvforge info`;
dummy weights from a HF config.json, seeded. Runs on the CPU (tests/engine/test_gpu.py covers the GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvforge import LLM, EngineConfig, SamplingParams
from kvforge.cache import extra_keys
from kvforge.cli import build_parser, main
from kvforge.engine import LLMEngine
from kvforge.model.loader import build_model, load_model
from kvforge.model.memory import plan_kv_cache, profile_peak_memory

TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": [2, 3],
}
SMALL_CACHE = {"kv_cache_memory": 1 << 20}
LLAMA_1B = Path(__file__).resolve().parents[2] / "bench" / "data" / "llama-3.2-1b" / "config.json"


def write_config(directory: Path, **changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY, **changes}))
    return directory


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_config(tmp_path / "tiny")


def dummy_llm(model: Path, **kwargs) -> LLM:
    return LLM(str(model), load_format="dummy", **{**SMALL_CACHE, **kwargs})


# ---- device and dtype ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_and_auto_resolve_to_the_cpu_here(tiny, device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPU on this machine")
    engine = dummy_llm(tiny, device=device).engine
    assert engine.device == torch.device("cpu")
    assert engine.model.lm_head.weight.device.type == "cpu"
    assert engine.kv_cache.k[0].device.type == "cpu" and engine.kv_cache.device.type == "cpu"
    assert engine.memory_profile is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_naming_the_option(tiny):
    with pytest.raises(ValueError, match=r"device='cuda'.*no GPU.*device='auto' or device='cpu'"):
        dummy_llm(tiny, device="cuda")


@pytest.mark.parametrize(("option", "value", "match"), [
    ("device", "tpu", "device must be one of auto, cpu, cuda"),
    ("device", "cuda:x", "device must be one of"),
    ("dtype", "float64", "dtype must be one of float32, bfloat16, float16"),
    ("load_format", "safetensors", "load_format must be one of auto, dummy"),
    ("gpu_memory_utilization", 0.0, r"gpu_memory_utilization must be a fraction in \(0, 1\]"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be a fraction"),
    ("kv_cache_memory", 0, "kv_cache_memory must be a positive number of bytes or None"),
])
def test_bad_values_are_refused_at_configuration(option, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_kwargs(**{option: value})


def test_dtype_defaults_to_float32_on_the_cpu_and_keys_the_cache_with_it(tiny):
    engine = dummy_llm(tiny, device="cpu").engine
    assert engine.config.dtype is None
    assert engine.dtype == torch.float32 and engine.dtype_name == "float32"
    assert engine.model.lm_head.weight.dtype == engine.kv_cache.k[0].dtype == torch.float32
    assert engine.cache_extra("salt") == extra_keys(engine.fingerprint, "float32", "salt")


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_an_explicit_dtype_still_wins(tiny, name):
    llm = dummy_llm(tiny, device="cpu", dtype=name)
    engine, dtype = llm.engine, getattr(torch, name)
    assert engine.dtype_name == name and engine.kv_cache.k[0].dtype == dtype
    assert engine.model.embed_tokens.weight.dtype == dtype
    assert engine.model.inv_freq.dtype == torch.float32
    assert engine.cache_extra(None) == extra_keys(engine.fingerprint, name, None)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_seeded_sampling_uses_a_generator_on_the_engine_device(tiny):
    llm = dummy_llm(tiny, device="cpu")
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    first = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs[0].token_ids
    again = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs[0].token_ids
    assert first == again and len(first) == 6


# ---- dummy weights -------------------------------------------------------------------------------

def test_dummy_weights_are_drawn_from_the_seed(tiny):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 17, 42, 99, 7]}
    a, b, c = (dummy_llm(tiny, device="cpu", seed=s) for s in (0, 0, 1))
    wa, wb, wc = (x.engine.model.layers[0].self_attn.qkv_proj.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.engine.fingerprint == b.engine.fingerprint != c.engine.fingerprint
    tokens = a.generate(prompt, greedy)[0].outputs[0].token_ids
    assert len(tokens) == 8 and tokens == b.generate(prompt, greedy)[0].outputs[0].token_ids
    std = float(wa.detach().float().std())
    assert 0.015 < std < 0.025  # normal(0, 0.02)
    norm = a.engine.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    assert a.engine.model.lm_head.weight is a.engine.model.embed_tokens.weight  # tied, as configured


def test_dummy_weights_land_in_the_requested_dtype(tiny):
    loaded = load_model(str(tiny), "dummy", seed=3)
    assert loaded.weights is None
    model = build_model(loaded, "cpu", torch.bfloat16, seed=3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    again = build_model(load_model(str(tiny), "dummy", seed=3), "cpu", torch.bfloat16, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_dummy_synthetic_tokenizer_spans_exactly_the_vocabulary(tiny):
    tok = dummy_llm(tiny, device="cpu").get_tokenizer()
    assert tok.vocab_size == TINY["vocab_size"]
    assert tok.encode("<t5> <t299>") == [1, 5, 299]  # BOS from the config, then one token a word
    assert tok.decode([5, 6]) == "<t5> <t6>"
    assert tok.eos_token_ids == (2, 3) and tok.chat_template is None
    out = dummy_llm(tiny, device="cpu").generate("<t5> <t6> <t7>", SamplingParams(max_tokens=3, temperature=0,
                                                                                   ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_dummy_accepts_a_config_file_and_uses_a_directory_tokenizer(tmp_path, tiny):
    as_file = tmp_path / "shape.json"
    as_file.write_text(json.dumps(TINY))
    loaded = load_model(str(as_file), "dummy")
    assert loaded.name == "shape" and loaded.config.num_layers == 2
    assert loaded.fingerprint == load_model(str(as_file), "dummy").fingerprint
    assert loaded.fingerprint != load_model(str(as_file), "dummy", seed=1).fingerprint
    # A tokenizer.json beside the config replaces the synthetic one (and changes the fingerprint).
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"a": 0, "b": 1, "c": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tiny / "tokenizer.json"))
    with_tok = load_model(str(tiny), "dummy")
    assert with_tok.tokenizer.vocab_size == 4 and with_tok.tokenizer.encode("a c", add_special_tokens=False) == [0, 2]


@pytest.mark.parametrize("make", [
    lambda d: str(d / "missing"),
    lambda d: str(write_config(d / "bad", architectures=["GPT2LMHeadModel"])),
    lambda d: str(write_config(d / "nohidden", hidden_size=None)),
])
def test_dummy_refuses_what_is_not_a_usable_config(tmp_path, make):
    with pytest.raises(ValueError):
        load_model(make(tmp_path), "dummy")


def test_the_shipped_llama_3_2_1b_config_reads_as_that_shape():
    loaded = load_model(str(LLAMA_1B), "dummy")  # reads the config only: no weights are drawn here
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == \
        (16, 2048, 32, 8, 64, 128256)
    assert cfg.tie_word_embeddings and cfg.rope_scaling.factor == 32.0 and cfg.rope_theta == 500000.0
    assert cfg.bos_token_id == 128000 and cfg.eos_token_ids == (128001, 128008, 128009)
    assert loaded.tokenizer.vocab_size == 128256 and loaded.name == "llama-3.2-1b"


# ---- memory ----------------------------------------------------------------------------------------

def test_the_profiling_forward_runs_the_largest_step_through_the_runner(tiny):
    model = build_model(load_model(str(tiny), "dummy"), "cpu", torch.float32)
    before = [p.clone() for p in model.parameters()]
    for tokens, seqs in ((100, 7), (5, 64), (64, 1)):  # uneven spread, more seqs than tokens, one long prefill
        assert profile_peak_memory(model, 16, tokens, seqs) == 0  # the CPU allocator is not tracked
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="positive"):
        profile_peak_memory(model, 16, 0, 4)


def test_on_the_cpu_the_arena_is_sized_without_profiling(tiny):
    model = build_model(load_model(str(tiny), "dummy"), "cpu", torch.float32)
    config = EngineConfig()
    assert config.cache.kv_cache_memory is None and config.cache.num_blocks is None
    # kv_cache_memory None: 1 GiB on the CPU, and nothing profiled
    assert plan_kv_cache(model, config.cache, config.scheduler, 8192) == ((1 << 30) // 8192, None)
    small = LLMEngine(EngineConfig.from_kwargs(model=str(tiny), load_format="dummy", device="cpu", num_blocks=7))
    assert small.cache.num_blocks == 7 and small.memory_profile is None


# ---- command line ----------------------------------------------------------------------------------

def test_the_cli_exposes_device_load_format_and_gpu_memory_utilization():
    ns = build_parser().parse_args(["info", "--device", "cpu", "--load-format", "dummy",
                                    "--gpu-memory-utilization", "0.5", "--dtype", "bfloat16"])
    assert (ns.device, ns.load_format, ns.gpu_memory_utilization, ns.dtype) == ("cpu", "dummy", 0.5, "bfloat16")
    ns = build_parser().parse_args(["generate", "hi"])
    assert (ns.device, ns.load_format, ns.dtype, ns.kv_cache_memory) == ("auto", "auto", None, None)
    assert build_parser().parse_args(["serve", "--device", "cpu"]).device == "cpu"


def test_info_reports_device_dtype_and_memory(tiny, capsys):
    assert main(["info", "--model", str(tiny), "--load-format", "dummy", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["load_format"] == "dummy"
    assert info["gpu_memory_utilization"] == 0.9 and info["memory_profile"] is None
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert info["num_blocks"] == (1 << 30) // info["kv_bytes_per_block"]
    assert main(["info", "--model", str(tiny), "--load-format", "dummy", "--dtype", "bfloat16",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_info_with_cuda_and_no_gpu_is_an_error_not_a_traceback(tiny, capsys):
    assert main(["info", "--model", str(tiny), "--load-format", "dummy", "--device", "cuda"]) == 2
    assert "device='cuda'" in capsys.readouterr().err
