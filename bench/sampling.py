"""Sampling overhead: decode throughput with the penalties on vs off, same model, prompts and seeds, one run.

32 requests (seeded random prompts of 64-256 tokens) each generate exactly 64 tokens (ignore_eos) at
temperature 0.8 with a per-request seed, through the embedded SmolLM2 on the CPU in float32:
  on:  presence_penalty 0.5, frequency_penalty 0.5, repetition_penalty 1.2, min_p 0.05
  off: the neutral values (no logits processing, no min_p)
Decode tok/s is requests / the median time of a decode step (the steps after the one that gave the
last request its first token): robust to bursts of other work on a shared machine; the elapsed-time
rate over the same steps is reported too. Runs alternate off/on after a warm-up; medians of --repeats.
Also reports the sampler's own time per decode step (a wrapper around the engine's `sample`).
`target_met`: with them on, decode is at most 10% slower. Prints one JSON line.

    .venv/bin/python bench/sampling.py [--requests 32] [--new-tokens 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import kvforge.engine.engine as engine_module
from kvforge import LLM, OutputKind, SamplingParams

ON = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.05)


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


class SamplerClock:
    """Wraps the engine's `sample` to add up the seconds spent in it since `reset`."""

    def __init__(self):
        self.inner, self.seconds = engine_module.sample, 0.0
        engine_module.sample = self

    def __call__(self, logits, rows):
        start = time.perf_counter()
        out = self.inner(logits, rows)
        self.seconds += time.perf_counter() - start
        return out

    def reset(self) -> None:
        self.seconds = 0.0


def run(llm: LLM, prompts: list[list[int]], new_tokens: int, penalties: bool, seed: int,
        clock: SamplerClock) -> dict:
    """All prompts in one continuous batch; decode tok/s and sampler ms per decode step."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0.8, seed=seed + i, max_tokens=new_tokens, ignore_eos=True,
                                output_kind=OutputKind.DELTA, **(ON if penalties else {}))
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params)
    started, first, done, step_s = None, set(), 0, []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outputs = engine.step()
        done += sum(o.finished for o in outputs)
        if started is not None:
            step_s.append(time.perf_counter() - t0)
            continue
        first.update(o.request_id for o in outputs)
        if len(first) == len(prompts):  # every request has its first token: decoding from here on
            started = time.perf_counter()
            clock.reset()
    elapsed = time.perf_counter() - started
    assert done == len(prompts) and len(step_s) == new_tokens - 1, (done, len(step_s))
    engine.check_integrity()
    return {"tok_s": len(prompts) / statistics.median(step_s),
            "elapsed_tok_s": len(prompts) * len(step_s) / elapsed,
            "sampler_ms_per_step": 1000 * clock.seconds / len(step_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    llm = LLM(args.model, device="cpu", dtype="float32", max_num_seqs=args.requests, max_num_batched_tokens=4096)
    vocab = llm.engine.model_config.vocab_size
    prompts = make_prompts(args.requests, args.min_prompt, args.max_prompt, vocab, args.seed)
    clock = SamplerClock()

    # Warm up both paths (kernel selection, allocator) on a short run.
    for penalties in (False, True):
        run(llm, prompts[:4], 4, penalties, args.seed, clock)
    results = {False: [], True: []}
    for _ in range(args.repeats):
        for penalties in (False, True):
            # Freshly computed prompts each time: no prefix cache hits to favour the later runs.
            llm.reset_prefix_cache()
            results[penalties].append(run(llm, prompts, args.new_tokens, penalties, args.seed, clock))

    def median(penalties: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[penalties])

    off, on = median(False, "tok_s"), median(True, "tok_s")
    off_elapsed, on_elapsed = median(False, "elapsed_tok_s"), median(True, "elapsed_tok_s")
    result = {
        "bench": "sampling",
        "model": args.model,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "prompt_tokens": sum(map(len, prompts)),
        "repeats": args.repeats,
        "penalties": ON,
        "off_decode_tok_s": round(off, 2),
        "on_decode_tok_s": round(on, 2),
        "on_over_off": round(on / off, 4),
        "off_elapsed_decode_tok_s": round(off_elapsed, 2),
        "on_elapsed_decode_tok_s": round(on_elapsed, 2),
        "elapsed_on_over_off": round(on_elapsed / off_elapsed, 4),
        "off_sampler_ms_per_step": round(median(False, "sampler_ms_per_step"), 2),
        "on_sampler_ms_per_step": round(median(True, "sampler_ms_per_step"), 2),
        "target_met": on >= 0.9 * off,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
