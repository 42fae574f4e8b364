"""Speculative decoding: decode speed-up and acceptance rate against plain decoding, one run, on a
workload where prompt lookup shines and one where it does not.

Same run, same model (the embedded SmolLM2 GGUF; the device's default dtype unless `--dtype`: float32
on the CPU, bfloat16 on a GPU), two LLMs: plain decoding and
`speculative_config={"method": "ngram", "num_speculative_tokens": k}` (prompt lookup, the default), or
with `--method draft --draft-model M` `{"method": "draft", "model": M, "num_speculative_tokens": k}`
(a draft model). Requests one at a time (batch 1), greedy, `--new-tokens` each (ignore_eos), through
the chat template:

- editing: "correct the spelling of this text" over passages of bench/data/rag_documents.json with a
  few words misspelt: the answer copies the passage;
- open: open-ended writing requests (in this file): little to look up.

decode_tok_s = (new_tokens - 1) / (finish - first token), summed over the requests' times; speedup =
speculative / plain; acceptance_rate = accepted / drafted tokens; tokens_per_step = decode tokens per
engine step. `outputs_match`: every greedy output equal token for token. Target (issue 14): editing
>= 1.5x with identical output, open >= 0.95x. Prints one JSON line.

    .venv/bin/python bench/speculative.py [--device auto] [--dtype float32] [--k 4] [--new-tokens 128]
                                          [--requests 4]
                                          [--method ngram | --method draft --draft-model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvforge import LLM, SamplingParams

DATA = Path(__file__).parent / "data"


OPEN = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain to a child why the sky changes colour at sunset.",
        "Invent a recipe for a soup made from autumn vegetables and describe how to cook it.",
        "Describe an imaginary city on the back of a giant turtle.",
        "Give advice to someone starting to learn the violin as an adult.",
        "Write a letter from a cat to its owner about the new dog."]


def misspell(text: str, every: int = 9) -> str:
    words = text.split()
    return " ".join(w[::-1] if i % every == 4 and len(w) > 3 else w for i, w in enumerate(words))


def workloads(n: int) -> dict[str, list[list[dict]]]:
    docs = json.loads((DATA / "rag_documents.json").read_text())["documents"]
    editing = [[{"role": "user", "content": "Correct the spelling mistakes in this text and write it out again in "
                 f"full:\n\n{misspell(d['text'][:900])}"}] for d in docs[:n]]
    open_ = [[{"role": "user", "content": q}] for q in OPEN[:n]]
    return {"editing": editing, "open": open_}


def run(llm: LLM, prompts: list[list[dict]], new_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    before = llm.stats()
    decode_s, outputs = 0.0, []
    for i, messages in enumerate(prompts):
        engine.add_request(f"r{i}", engine.tokenize_chat(messages), params)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                if out.finished:
                    decode_s += time.perf_counter() - first
                    outputs.append(list(out.outputs[0].token_ids))
    after = llm.stats()
    drafted = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    steps = after.num_steps - before.num_steps - len(prompts)  # less the prefill steps
    return {"decode_tok_s": round(len(prompts) * (new_tokens - 1) / decode_s, 2),
            "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "tokens_per_step": round(len(prompts) * (new_tokens - 1) / steps, 2), "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the device's)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--method", choices=("ngram", "draft"), default="ngram")
    ap.add_argument("--draft-model", default=None, help="with --method draft: the draft model (a name or path)")
    args = ap.parse_args()
    if (args.method == "draft") != (args.draft_model is not None):
        ap.error("--draft-model goes with --method draft, and --method draft needs it")
    common = dict(model=args.model, device=args.device, dtype=args.dtype, kv_cache_memory=512 << 20)
    plain = LLM(**common)
    speculative = {"method": args.method, "num_speculative_tokens": args.k}
    if args.draft_model is not None:
        speculative["model"] = args.draft_model
    spec = LLM(**common, speculative_config=speculative)
    line = {"bench": "speculative", "device": str(plain.engine.device), "dtype": str(plain.engine.dtype).removeprefix("torch."),
            "model": args.model, "method": args.method,
            "draft_model": args.draft_model, "k": args.k, "new_tokens": args.new_tokens, "requests": args.requests}
    for name, prompts in workloads(args.requests).items():
        run(plain, prompts[:1], 8)  # warm-up
        run(spec, prompts[:1], 8)
        base = run(plain, prompts, args.new_tokens)
        fast = run(spec, prompts, args.new_tokens)
        line[name] = {"plain_tok_s": base["decode_tok_s"], "spec_tok_s": fast["decode_tok_s"],
                      "speedup": round(fast["decode_tok_s"] / base["decode_tok_s"], 2),
                      "acceptance_rate": fast["acceptance_rate"], "tokens_per_step": fast["tokens_per_step"],
                      "outputs_match": fast["outputs"] == base["outputs"]}
    line["target_met"] = (line["editing"]["speedup"] >= 1.5 and line["editing"]["outputs_match"]
                          and line["open"]["speedup"] >= 0.95 and line["open"]["outputs_match"])
    print(json.dumps(line))


if __name__ == "__main__":
    main()
