"""Multi-turn chat: 8 conversations x 6 turns, each turn re-sending the whole conversation.

Every conversation starts with the same system prompt (bench/data/chat_workload.json); each turn
appends the user's message, and the model's reply (greedy, up to 48 tokens) is appended before the
next turn, rendered with the model's chat template, as an OpenAI-style client does. Turns are sent
one after another, round-robin across conversations (turn 1 of all, then turn 2, ...). Same run:
kvforge with and without prefix caching. Reports the prefix-cache hit rate (prompt tokens served
from the cache / prompt tokens), prefill tokens computed and mean TTFT. Prints one JSON line.

    .venv/bin/python bench/chat_turns.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kvforge import LLM, SamplingParams

DATA = Path(__file__).parent / "data" / "chat_workload.json"


def run(llm: LLM, system: str, conversations: list[list[str]], max_tokens: int) -> dict:
    engine, tok = llm.engine, llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    histories = [[{"role": "system", "content": system}] for _ in conversations]
    before = engine.stats()
    ttft, cached, prompt = [], 0, 0
    for turn in range(max(map(len, conversations))):
        for c, messages in enumerate(conversations):
            if turn >= len(messages):
                continue
            history = histories[c]
            history.append({"role": "user", "content": messages[turn]})
            ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True), add_special_tokens=False)
            start = time.perf_counter()
            engine.add_request(f"c{c}-t{turn}", {"prompt_token_ids": ids}, params)
            first, final = None, None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter() - start
                    if out.finished:
                        final = out
            ttft.append(first)
            cached += final.num_cached_tokens
            prompt += len(ids)
            history.append({"role": "assistant", "content": final.outputs[0].text})
    after = engine.stats()
    engine.check_integrity()
    return {
        "requests": len(ttft),
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "hit_rate": round(cached / prompt, 4),
        "prefill_tokens_computed": after.prompt_tokens - before.prompt_tokens,
        "mean_ttft_s": round(statistics.mean(ttft), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    data = json.loads(DATA.read_text())
    results = {}
    for name, caching in (("kvforge_cached", True), ("kvforge_uncached", False)):
        llm = LLM(args.model, enable_prefix_caching=caching, kv_cache_memory=512 << 20)
        results[name] = run(llm, data["system"], data["conversations"], args.max_tokens)
        del llm
    print(json.dumps({
        "bench": "chat_turns",
        "model": args.model,
        "conversations": len(data["conversations"]),
        "turns": max(map(len, data["conversations"])),
        **results,
        "ttft_speedup": round(results["kvforge_uncached"]["mean_ttft_s"] / results["kvforge_cached"]["mean_ttft_s"], 2),
        "hit_rate_target": 0.85,
    }))


if __name__ == "__main__":
    main()
