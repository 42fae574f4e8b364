"""The engine against HF transformers on the same GGUF, and against itself across batching,
chunked prefill and preemption."""

from __future__ import annotations

import torch

from kvforge import SamplingParams
from kvforge.model.runner import TokenRun
from tests.conftest import PROMPTS, make_llm

GREEDY_64 = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """Plain argmax loop over HF's own KV cache (EOS is an ordinary token here, as with ignore_eos)."""
    tokens: list[int] = []
    past, step = None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            out = hf_model(step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens


def test_prefill_and_decode_logits_match_hf_in_float32(llm, hf_model):
    engine = llm.engine
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    seq_id = 10_000
    engine.cache.add_sequence(seq_id, capacity=len(ids) + 1)
    try:
        slots = engine.cache.append(seq_id, len(ids))
        prefill = engine.runner.run([TokenRun(ids, 0, slots, engine.cache.block_table(seq_id), True)])
        nxt = int(prefill.argmax())
        slot = engine.cache.append(seq_id, 1)
        decode = engine.runner.run([TokenRun([nxt], len(ids), slot, engine.cache.block_table(seq_id), True)])
    finally:
        engine.cache.free(seq_id)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids + [nxt]])).logits[0].float()
    assert (prefill[0] - ref[len(ids) - 1]).abs().max() < 2e-3
    assert (decode[0] - ref[len(ids)]).abs().max() < 2e-3
    engine.check_integrity()


def test_greedy_64_token_continuations_equal_hf(llm, hf_model):
    outs = llm.generate(PROMPTS, GREEDY_64)
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.outputs[0].token_ids) == 64
        assert out.outputs[0].token_ids == _hf_greedy(hf_model, out.prompt_token_ids, 64), prompt
    llm.engine.check_integrity()


def test_batch_gives_the_same_greedy_outputs_as_one_at_a_time(llm):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    single = [llm.generate(p, params)[0].outputs[0].token_ids for p in PROMPTS]
    assert batched == single


def test_tiny_cache_forces_preemption_and_keeps_greedy_outputs():
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    big = make_llm()
    expected = [o.outputs[0].token_ids for o in big.generate(PROMPTS, params)]
    del big
    tiny = make_llm(num_blocks=8, block_size=16)
    outs = tiny.generate(PROMPTS, params)
    assert tiny.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = tiny.stats().cache
    assert stats.num_used_blocks == 0 and stats.num_free_blocks + stats.num_evictable_blocks == 8
    tiny.engine.check_integrity()


def test_chunked_prefill_under_a_small_token_budget_matches_whole_prefill(llm):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    long_prompt = " ".join(PROMPTS * 3)
    expected = llm.generate(long_prompt, params)[0].outputs[0].token_ids
    small = make_llm(max_num_batched_tokens=16)
    out = small.generate(long_prompt, params)[0]
    assert len(out.prompt_token_ids) > 16
    assert out.outputs[0].token_ids == expected
    small.engine.check_integrity()


def test_bfloat16_generates_close_to_float32(llm):
    bf16 = make_llm(dtype="bfloat16")
    assert bf16.engine.kv_cache.k[0].dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=4)
    assert bf16.generate(PROMPTS[0], params)[0].outputs[0].text.strip().startswith("Paris")
    assert llm.generate(PROMPTS[0], params)[0].outputs[0].text.strip().startswith("Paris")
