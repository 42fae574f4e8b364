"""Throughput: kvforge vs HF transformers `generate`, same model (the embedded SmolLM2 GGUF), same run.

(a) one sequence, 128 new tokens: output tok/s.
(b) 32 requests, prompt lengths 32-512 (seeded), 128 new tokens each: output tok/s.
(c) KV memory waste (internal fragmentation: unused slots in allocated blocks / allocated slots)
    over workload (b), averaged over steps and at its peak.

Prompts are seeded random token ids (content does not change the work done); every request
generates exactly its new tokens (ignore_eos / min_new_tokens). Prints one JSON line.

    .venv/bin/python bench/throughput.py [--requests 32] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from kvforge import LLM, SamplingParams
from kvforge.model.loader import resolve_model_path


def load_hf(model: str):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf.eval()


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Left-padded batch through `generate`; returns seconds."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens
    return elapsed


def kvforge_generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """All prompts in one continuous batch; returns seconds and the fragmentation seen at each step."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params)
    frag, done = [], 0
    while engine.has_unfinished_requests():
        done += sum(o.finished for o in engine.step())
        stats = engine.cache.stats()
        if stats.num_used_blocks:
            frag.append(stats.internal_fragmentation)
    elapsed = time.perf_counter() - start
    assert done == len(prompts)
    engine.check_integrity()
    return elapsed, frag


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    llm = LLM(args.model, block_size=args.block_size, max_num_seqs=max(args.requests, 1),
              max_num_batched_tokens=4096)
    hf = load_hf(args.model)
    vocab = llm.engine.model_config.vocab_size
    pad_id = llm.get_tokenizer().eos_token_id
    single = make_prompts(1, 16, 16, vocab, args.seed)
    batch = make_prompts(args.requests, args.min_prompt, args.max_prompt, vocab, args.seed + 1)

    # Warm both up (kernel selection, allocator) on a short run.
    kvforge_generate(llm, single, 4)
    hf_generate(hf, single, 4, pad_id)

    kv_a, _ = kvforge_generate(llm, single, args.new_tokens)
    hf_a = hf_generate(hf, single, args.new_tokens, pad_id)
    kv_b, frag = kvforge_generate(llm, batch, args.new_tokens)
    hf_b = hf_generate(hf, batch, args.new_tokens, pad_id)

    out_a = args.new_tokens
    out_b = args.new_tokens * args.requests
    result = {
        "bench": "throughput",
        "model": args.model,
        "threads": torch.get_num_threads(),
        "block_size": args.block_size,
        "a_batch1": {"new_tokens": out_a, "kvforge_tok_s": round(out_a / kv_a, 2),
                     "hf_tok_s": round(out_a / hf_a, 2), "ratio": round(hf_a / kv_a, 2)},
        "b_batch": {"requests": args.requests, "prompt_tokens": sum(map(len, batch)), "new_tokens": out_b,
                    "kvforge_tok_s": round(out_b / kv_b, 2), "hf_tok_s": round(out_b / hf_b, 2),
                    "ratio": round(hf_b / kv_b, 2)},
        "c_kv_waste": {"mean_internal_fragmentation": round(sum(frag) / len(frag), 4),
                       "max_internal_fragmentation": round(max(frag), 4)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
