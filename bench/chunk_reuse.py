"""Chunk reuse on a RAG workload: full prefill vs chunk KV reuse at r = 0 and r = 0.15.

Data: bench/data/rag_documents.json (8 documents of 470-500 tokens, 24 questions). Each request is
a system chunk (the chat template's system turn and the opening of the user turn), 4 document
chunks picked and ordered at random (one of them holds the answer), then the question (closing the
user turn and opening the assistant's). Every chunk is registered once, up front. Same run, same
engine (SmolLM2 GGUF, float32), for each request:
  - full prefill: the composed token ids as a plain prompt, prefix cache emptied first;
  - chunk reuse, r = 0 (pure reuse), r = 0.15 with the "first" rule (the first 15% of each later
    chunk recomputed), and r = 0.15 with the "deviation" rule (the 15% whose K/V at layer 1
    deviates most, measured by running two layers over the whole prompt).
Reports mean TTFT (add_request to the first token, one request at a time) and quality against
full prefill: first-token agreement; agreement over 32 greedy tokens (fraction of positions equal,
and the fraction of requests equal throughout); the mean KL(full || mode) of next-token
distributions over the first 8 steps, teacher-forced on full prefill's tokens (step i feeds the
first i of them after the prompt); and how often the answer string appears in the 32 tokens.
Prints one JSON line.

    .venv/bin/python bench/chunk_reuse.py [--questions 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams

DATA = Path(__file__).parent / "data" / "rag_documents.json"
MODES = {"r0": (0.0, "first"), "r0.15": (0.15, "first"), "r0.15_deviation": (0.15, "deviation")}
NEW_TOKENS, KL_STEPS = 32, 8


def first_token_time(engine, add) -> tuple[float, list[int]]:
    """Run one request to completion alone; return (TTFT in s, its output token ids)."""
    start = time.perf_counter()
    request_id = add()
    ttft, tokens = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                if ttft is None and out.outputs[0].token_ids:
                    ttft = time.perf_counter() - start
                tokens = out.outputs[0].token_ids
    return ttft, tokens


def distribution(output, vocab: int) -> torch.Tensor:
    """The next-token log-probabilities of a one-token output generated with logprobs=-1."""
    entries = output.outputs[0].logprobs[0]
    dense = torch.full((vocab,), float("-inf"))
    dense[list(entries)] = torch.tensor([e.logprob for e in entries.values()])
    return dense


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float(torch.sum(p_log.exp() * (p_log - q_log)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--docs-per-request", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = json.loads(DATA.read_text())
    rng = random.Random(args.seed)

    llm = LLM(args.model, kv_cache_memory=1 << 30)
    engine, tok = llm.engine, llm.get_tokenizer()
    vocab = engine.model_config.vocab_size
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    system = llm.register_chunk(encode(f"<|im_start|>system\n{data['system']}<|im_end|>\n<|im_start|>user\n"),
                                kind="system")
    docs = {d["id"]: llm.register_chunk(encode(f"Document: {d['title']}\n{d['text']}\n\n"), chunk_id=d["id"])
            for d in data["documents"]}
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    one_step = SamplingParams(temperature=0, max_tokens=1, logprobs=-1)

    ttft = {"full": [], **{m: [] for m in MODES}}
    first_agree = {m: 0 for m in MODES}
    positions_agree = {m: [] for m in MODES}
    all_agree = {m: 0 for m in MODES}
    kls = {m: [] for m in MODES}
    answered = {"full": 0, **{m: 0 for m in MODES}}
    forward_tokens = {"full": 0, **{m: 0 for m in MODES}}
    prompt_lengths = []
    questions = data["questions"][:args.questions]
    for n, q in enumerate(questions):
        others = [d for d in docs if d != q["document"]]
        picked = rng.sample(others, args.docs_per_request - 1) + [q["document"]]
        rng.shuffle(picked)
        chunks = [system] + [docs[d] for d in picked]
        query = encode(f"Question: {q['question']}<|im_end|>\n<|im_start|>assistant\n")
        full = [t for c in chunks for t in c.token_ids] + query
        prompt_lengths.append(len(full))

        llm.reset_prefix_cache()
        before = engine.stats().prompt_tokens
        t, reference = first_token_time(engine, lambda: _add(engine, f"full-{n}", full, greedy))
        forward_tokens["full"] += engine.stats().prompt_tokens - before
        ttft["full"].append(t)
        answered["full"] += q["answer"] in tok.decode(reference)
        # Teacher-forced reference distributions (the prefix cache makes steps after the first cheap).
        ref_dists = [distribution(llm.generate({"prompt_token_ids": full + reference[:i]}, one_step,
                                               use_tqdm=False)[0], vocab)
                     for i in range(KL_STEPS)]
        for mode, (ratio, rule) in MODES.items():
            before = engine.stats().prompt_tokens
            t, tokens = first_token_time(engine, lambda: _add_chunks(engine, f"{mode}-{n}", chunks, query,
                                                                     greedy, ratio, rule))
            forward_tokens[mode] += engine.stats().prompt_tokens - before
            ttft[mode].append(t)
            first_agree[mode] += tokens[0] == reference[0]
            same = [a == b for a, b in zip(tokens, reference)]
            positions_agree[mode].append(sum(same) / len(same))
            all_agree[mode] += all(same)
            answered[mode] += q["answer"] in tok.decode(tokens)
            for i in range(KL_STEPS):
                out = llm.generate_from_chunks(chunks, query + reference[:i], one_step, ratio, rule)
                kls[mode].append(kl(ref_dists[i], distribution(out, vocab)))
        engine.check_integrity()

    count = len(questions)
    full_ttft = statistics.mean(ttft["full"])
    result = {
        "bench": "chunk_reuse",
        "model": args.model,
        "requests": count,
        "docs_per_request": args.docs_per_request,
        "mean_prompt_tokens": round(statistics.mean(prompt_lengths), 1),
        "full_prefill": {"mean_ttft_s": round(full_ttft, 4), "forward_tokens_per_request": forward_tokens["full"] / count,
                         "answer_found": round(answered["full"] / count, 3)},
    }
    for mode in MODES:
        mean_ttft = statistics.mean(ttft[mode])
        result[mode] = {
            "mean_ttft_s": round(mean_ttft, 4),
            "ttft_speedup_vs_full": round(full_ttft / mean_ttft, 2),
            "forward_tokens_per_request": round(forward_tokens[mode] / count, 1),
            "first_token_agreement": round(first_agree[mode] / count, 3),
            "token_agreement_32": round(statistics.mean(positions_agree[mode]), 3),
            "all_32_equal": round(all_agree[mode] / count, 3),
            "mean_kl_first_8": round(statistics.mean(kls[mode]), 4),
            "answer_found": round(answered[mode] / count, 3),
        }
    result["targets"] = {
        "ttft_speedup_r0.15_ge_4x": result["r0.15"]["ttft_speedup_vs_full"] >= 4,
        "first_token_agreement_r0.15_ge_0.9": result["r0.15"]["first_token_agreement"] >= 0.9,
        "r0.15_closer_than_r0": result["r0.15"]["mean_kl_first_8"] < result["r0"]["mean_kl_first_8"],
    }
    print(json.dumps(result))


def _add(engine, request_id: str, ids: list[int], params: SamplingParams) -> str:
    engine.add_request(request_id, {"prompt_token_ids": ids}, params)
    return request_id


def _add_chunks(engine, request_id: str, chunks, query: list[int], params: SamplingParams, ratio: float,
                rule: str) -> str:
    engine.add_chunk_request(request_id, chunks, {"prompt_token_ids": query}, params, ratio, rule)
    return request_id


if __name__ == "__main__":
    main()
