"""Serving under load: bounded concurrent streaming clients against `kvforge serve` on 127.0.0.1.

Phase 1 (`--on-full wait`, the default cache): `--requests` requests (seeded prompt lengths and
max_tokens), at most `--concurrency` at a time, each streamed through /v1/completions: output tok/s,
TTFT p50/p99, inter-token latency p50/p99 (client side), errors (must be 0), and the blocks still
held after the run, read from /metrics (must be 0).
Phase 2 (`--on-full reject`, a cache of `--tiny-blocks` blocks): the same kind of load; every
request either completes or is refused with a 503 before any token; none is lost (errors 0, leaked
blocks 0).
Phase 3 (`chat_no_max_tokens`, a server on its defaults: no cache size, block size or on-full
option given): `--chat-requests` chat requests WITHOUT max_tokens (OpenAI's default: the reply may
run to the model length, 8192 tokens), at most `--concurrency` at a time, streamed through
/v1/chat/completions. Each is one seeded short user question ("What is the capital of Kenya? Answer
in one short sentence.", "Is 44 an even number? Answer yes or no.", ...), greedy (temperature 0),
with `stop: ["\n\n"]`, so that replies end early and the phase stays short (on this CPU a reply
running towards 8192 tokens would take many minutes). Measured offline on smollm2-135m for the
default 64 (`--seed 0`): 63 replies end with EOS after 3 to 43 tokens; one goes on into a second
paragraph and the stop ends it after 22 tokens (115 without it); 1030 output tokens in all. What
the server must cope with is the requests' worst case, not their length: a server that reserves
prompt + model length per request runs only cache / 8192 tokens of them at once (2 on the default
1 GiB cache) and queues the rest, which may time out (503). Reported: completed, rejected_503,
errors and lost as in phase 1, output tok/s, TTFT and inter-token latency (client side), the peak
of `kvforge_num_requests_running` (polled from /metrics every `--poll-interval` s during the
phase), preemptions over the phase, the finish reasons and reply lengths, and the blocks still held
afterwards.

TTFT is measured to the first stream chunk that carries text (a chat stream's opening chunk, which
carries only the role, does not count), inter-token latency between chunks that carry text.

The peer is the offline engine (LLMEngine stepped in this process, `max_num_seqs` = concurrency, every
request queued up front) on the phase 1 workload: `server_vs_offline` is the share of its output
tok/s the server keeps (HTTP, streaming, closed-loop clients on the same cores). `--no-offline`
skips it.

Each phase runs its own server, a subprocess on a free loopback port stopped at the phase's end;
each phase is bounded by `--phase-timeout` seconds (a request without an answer by then is an
error). `--only wait|reject|chat` runs one phase. Prints one JSON line; exits 1 unless every phase
run has no errors, no lost requests and no leaked blocks, and phases 1 and 3 no 503s.

    .venv/bin/python bench/serve_load.py [--requests 200] [--concurrency 32] [--chat-requests 64]
    .venv/bin/python bench/serve_load.py --only chat
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
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
VOCAB_LO, VOCAB_HI = 100, 49000
CHAT_QUESTIONS = (
    "What is the capital of {country}? Answer in one short sentence.",
    "What is {a} plus {b}? Reply with the number only.",
    "Name one {thing}. Reply with one word.",
    "Is {a} an even number? Answer yes or no.",
    "Give a one-sentence definition of {concept}.",
    "Translate '{word}' into {language}. Reply with the translation only.",
)
CHAT_FILLERS = {
    "country": ("France", "Japan", "Italy", "Spain", "Germany", "Canada", "Egypt", "Brazil", "India", "Kenya",
                "Peru", "Norway"),
    "thing": ("fruit", "color", "animal", "planet", "instrument", "sport"),
    "concept": ("gravity", "a noun", "photosynthesis", "an atom", "a river", "democracy"),
    "word": ("hello", "thank you", "cat", "water", "good night"),
    "language": ("French", "Spanish", "German"),
}
CHAT_STOP = ["\n\n"]


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


def chat_workload(n: int, seed: int) -> list[dict]:
    """`n` chat requests of one seeded short question each, without max_tokens (see the module docstring)."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(n):
        fill = {k: rng.choice(v) for k, v in CHAT_FILLERS.items()}
        question = rng.choice(CHAT_QUESTIONS).format(a=rng.randint(2, 99), b=rng.randint(2, 99), **fill)
        bodies.append({"messages": [{"role": "user", "content": question}], "temperature": 0, "stop": CHAT_STOP,
                       "stream": True, "stream_options": {"include_usage": True}})
    return bodies


def outcome(error: str | None = None) -> dict:
    return {"status": None, "tokens": 0, "finish": None, "ttft": None, "gaps": [], "error": error}


async def one_request(client: httpx.AsyncClient, body: dict, path: str = "/v1/completions") -> dict:
    """Stream one completion or chat completion (`path`); returns its outcome: status, tokens, finish
    reason, TTFT (to the first chunk that carries text) and the gaps between chunks that carry text.
    A body with ignore_eos must end by length after exactly max_tokens tokens; any other by stop or
    length."""
    start = time.perf_counter()
    result = outcome()
    try:
        async with client.stream("POST", path, json=body) as r:
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
                    choice = chunk["choices"][0]
                    if choice["delta"].get("content") if "delta" in choice else choice["text"]:
                        now = time.perf_counter()
                        if last is None:
                            result["ttft"] = now - start
                        else:
                            result["gaps"].append(now - last)
                        last = now
                    finish = choice["finish_reason"] or finish
            result["finish"] = finish
            exact = body.get("ignore_eos", False)
            if not done or finish not in (("length",) if exact else ("stop", "length")) \
                    or (exact and result["tokens"] != body["max_tokens"]):
                result["error"] = f"incomplete stream: done={done} finish={finish} tokens={result['tokens']}"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


class LoadRun(NamedTuple):
    results: list[dict]  # one outcome per body, in order
    seconds: float
    preemptions_before: int  # kvforge_num_preemptions when the phase started
    peak_running: int | None  # max of kvforge_num_requests_running seen; None when not polled


async def run_load(url: str, bodies: list[dict], concurrency: int, timeout: float, path: str = "/v1/completions",
                   poll_interval: float | None = None) -> LoadRun:
    """Stream `bodies` to `path`, at most `concurrency` at a time; a request not answered within
    `timeout` seconds of the start is cancelled and counted as an error. With `poll_interval`,
    /metrics is read that often meanwhile (on a connection of its own) for the peak of running
    requests."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=10) as watcher:
        async def bounded(body: dict) -> dict:
            async with sem:
                return await one_request(client, body, path)

        peak, finished = 0, asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not finished.is_set():
                try:
                    running = metric_values((await watcher.get("/metrics")).text)["kvforge_num_requests_running"]
                    peak = max(peak, int(running))
                except httpx.HTTPError:
                    pass
                try:
                    await asyncio.wait_for(finished.wait(), poll_interval)
                except TimeoutError:
                    pass

        before = metric_values((await watcher.get("/metrics")).text)["kvforge_num_preemptions_total"]
        watching = asyncio.create_task(watch()) if poll_interval else None
        start = time.perf_counter()
        tasks = [asyncio.create_task(bounded(b)) for b in bodies]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        elapsed = time.perf_counter() - start
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        finished.set()
        if watching is not None:
            await watching
        results = [t.result() if t in done else outcome(f"no answer within the phase timeout of {timeout:g} s")
                   for t in tasks]
        return LoadRun(results, elapsed, int(before), peak if watching is not None else None)


def metric_values(text: str) -> dict[str, float]:
    """Every unlabelled sample of a /metrics text, by sample name (counters end in _total)."""
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def engine_state(url: str) -> dict[str, float]:
    """Blocks held, requests left and preemptions, from /metrics (once the engine has nothing left to do)."""
    deadline = time.monotonic() + 10
    while True:
        values = metric_values(httpx.get(url + "/metrics", timeout=10).text)
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


def summarize(run: LoadRun, url: str) -> dict:
    """The phase's numbers; preemptions counted over the phase, blocks leaked read once the engine is idle."""
    results, elapsed = run.results, run.seconds
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
        "preemptions": int(state["kvforge_num_preemptions_total"]) - run.preemptions_before,
        **({} if run.peak_running is None else {"peak_running": run.peak_running}),
    }


def replies(results: list[dict]) -> dict:
    """Finish reasons and reply lengths (tokens) of the completed requests."""
    ok = sorted(r["tokens"] for r in results if r["status"] == 200 and r["error"] is None)
    return {"finish_reasons": dict(Counter(r["finish"] for r in results if r["status"] == 200 and r["error"] is None)),
            "reply_tokens_p50": ok[len(ok) // 2] if ok else None, "reply_tokens_max": ok[-1] if ok else None}


def clean(phase: dict, refused_ok: bool = False) -> bool:
    """No errors, none lost, no blocks leaked; unless `refused_ok`, no 503 either."""
    return (phase["errors"] == phase["lost"] == phase["blocks_leaked"] == 0
            and (refused_ok or phase["rejected_503"] == 0))


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
    ap.add_argument("--chat-requests", type=int, default=64, help="phase 3: chat requests without max_tokens")
    ap.add_argument("--poll-interval", type=float, default=0.15, help="phase 3: seconds between /metrics reads")
    ap.add_argument("--phase-timeout", type=float, default=420.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-offline", action="store_true", help="skip the offline engine peer")
    ap.add_argument("--only", choices=("wait", "reject", "chat"), help="run one phase (wait: phase 1 and its "
                    "offline peer, reject: phase 2, chat: phase 3)")
    a = ap.parse_args()

    prompt, out = (a.min_prompt, a.max_prompt), (a.min_tokens, a.max_tokens)
    common = ["--model", a.model, "--block-size", "16"]
    bodies = workload(a.requests, a.seed, prompt, out)
    report, ok = {}, True
    if a.only in (None, "wait"):
        with kvforge_serve([*common, "--kv-cache-memory", str(a.kv_cache_memory), "--on-full", "wait"]) as url:
            phase1 = summarize(asyncio.run(run_load(url, bodies, a.concurrency, a.phase_timeout)), url)
        report["wait"], ok = phase1, ok and clean(phase1)
    if a.only in (None, "reject"):
        n2 = a.phase2_requests if a.phase2_requests is not None else max(1, a.requests // 2)
        with kvforge_serve([*common, "--num-blocks", str(a.tiny_blocks), "--on-full", "reject"]) as url:
            phase2 = summarize(asyncio.run(run_load(url, workload(n2, a.seed + 1, prompt, out), a.concurrency,
                                                    a.phase_timeout)), url)
        report["reject_tiny_cache"], ok = {"num_blocks": a.tiny_blocks, **phase2}, ok and clean(phase2, refused_ok=True)
    if a.only in (None, "chat"):
        with kvforge_serve(["--model", a.model]) as url:
            run = asyncio.run(run_load(url, chat_workload(a.chat_requests, a.seed + 2), a.concurrency,
                                       a.phase_timeout, "/v1/chat/completions", a.poll_interval))
            phase3 = {**summarize(run, url), **replies(run.results)}
        report["chat_no_max_tokens"], ok = {"stop": CHAT_STOP, **phase3}, ok and clean(phase3)
    if "wait" in report:
        offline = None if a.no_offline else offline_tok_s(a.model, bodies, a.kv_cache_memory, a.concurrency)
        report["offline_engine_output_tok_s"] = offline
        report["server_vs_offline"] = round(report["wait"]["output_tok_s"] / offline, 2) if offline else None
    shape = {"prompt_tokens": list(prompt), "max_tokens": list(out)} if a.only != "chat" else {}
    print(json.dumps({"bench": "serve_load", "model": a.model, "concurrency": a.concurrency, "seed": a.seed,
                      **shape, "ok": ok, **report}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
