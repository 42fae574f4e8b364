"""Quantized KV caches through the engine: every cache feature works unchanged under every format
(prefix caching, pins, preemption, chunk reuse, fork), formats never share blocks, capacity grows,
and the quality estimate measures what it says."""

from __future__ import annotations

import pytest
import torch

from kvforge import SamplingParams
from kvforge.metrics import ServerMetrics
from kvforge.types import InvalidRequestError
from tests.conftest import assert_engine_idle, make_llm

FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
PER_TOKEN = ("int8", "fp8_e4m3", "fp8_e5m2")  # every token's K/V quantized on its own
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SYSTEM = ("You are a careful assistant. Answer briefly and precisely, cite the rule you rely on, and say "
          "when you do not know. The library opens at nine and closes at eight on weekdays.")
QUESTIONS = ["When does the library open?", "When does it close?", "Is it open on weekdays?"]


@pytest.fixture(scope="module", params=FORMATS)
def quant(request):
    return make_llm(kv_cache_dtype=request.param)


def _prompts(llm) -> list[dict]:
    tok = llm.get_tokenizer()
    return [{"prompt_token_ids": tok.encode(SYSTEM + " Question: " + q)} for q in QUESTIONS]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_a_byte_budget_holds_more_tokens_in_every_quantized_format(quant):
    auto = make_llm(num_blocks=None)
    fmt = quant.stats().kv_cache_dtype
    ratio = auto.stats().kv_bytes_per_token / quant.stats().kv_bytes_per_token  # vs float32
    assert ratio >= {"int8": 3.8, "fp8_e4m3": 3.8, "fp8_e5m2": 3.8, "int4": 5.5}[fmt]
    assert quant.stats().capacity_tokens >= 3.8 * auto.stats().capacity_tokens


def test_prefix_cache_hits_give_the_same_greedy_tokens_as_computing_the_prompt(quant):
    fmt = quant.stats().kv_cache_dtype
    plain = make_llm(kv_cache_dtype=fmt, enable_prefix_caching=False)
    prompts = _prompts(quant)
    # One by one on both (later ones hit): quantization turns the last-bit differences of batched
    # and single matmuls into different codes now and then, so like is compared with like.
    with_cache = [quant.generate(p, GREEDY)[0] for p in prompts]
    assert all(o.num_cached_tokens >= 32 for o in with_cache[1:])
    assert _tokens(with_cache) == _tokens([plain.generate(p, GREEDY)[0] for p in prompts])
    assert_engine_idle(quant.engine)


def test_quantized_greedy_decoding_stays_close_to_full_precision(quant, llm):
    """A smoke bound on quality (bench/kv_quant.py measures it): the first tokens agree."""
    fmt = quant.stats().kv_cache_dtype
    prompt = _prompts(llm)[0]
    ref = llm.generate(prompt, GREEDY)[0].outputs[0].token_ids
    got = quant.generate(prompt, GREEDY)[0].outputs[0].token_ids
    agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    assert agree >= {"int8": 12, "fp8_e4m3": 4, "fp8_e5m2": 2, "int4": 2}[fmt], (fmt, ref, got)


@pytest.mark.parametrize("fmt", ("int8", "int4", "fp8_e5m2"))  # fp8_e4m3 takes e5m2's code path
def test_preempted_requests_finish_and_every_block_is_accounted_for(fmt):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tiny = make_llm(kv_cache_dtype=fmt, num_blocks=9, block_size=16)
    prompts = _prompts(tiny)
    outs = tiny.generate(prompts, params)
    assert tiny.stats().num_preemptions > 0
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    if fmt in PER_TOKEN:  # a recompute stores what the first computation stored: the tokens follow
        big = make_llm(kv_cache_dtype=fmt, enable_prefix_caching=False)
        # an unpressured run's. Only for a while: the two batch their rows differently, the GEMMs
        # round a row's K/V by the batch's shape in the last bits, and a quantized code can flip
        # (one of four prompts left it at token 29 on one CPU).
        for got, want in zip(_tokens(outs), _tokens(big.generate(prompts, params))):
            assert got[:16] == want[:16]
    assert_engine_idle(tiny.engine)


@pytest.mark.parametrize("fmt", ("int8", "int4"))  # per-token and per-block pages; fp8 pages are int8's
def test_a_pinned_prefix_survives_pressure_in_quantized_pages(fmt):
    llm = make_llm(kv_cache_dtype=fmt, num_blocks=12, block_size=16, max_pinned_fraction=0.5)
    system = list(range(4000, 4064))
    handle = llm.pin_prefix(system)
    for i in range(6):
        llm.generate({"prompt_token_ids": list(range(5000 + 100 * i, 5100 + 100 * i))}, GREEDY)
    assert llm.stats().cache.num_evictions > 0
    assert llm.generate({"prompt_token_ids": system + [1, 2, 3]}, GREEDY)[0].num_cached_tokens == 64
    llm.unpin(handle)
    assert_engine_idle(llm.engine)


def test_a_system_chunk_composes_like_the_plain_prompt_and_carries_its_format(quant):
    fmt = quant.stats().kv_cache_dtype
    tok = quant.get_tokenizer()
    system = quant.register_chunk(tok.encode(SYSTEM), kind="system")
    pages = "int4+prerope+firstkey+hadamard+lloydmax" if fmt == "int4" else fmt  # int4's layout is part of its name
    assert system.kv_format == f"{pages}/float32"
    query = tok.encode(" Question: When does the library open?")
    composed = quant.generate_from_chunks([system], query, GREEDY)
    plain = quant.generate({"prompt_token_ids": list(system.token_ids) + query}, GREEDY)[0]
    if fmt in PER_TOKEN:
        assert composed.outputs[0].token_ids == plain.outputs[0].token_ids
    assert len(composed.outputs[0].token_ids) == 12
    quant.unregister_chunk(system.chunk_id)
    assert_engine_idle(quant.engine)


def test_a_chunk_of_another_format_is_refused_naming_the_format(llm):
    int8 = make_llm(kv_cache_dtype="int8")
    chunk = int8.register_chunk("Document: the library opens at nine.")
    with pytest.raises(InvalidRequestError, match="int8/float32 KV .* float32 .*kv_cache_dtype") as e:
        llm.generate_from_chunks([chunk], "Question: when?", GREEDY)
    assert e.value.param == "chunks"
    assert_engine_idle(llm.engine)


def test_formats_never_share_cached_blocks(llm):
    int8 = make_llm(kv_cache_dtype="int8")
    keys = {llm.engine.cache_extra(None), int8.engine.cache_extra(None),
            make_llm(kv_cache_dtype="int4").engine.cache_extra(None)}
    assert len(keys) == 3
    text = "The same prompt in two formats"
    assert int8.register_chunk(text).chunk_id != llm.register_chunk(text).chunk_id


@pytest.mark.parametrize("fmt", ("int8", "int4"))
def test_parallel_samples_fork_quantized_blocks(fmt):
    llm = make_llm(kv_cache_dtype=fmt)
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=20, ignore_eos=True)
    out = llm.generate(_prompts(llm)[0], params)[0]
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 20 for c in out.outputs)
    greedy = SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True)
    a, b = llm.generate(_prompts(llm)[1], greedy)[0].outputs
    assert a.token_ids == b.token_ids  # the copied partial block holds the same codes and scales
    assert_engine_idle(llm.engine)


def test_quality_sampling_measures_kl_to_full_precision_and_exports_a_histogram():
    llm = make_llm(kv_cache_dtype="int4", kv_quality_sample=1.0)
    llm.generate(_prompts(llm)[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    kl = llm.stats().kv_quality_kl
    assert kl.count == 5  # every decode step (the first token comes from the prefill)
    assert kl.sum > 0 and kl.counts[-1] <= kl.count
    metrics = ServerMetrics()
    metrics.update(llm.stats(), 0)
    text = metrics.render().decode()
    assert 'kvforge_kv_quality_kl_bucket{le="+Inf"} 5.0' in text
    assert "kvforge_kv_cache_bytes_per_token" in text
    assert_engine_idle(llm.engine)


def test_full_precision_reference_logits_equal_the_unquantized_engines(llm):
    ids = _prompts(llm)[0]["prompt_token_ids"]
    ref = llm.engine.runner.full_precision_logits(ids)
    scored = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0, logprobs=0))[0]
    assert int(ref.argmax()) == scored.outputs[0].token_ids[0]
    int4 = make_llm(kv_cache_dtype="int4")
    torch.testing.assert_close(int4.engine.runner.full_precision_logits(ids), ref, rtol=1e-4, atol=1e-4)


def test_bad_formats_and_sampling_fractions_are_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, int4"):
        make_llm(kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="kv_quality_sample .* set kv_cache_dtype"):
        make_llm(kv_quality_sample=0.1)
    with pytest.raises(ValueError, match="kv_quality_sample must be a fraction"):
        make_llm(kv_cache_dtype="int8", kv_quality_sample=1.5)
