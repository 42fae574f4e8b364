"""Prefix reuse: 16 requests sharing a 1024-token prefix of real text, sent one after another.

Each request is the shared prefix (the first 1024 tokens of bench/data/apache-2.0.txt) plus its
own 32-token suffix (the text that follows, 32 tokens per request), and generates 32 tokens
greedily. Same run, same model (the embedded SmolLM2 GGUF, float32):
  - kvforge with prefix caching, after one warm-up request has seen the prefix;
  - kvforge without prefix caching;
  - HF transformers reusing the prefix's `past_key_values`, deep-copied per request (the usual HF
    recipe), the prefix computed once beforehand.
Reports mean time to first token, prefill tokens computed, and the hit rate. Prints one JSON line.

    .venv/bin/python bench/prefix_reuse.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams

DATA = Path(__file__).parent / "data" / "apache-2.0.txt"


def load_hf(model: str):
    from transformers import AutoModelForCausalLM

    from kvforge.model.loader import resolve_model_path

    path = resolve_model_path(model)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def run_kvforge(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Requests one after another; TTFT = add_request to the first sampled token."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    before = engine.stats()
    ttft, outputs = [], []
    for i, ids in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"req-{i}", {"prompt_token_ids": ids}, params)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter() - start
                if out.finished:
                    outputs.append(out.outputs[0].token_ids)
        ttft.append(first)
    after = engine.stats()
    engine.check_integrity()
    queried = after.cache.prefix_query_tokens - before.cache.prefix_query_tokens
    hits = after.cache.prefix_hit_tokens - before.cache.prefix_hit_tokens
    return {
        "mean_ttft_s": round(statistics.mean(ttft), 4),
        "prefill_tokens_computed": after.prompt_tokens - before.prompt_tokens,
        "hit_rate": round(hits / queried, 4) if queried else 0.0,
        "outputs": outputs,
    }


def run_hf(hf, prefix: list[int], suffixes: list[list[int]], new_tokens: int) -> dict:
    """Prefix KV computed once; each request deep-copies it and feeds only its suffix."""
    with torch.inference_mode():
        start = time.perf_counter()
        past = hf(torch.tensor([prefix]), use_cache=True).past_key_values
        prefix_s = time.perf_counter() - start
        ttft, outputs = [], []
        for suffix in suffixes:
            start = time.perf_counter()
            cache = copy.deepcopy(past)
            out = hf(torch.tensor([suffix]), past_key_values=cache, use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            ttft.append(time.perf_counter() - start)
            for _ in range(new_tokens - 1):
                out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outputs.append(tokens)
    return {"mean_ttft_s": round(statistics.mean(ttft), 4), "prefix_compute_s": round(prefix_s, 4),
            "prefill_tokens_computed": sum(map(len, suffixes)), "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    cached = LLM(args.model, enable_prefix_caching=True, kv_cache_memory=512 << 20)
    plain = LLM(args.model, enable_prefix_caching=False, kv_cache_memory=512 << 20)
    hf = load_hf(args.model)
    text = cached.get_tokenizer().encode(DATA.read_text())
    need = args.prefix_tokens + args.suffix_tokens * (args.requests + 1)
    if len(text) < need:
        raise SystemExit(f"{DATA} has {len(text)} tokens, the workload needs {need}")
    prefix = text[:args.prefix_tokens]
    pieces = [text[args.prefix_tokens + i * args.suffix_tokens:args.prefix_tokens + (i + 1) * args.suffix_tokens]
              for i in range(args.requests + 1)]
    warmup, suffixes = pieces[0], pieces[1:]
    prompts = [prefix + s for s in suffixes]

    # Warm-up: one request that has seen the prefix (for the cached engine this caches it).
    for llm in (cached, plain):
        llm.generate({"prompt_token_ids": prefix + warmup}, SamplingParams(temperature=0, max_tokens=2),
                     use_tqdm=False)
    with_cache = run_kvforge(cached, prompts, args.new_tokens)
    without = run_kvforge(plain, prompts, args.new_tokens)
    hf_recipe = run_hf(hf, prefix, suffixes, args.new_tokens)

    result = {
        "bench": "prefix_reuse",
        "model": args.model,
        "requests": args.requests,
        "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens,
        "new_tokens": args.new_tokens,
        "kvforge_cached": {k: v for k, v in with_cache.items() if k != "outputs"},
        "kvforge_uncached": {k: v for k, v in without.items() if k != "outputs"},
        "hf_deepcopy_past_key_values": {k: v for k, v in hf_recipe.items() if k != "outputs"},
        "ttft_speedup_vs_uncached": round(without["mean_ttft_s"] / with_cache["mean_ttft_s"], 2),
        "ttft_ratio_vs_hf_recipe": round(hf_recipe["mean_ttft_s"] / with_cache["mean_ttft_s"], 2),
        "prefill_tokens_reduction": round(1 - with_cache["prefill_tokens_computed"]
                                          / without["prefill_tokens_computed"], 4),
        "greedy_outputs_equal_cached_vs_uncached": with_cache["outputs"] == without["outputs"],
        "greedy_outputs_equal_cached_vs_hf": with_cache["outputs"] == hf_recipe["outputs"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
