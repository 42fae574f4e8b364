"""Allocator: the cache manager's own time per engine step at 1024 running sequences.

Each step, timed (only KVCacheManager calls; the token lists and the workload live outside it):
  - 4 running sequences finish: `free` (tail first; their full blocks stay cached);
  - 4 requests arrive with 256-token prompts (one of 8 shared 128-token system prompts + 128 own
    tokens): `match_prefix`, `can_admit`, `add_sequence(prefix=...)`, `append` the uncached rest,
    `commit` the prompt;
  - every running sequence decodes one token and commits what is final, a block being hashed and
    cached whenever one fills:
      engine:    one `append_decode(all running)`, then `commit(seq, tokens)` for each sequence
                 whose last block just filled (what the scheduler and LLMEngine do each step; which
                 sequences filled a block is the engine's bookkeeping, untimed);
      per_call:  `can_append`, `append(seq, 1)`, `commit(seq, tokens)` for every sequence (the
                 scheduler's fallback path when blocks run short, and the plain API), for reference;
  - `take_events()` drains the KV events, as a router feed would.
The pool (40k blocks of 16) fills with cached blocks of finished requests within ~100 steps, after
which every allocation evicts least recently used leaves. Both modes replay the same seeded
workload: 100 untimed warm-up steps, then the median and p99 over the timed steps, for the whole
step and per phase. Prints one JSON line; the headlines are the engine mode's: the whole step
(`median_ms_per_step`) and the issue's scope, the decode appends of all running sequences plus the
arrivals' prefix lookups (`median_ms_appends_and_lookups`), each against the 1 ms target.

    .venv/bin/python bench/allocator.py [--steps 1000] [--sequences 1024] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvforge.cache import KVCacheManager, extra_keys  # noqa: E402

TARGET_MS = 1.0
# Timed per step; "step" is all of them, "appends_and_lookups" the scope: the decode
# appends of every running sequence plus the prefix lookups of the arrivals.
PHASES = ("free", "admit", "append", "commit", "events", "step", "appends_and_lookups")
VOCAB = 32_000


def run(args: argparse.Namespace, batched: bool) -> dict:
    rng = random.Random(args.seed)
    shared_len = args.prompt_tokens // 2
    systems = [[rng.randrange(VOCAB) for _ in range(shared_len)] for _ in range(args.system_prompts)]
    extra = extra_keys("bench-model-fingerprint", "bfloat16", None)
    capacity = args.prompt_tokens + 8192
    bs = args.block_size
    m = KVCacheManager(args.num_blocks, args.block_size)
    tokens: dict[int, list[int]] = {}
    running: list[int] = []
    next_id = 0

    def new_prompt() -> list[int]:
        own = [rng.randrange(VOCAB) for _ in range(args.prompt_tokens - shared_len)]
        return systems[rng.randrange(len(systems))] + own

    # A full batch at staggered lengths (untimed).
    for _ in range(args.sequences):
        prompt = new_prompt() + [rng.randrange(VOCAB) for _ in range(rng.randrange(512))]
        match = m.match_prefix(prompt, extra)
        m.add_sequence(next_id, capacity, match, extra)
        m.append(next_id, len(prompt) - match.num_tokens)
        m.commit(next_id, prompt)
        tokens[next_id] = prompt
        running.append(next_id)
        next_id += 1
    m.take_events()
    start_stats = m.stats()

    times: dict[str, list[float]] = {name: [] for name in PHASES}
    refused = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start_stats = m.stats()
        # Engine-side work, untimed: who finishes, the arrivals, one sampled token per sequence.
        finishing = set(rng.sample(range(len(running)), args.arrivals))
        done = [running[i] for i in finishing]
        running = [sid for i, sid in enumerate(running) if i not in finishing]
        arrivals = [new_prompt() for _ in range(args.arrivals)]
        for sid in running:
            tokens[sid].append(rng.randrange(VOCAB))
        filled = [sid for sid in running if not len(tokens[sid]) % bs]  # the engine knows its lengths

        clock = time.perf_counter
        t0 = clock()
        for sid in done:
            m.free(sid)
        t1 = clock()
        lookups = 0.0
        admitted = []
        for prompt in arrivals:
            t = clock()
            match = m.match_prefix(prompt, extra)
            lookups += clock() - t
            if not m.can_admit(match, len(prompt) - match.num_tokens):
                refused += 1
                continue
            m.add_sequence(next_id, capacity, match, extra)
            m.append(next_id, len(prompt) - match.num_tokens)
            m.commit(next_id, prompt)
            admitted.append(next_id)
            tokens[next_id] = prompt
            next_id += 1
        t2 = clock()
        if batched:
            m.append_decode(running)
            t3 = clock()
            for sid in filled:  # this step's token filled the sequence's last block
                m.commit(sid, tokens[sid])
        else:
            for sid in running:
                if not m.can_append(sid, 1):
                    raise RuntimeError("the pool is too small for the running batch; raise --num-blocks")
                m.append(sid, 1)
            t3 = clock()
            for sid in running:
                m.commit(sid, tokens[sid])
        t4 = clock()
        m.take_events()
        t5 = clock()

        for sid in done:
            del tokens[sid]
        running.extend(admitted)
        if step >= args.warmup:
            for name, ms in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0, t3 - t2 + lookups)):
                times[name].append(ms * 1e3)
    m.check_integrity()

    s = m.stats()
    step = sorted(times["step"])
    queried = s.prefix_query_tokens - start_stats.prefix_query_tokens
    return {
        "median_ms_per_step": round(statistics.median(step), 4),
        "p99_ms_per_step": round(step[min(len(step) - 1, int(0.99 * len(step)))], 4),
        "mean_ms_per_step": round(statistics.fmean(step), 4),
        "median_ms_by_phase": {name: round(statistics.median(times[name]), 4) for name in PHASES[:5]},
        "median_ms_appends_and_lookups": round(statistics.median(times["appends_and_lookups"]), 4),
        "refused_admissions": refused,
        "prefix_hit_rate": round((s.prefix_hit_tokens - start_stats.prefix_hit_tokens) / max(queried, 1), 4),
        "evictions_per_step": round((s.num_evictions - start_stats.num_evictions) / args.steps, 2),
        "cached_blocks": s.num_cached_blocks,
        "usage": round(s.usage, 4),
        "internal_fragmentation": round(s.internal_fragmentation, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--sequences", type=int, default=1024)
    ap.add_argument("--arrivals", type=int, default=4, help="arrivals and finishes per step")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--system-prompts", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=40_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    engine = run(args, batched=True)
    per_call = run(args, batched=False)
    print(json.dumps({
        "bench": "allocator",
        "median_ms_per_step": engine["median_ms_per_step"],
        "p99_ms_per_step": engine["p99_ms_per_step"],
        "median_ms_appends_and_lookups": engine["median_ms_appends_and_lookups"],
        "target_ms": TARGET_MS,
        "meets_target_whole_step": engine["median_ms_per_step"] <= TARGET_MS,
        "meets_target_appends_and_lookups": engine["median_ms_appends_and_lookups"] <= TARGET_MS,
        "steps": args.steps,
        "sequences": args.sequences,
        "arrivals_per_step": args.arrivals,
        "prompt_tokens": args.prompt_tokens,
        "block_size": args.block_size,
        "num_blocks": args.num_blocks,
        "engine": engine,
        "per_call": per_call,
        "python": platform.python_version(),
        "seed": args.seed,
    }))


if __name__ == "__main__":
    main()
