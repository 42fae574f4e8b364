"""Tiered KV storage: time to first token for a long shared prefix served from the arena, each tier
(host memory, local disk, Redis) and by recompute, in one run.

The prompt is a `--prefix`-token prefix (bench/data/apache-2.0.txt, then the texts of
bench/data/rag_documents.json) plus a fresh `--suffix`-token suffix per request (the tokens that
follow), one greedy token (TTFT = add_request to the first token). Same run, same model (the embedded
SmolLM2 GGUF; float32 on the CPU), one LLM per case with the same arena budget:

- recompute: prefix caching on, the arena empty: the whole prompt is computed;
- arena: the prefix is cached in the arena (the usual prefix hit);
- host / disk / redis: an LLM with `kv_tiers=[that tier]`; the prefix is computed once, written to the
  tier (`flush_to_tiers`: the write-back that eviction or `close()` does) and dropped from the arena
  (`reset_prefix_cache`); the request then loads it from the tier (read-through at admission).
  disk is a fresh directory under `--disk-dir` (the OS page cache holds what was just written: a warm
  disk); redis is a real `redis-server` started on a free loopback port for the run.

Each case is the median of `--repeats` requests (new suffix each; tiers re-dropped from the arena
before each). `restore_bytes_per_s`: bytes loaded from the tier / (time reading it + copying into the
arena), from the store's counters. `speedup` = recompute TTFT / the case's TTFT; target (issue 13):
every tier >= 5x. `outputs_match`: each case's greedy tokens equal recompute's for the same suffix.
Prints one JSON line.

    .venv/bin/python bench/tiers.py [--device auto] [--prefix 2048] [--suffix 32] [--repeats 3]
                                   [--tiers host,disk,redis] [--model M --load-format dummy --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvforge import LLM, SamplingParams  # noqa: E402
from tests.redis_server import start_redis  # noqa: E402

DATA = Path(__file__).parent / "data"


def token_stream(llm: LLM) -> list[int]:
    docs = json.loads((DATA / "rag_documents.json").read_text())["documents"]
    text = (DATA / "apache-2.0.txt").read_text() + "\n\n" + "\n\n".join(d["text"] for d in docs)
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


def ttft(llm: LLM, ids: list[int], request_id: str) -> tuple[float, list[int]]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": ids}, params)
    first, tokens = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            if out.finished:
                tokens = list(out.outputs[0].token_ids)
    engine.check_integrity()
    return first, tokens


def llm_kwargs(args) -> dict:
    return dict(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype)


def run_case(args, name: str, tier: str | None, prefix: list[int], suffixes: list[list[int]]) -> dict:
    kwargs = dict(llm_kwargs(args), kv_cache_memory=args.kv_cache_mib << 20, max_model_len=args.prefix + 256)
    if tier is not None:
        kwargs.update(kv_tiers=[tier])
    llm = LLM(**kwargs)
    times, outputs = [], []
    try:
        if name != "recompute":
            ttft(llm, prefix + suffixes[0], f"{name}-warm")  # computes the prefix once
        for i, suffix in enumerate(suffixes):
            if name == "recompute":
                llm.reset_prefix_cache()
            elif tier is not None:
                llm.engine.cache.flush_to_tiers()
                llm.reset_prefix_cache()
            t, tokens = ttft(llm, prefix + suffix, f"{name}-{i}")
            times.append(t)
            outputs.append(tokens)
        out = {"ttft_s": round(statistics.median(times), 4)}
        stats = llm.stats()
        if tier is not None:
            st = stats.tiers
            seconds = st.read_seconds + st.load_seconds
            out.update(restore_bytes_per_s=round(st.bytes_loaded / seconds) if seconds else None,
                       blocks_loaded=st.blocks_loaded, restored_tokens=stats.restored_tokens,
                       faults=sum(sum(t.faults_by_kind.values()) for t in st.tiers), rejected=st.rejected)
        return out | {"outputs": outputs}
    finally:
        llm.close()
        del llm
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto", help='"dummy": random weights from a HF config.json')
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tiers", default="host,disk,redis", help="which tiers to measure (comma-separated)")
    ap.add_argument("--prefix", type=int, default=2048)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-cache-mib", type=int, default=512)
    ap.add_argument("--disk-dir", default=None, help="where the disk tier's directory is made (default: /tmp)")
    args = ap.parse_args()

    probe = LLM(**llm_kwargs(args), num_blocks=8)
    stream = token_stream(probe)
    device = str(probe.engine.device)
    del probe
    need = args.prefix + args.suffix * args.repeats
    if len(stream) < need:
        raise SystemExit(f"the shipped texts hold {len(stream)} tokens; --prefix + --suffix x --repeats needs {need}")
    prefix = stream[:args.prefix]
    suffixes = [stream[args.prefix + i * args.suffix:args.prefix + (i + 1) * args.suffix] for i in range(args.repeats)]

    measured = args.tiers.split(",")
    redis = start_redis(Path(tempfile.mkdtemp(prefix="kvforge-bench-redis-")), maxmemory="4gb") \
        if "redis" in measured else None
    disk = tempfile.mkdtemp(prefix="kvforge-bench-disk-", dir=args.disk_dir)
    tiers = {"host": "host:4GiB", "disk": f"disk:{disk}:16GiB", "redis": redis.url if redis else None}
    cases = {"recompute": None, "arena": None, **{name: tiers[name] for name in measured}}
    try:
        results = {name: run_case(args, name, tier, prefix, suffixes) for name, tier in cases.items()}
    finally:
        if redis is not None:
            redis.stop()
    base = results["recompute"]
    reference = base.pop("outputs")
    line = {"bench": "tiers", "device": device, "model": args.model, "prefix_tokens": args.prefix, "suffix_tokens": args.suffix,
            "repeats": args.repeats}
    for name in cases:
        r = results[name]
        outputs = r.pop("outputs", reference)
        if name != "recompute":
            r["speedup"] = round(base["ttft_s"] / r["ttft_s"], 2)
            r["outputs_match"] = outputs == reference
        line[name] = r
    line["target_met"] = all(line[n]["speedup"] >= 5 and line[n]["outputs_match"] for n in measured)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
