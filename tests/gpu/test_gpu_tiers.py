"""Tiers over an arena on a CUDA GPU: blocks leave through pinned memory (the copy queued on the
stream, the writer thread waiting on its event) and come back the same way, byte for byte, and a
dummy-weight engine restores a prefix from the host tier with the same greedy tokens (float32:
the restored prompt's suffix runs through another kernel shape than the whole prompt did, and a
random-weight bf16 model has near-ties that such last-bit differences flip). Skipped, visibly,
without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.cache import KVCache, KVCacheManager
from kvforge.cache.tiers import BlockFormat, HostTier, TieredStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = Path(__file__).resolve().parents[2] / "bench" / "data" / "llama-3.2-1b"


@pytest.mark.parametrize("kv_format", ["auto", "int8", "int4"])
def test_blocks_round_trip_through_pinned_memory_byte_for_byte(kv_format):
    kv = KVCache(3, 16, 16, 4, 64, torch.bfloat16, "cuda", kv_format)
    for part in kv._parts():
        part.view(torch.uint8).copy_(torch.randint(0, 256, part.view(torch.uint8).shape, dtype=torch.uint8))
    out = torch.empty((4, kv.bytes_per_block), dtype=torch.uint8, pin_memory=True)
    kv.export_blocks([3, 9, 1, 12], out)
    torch.cuda.synchronize()
    kv.import_blocks([0, 2, 4, 5], out)
    torch.cuda.synchronize()
    for part in kv._parts():
        assert torch.equal(part[[0, 2, 4, 5]].view(torch.uint8), part[[3, 9, 1, 12]].view(torch.uint8))


def test_a_store_over_a_gpu_arena_writes_back_and_reads_through():
    kv = KVCache(2, 8, 4, 2, 8, torch.bfloat16, "cuda")
    store = TieredStore(kv, [HostTier(1 << 20)], BlockFormat("m", "bfloat16", 4, 2, kv.bytes_per_block))
    m = KVCacheManager(8, 4, store=store, write_policy="write_through")
    prompt = list(range(1, 13))
    m.add_sequence(0, 13)
    slots = m.append(0, 12)
    for layer in range(2):
        kv.store(layer, torch.randn(12, 2, 8, device="cuda"), torch.randn(12, 2, 8, device="cuda"), slots)
    saved = kv.export_blocks(m.block_table(0)).clone()
    m.commit(0, prompt)
    store.flush()
    m.free(0)
    m.reset_prefix_cache()
    assert m.read_through([*prompt, 0]) == 3
    match = m.match_prefix([*prompt, 0])
    assert torch.equal(kv.export_blocks(match.block_ids), saved)
    m.check_integrity()
    store.close()


def test_a_gpu_engine_restores_a_prefix_from_the_host_tier():
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(100, 400))}
    with LLM(str(CONFIG), load_format="dummy", device="cuda", dtype="float32", kv_cache_memory=1 << 30,
             kv_tiers=["host:1GiB"]) as llm:
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        llm.engine.cache.flush_to_tiers()
        llm.reset_prefix_cache()
        again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert again == expected and llm.stats().restored_tokens == 288
        llm.engine.check_integrity()
