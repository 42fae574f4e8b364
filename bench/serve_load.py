"""Serving under load: bounded concurrent streaming clients against `kvforge serve` on 127.0.0.1.

Phase 1 (`--on-full wait`, the default cache): `--requests` requests (seeded prompt lengths and
max_tokens), at most `--concurrency` at a time, each streamed through /v1/completions: output tok/s,
TTFT p50/p99, inter-token latency p50/p99 (client side), errors (must be 0), and the blocks still
held after the run, read from /metrics (must be 0).
Phase 2 (`--on-full reject`, a cache of `--tiny-blocks` blocks): the same kind of load; every
request either completes or is refused with a 503 before any token; none is lost (errors 0, leaked
blocks 0).

The peer is the offline engine (LLMEngine stepped in this process, `max_num_seqs` = concurrency, every
request queued up front) on the phase 1 workload: `server_vs_offline` is the share of its output
tok/s the server keeps (HTTP, streaming, closed-loop clients on the same cores). `--no-offline`
skips it.

The server runs as a subprocess on a free loopback port and is stopped at the end; each phase is
bounded by `--phase-timeout` seconds. Prints one JSON line.

    .venv/bin/python bench/serve_load.py [--requests 200] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
VOCAB_LO, VOCAB_HI = 100, 49000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def kvforge_serve(args: list[str], startup_timeout: float = 180.0):
    """`kvforge serve` on a free loopback port; yields its URL; stops it (SIGINT, then SIGKILL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "kvforge.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvforge serve exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvforge serve did not come up within {startup_timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def workload(n: int, seed: int, prompt: tuple[int, int], out: tuple[int, int]) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(rng.randint(*prompt))],
             "max_tokens": rng.randint(*out), "temperature": 0, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}} for _ in range(n)]


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    """Stream one completion; returns its outcome: status, tokens, TTFT and the gaps between chunks."""
    start = time.perf_counter()
    result = {"status": None, "tokens": 0, "ttft": None, "gaps": [], "error": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            result["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                if r.status_code != 503 or "retry-after" not in r.headers:
                    result["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return result
            last, done, finish = None, False, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result["error"] = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    now = time.perf_counter()
                    if last is None:
                        result["ttft"] = now - start
                    else:
                        result["gaps"].append(now - last)
                    last = now
                    finish = chunk["choices"][0]["finish_reason"] or finish
            if not done or finish != "length" or result["tokens"] != body["max_tokens"]:
                result["error"] = f"incomplete stream: done={done} finish={finish} tokens={result['tokens']}"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


async def run_load(url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def bounded(body: dict) -> dict:
            async with sem:
                return await one_request(client, body)

        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(bounded(b) for b in bodies)), timeout)
        return results, time.perf_counter() - start


def engine_state(url: str) -> dict[str, float]:
    """Blocks held and requests left, from /metrics (once the engine has nothing left to do)."""
    names = ("kvforge_kv_cache_used_blocks", "kvforge_num_requests_running", "kvforge_num_requests_waiting",
             "kvforge_num_preemptions_total")
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names}
        if values["kvforge_num_requests_running"] == values["kvforge_num_requests_waiting"] == 0 \
                or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def offline_tok_s(model: str, bodies: list[dict], kv_cache_memory: int, concurrency: int) -> float:
    """The phase 1 workload through LLMEngine directly: output tok/s."""
    from kvforge.config import EngineConfig
    from kvforge.engine import LLMEngine
    from kvforge.types import SamplingParams

    engine = LLMEngine(EngineConfig.from_kwargs(model=model, block_size=16, kv_cache_memory=kv_cache_memory,
                                                max_num_seqs=concurrency))
    start, tokens = time.perf_counter(), 0
    for i, b in enumerate(bodies):
        engine.add_request(str(i), {"prompt_token_ids": b["prompt"]},
                           SamplingParams(temperature=0, max_tokens=b["max_tokens"], ignore_eos=True))
    while engine.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return round(tokens / (time.perf_counter() - start), 1)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 1)


def summarize(results: list[dict], elapsed: float, url: str) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["error"] is None]
    state = engine_state(url)
    tokens = sum(r["tokens"] for r in ok)
    gaps = [g for r in ok for g in r["gaps"]]
    errors = [r["error"] for r in results if r["error"] is not None]
    return {
        "requests": len(results), "completed": len(ok), "rejected_503": sum(r["status"] == 503 for r in results),
        "errors": len(errors), "first_errors": errors[:3],
        "lost": len(results) - len(ok) - sum(r["status"] == 503 and r["error"] is None for r in results),
        "seconds": round(elapsed, 1), "output_tokens": tokens, "output_tok_s": round(tokens / elapsed, 1),
        "ttft_ms_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_ms_p99": pct([r["ttft"] for r in ok], 0.99),
        "itl_ms_p50": pct(gaps, 0.5), "itl_ms_p99": pct(gaps, 0.99),
        "blocks_leaked": int(state["kvforge_kv_cache_used_blocks"]),
        "preemptions": int(state["kvforge_num_preemptions_total"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    ap.add_argument("--tiny-blocks", type=int, default=48, help="phase 2 cache size in blocks of 16 tokens")
    ap.add_argument("--phase2-requests", type=int, default=None, help="default: half of --requests")
    ap.add_argument("--phase-timeout", type=float, default=420.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-offline", action="store_true", help="skip the offline engine peer")
    a = ap.parse_args()

    prompt, out = (a.min_prompt, a.max_prompt), (a.min_tokens, a.max_tokens)
    common = ["--model", a.model, "--block-size", "16"]
    bodies = workload(a.requests, a.seed, prompt, out)
    with kvforge_serve([*common, "--kv-cache-memory", str(a.kv_cache_memory), "--on-full", "wait"]) as url:
        results, elapsed = asyncio.run(run_load(url, bodies, a.concurrency, a.phase_timeout))
        phase1 = summarize(results, elapsed, url)
    n2 = a.phase2_requests if a.phase2_requests is not None else max(1, a.requests // 2)
    with kvforge_serve([*common, "--num-blocks", str(a.tiny_blocks), "--on-full", "reject"]) as url:
        results, elapsed = asyncio.run(run_load(url, workload(n2, a.seed + 1, prompt, out), a.concurrency,
                                                a.phase_timeout))
        phase2 = summarize(results, elapsed, url)
    ok = (phase1["errors"] == phase1["lost"] == phase1["blocks_leaked"] == phase1["rejected_503"] == 0
          and phase2["errors"] == phase2["lost"] == phase2["blocks_leaked"] == 0)
    offline = None if a.no_offline else offline_tok_s(a.model, bodies, a.kv_cache_memory, a.concurrency)
    print(json.dumps({"bench": "serve_load", "model": a.model, "concurrency": a.concurrency, "seed": a.seed,
                      "prompt_tokens": list(prompt), "max_tokens": list(out), "ok": ok,
                      "wait": phase1, "reject_tiny_cache": {"num_blocks": a.tiny_blocks, **phase2},
                      "offline_engine_output_tok_s": offline,
                      "server_vs_offline": round(phase1["output_tok_s"] / offline, 2) if offline else None}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
