"""The engine on a GPU: bfloat16 by default, weights / arena / logits / seeded generators on the device,
and the KV arena sized by profiling (`kvforge.model.memory`). Tiny dummy models keep it fast.

Skipped, with the reason shown, where torch sees no GPU."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from kvforge import LLM, EngineConfig, SamplingParams
from kvforge.engine import model_info
from kvforge.model.loader import build_model, load_model
from kvforge.model.memory import profile_peak_memory

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")

TINY = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2,
}
SLACK = 64 << 20  # what the allocator may round up beyond the measured numbers
UTIL = 0.05  # a small share of the device, so the arena allocates fast and leaves the GPU to others


@pytest.fixture
def tiny(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return tmp_path


@pytest.fixture(autouse=True)
def free_the_device():
    """Each test starts and ends with no engine of ours on the device (a live arena would count as
    memory in use and shrink the next profiled budget)."""
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()


def gpu_llm(model: Path, **kwargs) -> LLM:
    return LLM(str(model), load_format="dummy", **kwargs)


def test_auto_takes_the_gpu_with_bfloat16_by_default(tiny):
    engine = gpu_llm(tiny, num_blocks=64).engine
    assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16 and engine.dtype_name == "bfloat16"
    assert engine.model.embed_tokens.weight.device.type == "cuda"
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.model.inv_freq.device.type == "cuda" and engine.model.inv_freq.dtype == torch.float32
    assert engine.model.lm_head.weight is engine.model.embed_tokens.weight  # still tied
    assert engine.kv_cache.k[0].device.type == "cuda" and engine.kv_cache.k[0].dtype == torch.bfloat16
    assert engine.memory_profile is None  # num_blocks given: nothing profiled


def test_generation_runs_on_the_gpu_greedy_and_seeded(tiny):
    llm = gpu_llm(tiny, device="cuda", num_blocks=64)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    assert len(first) == 8 and first == llm.generate(prompt, greedy)[0].outputs[0].token_ids
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    a = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    assert a == llm.generate(prompt, seeded)[0].outputs[0].token_ids


def test_the_profiled_arena_fits_the_utilization(tiny):
    llm = gpu_llm(tiny, device="cuda", gpu_memory_utilization=UTIL, max_num_batched_tokens=1024, max_num_seqs=16)
    engine = llm.engine
    p = engine.memory_profile
    assert p is not None and p.num_blocks > 0 and p.num_blocks == engine.cache.num_blocks
    assert p.gpu_memory_utilization == UTIL and p.total_bytes == torch.cuda.mem_get_info(engine.device)[1]
    assert p.kv_cache_bytes == engine.kv_cache.nbytes
    params = sum(t.numel() * t.element_size() for t in engine.model.parameters())
    assert p.weights_bytes >= params and p.peak_activation_bytes > 0
    assert p.weights_bytes + p.peak_activation_bytes + p.non_torch_bytes + p.kv_cache_bytes <= UTIL * p.total_bytes
    # The arena plus the weights and a largest step really fit in the share (allocator rounding aside).
    torch.cuda.reset_peak_memory_stats(engine.device)
    prompts = [{"prompt_token_ids": list(range(10, 74))} for _ in range(16)]  # 16 x 64 = the largest step
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    used = torch.cuda.max_memory_allocated(engine.device)
    total = torch.cuda.mem_get_info(engine.device)[1]
    assert used + p.non_torch_bytes <= UTIL * total + SLACK


def test_utilization_scales_the_arena(tiny):
    small = gpu_llm(tiny, device="cuda", gpu_memory_utilization=UTIL).engine
    n_small = small.cache.num_blocks
    del small
    gc.collect()
    torch.cuda.empty_cache()
    large = gpu_llm(tiny, device="cuda", gpu_memory_utilization=2 * UTIL).engine
    per_block = large.kv_cache.bytes_per_block
    total = large.memory_profile.total_bytes
    # Doubling the share adds about UTIL * total bytes of blocks (the other terms barely move).
    assert abs((large.cache.num_blocks - n_small) * per_block - UTIL * total) < 0.01 * total


def test_explicit_sizes_win_over_profiling(tiny):
    by_memory = gpu_llm(tiny, device="cuda", kv_cache_memory=8 << 20).engine
    assert by_memory.memory_profile is None
    assert by_memory.cache.num_blocks == (8 << 20) // by_memory.kv_cache.bytes_per_block
    del by_memory
    by_blocks = gpu_llm(tiny, device="cuda", num_blocks=33, gpu_memory_utilization=0.01).engine
    assert by_blocks.cache.num_blocks == 33 and by_blocks.memory_profile is None


def test_a_budget_that_holds_no_block_says_what_is_missing(tiny):
    with pytest.raises(ValueError, match=r"no room for the KV cache.*are missing.*gpu_memory_utilization"):
        gpu_llm(tiny, device="cuda", gpu_memory_utilization=1e-6)


def test_profile_peak_memory_measures_the_forward(tiny):
    model = build_model(load_model(str(tiny), "dummy", device="cuda"), "cuda", torch.bfloat16)
    small = profile_peak_memory(model, 16, 16, 1)
    large = profile_peak_memory(model, 16, 2048, 16)
    # At least the logits of 16 rows and the hidden states of 2048 tokens, and more than a 16-token step.
    assert large >= 2048 * TINY["hidden_size"] * 2 and large > small > 0


def test_info_profiles_on_the_gpu(tiny):
    info = model_info(EngineConfig.from_kwargs(model=str(tiny), load_format="dummy", gpu_memory_utilization=UTIL))
    assert info["device"].startswith("cuda") and info["dtype"] == "bfloat16"
    assert info["gpu_memory_utilization"] == UTIL
    profile = info["memory_profile"]
    assert profile["num_blocks"] == info["num_blocks"] > 0
    assert profile["kv_cache_bytes"] == info["kv_cache_bytes"]
    assert torch.cuda.memory_allocated() < 1 << 30  # info keeps no model or arena on the device
