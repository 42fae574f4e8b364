"""kvforge on a GPU vs HF transformers, same run, same shapes (run it on the H200; prints one JSON line).

Parts (`--parts`, default all of the first five):
  decode    512-token prompts + 128 new tokens at batch 1, 32, 128 on a Llama-3.2-1B-shaped model
            with random bf16 weights (`load_format="dummy"`, bench/data/llama-3.2-1b/config.json):
            output tok/s of the whole generate (prefill included) for kvforge and HF `generate` with
            its static cache (compiled by generate), warmed up at the same sizes, the median of three
            runs each (alternating); the decode step time (median generate of 128 tokens minus median
            generate of 1, over 127 steps) and its share of the memory
            roofline: (weight bytes + KV bytes read per step) / the device-copy bandwidth measured in
            this run, over the measured step time.
  prefix    TTFT of a 32-token suffix after a cached 32k-token prefix vs kvforge's full prefill of
            the same 32k + 32 tokens, and HF's: a deep copy of the prefix's DynamicCache + a forward
            of the suffix, and its full prefill.
  cascade   64 requests composed from one shared 4k-token system chunk + a 32-token query each:
            decode step time with cascade attention (the chunk read once per layer for all 64; a
            cascade decode graph) vs the same tokens as plain prompts (prefix-cached blocks, each
            request reads its 4k keys), eager and in CUDA graphs; 64 steps timed once every prefill
            is done. And one layer's attention alone, both ways, kernels in CUDA graphs. Then the
            same steps over a 16k-token chunk, whose K/V (33.5 MB a layer) no longer sit in the L2
            cache the plain step's 64 readers share (the 4k chunk's 8.4 MB do).
  rag       4 x 1k-token context chunks + a 32-token question: TTFT with chunk reuse (r = 0 and 0.15)
            vs a full prefill of the same tokens (prefix cache emptied first).
  smollm    the embedded SmolLM2-135M GGUF in bf16, decode throughput at batch 1, 32, 128 vs HF
            static on the same weights (`--smollm PATH` to the .gguf when the package is absent).

    python bench/gpu.py [--parts decode,prefix,cascade,rag,smollm] [--smollm PATH] [--kv-cache-dtype int8]
                        [--async-scheduling on|off]

kvforge runs with its defaults, async scheduling included (`--async-scheduling off`: every step
synchronous, for an A/B).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams
from kvforge.types import OutputKind

CONFIG_1B = Path(__file__).parent / "data" / "llama-3.2-1b"
BATCHES = (1, 32, 128)
PROMPT, NEW = 512, 128
RUNS = 3  # timed runs per batch and engine (median)


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = sync_time(lambda: [dst.copy_(src) for _ in range(20)])
    return 2 * 20 * (1 << 30) / seconds


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def settle() -> None:
    """Collect and freeze the heap built so far (both models, graphs, HF's compiled code), as `kvforge
    serve` does at start-up, so that a full garbage collection of it (0.83 s over ~1.4M objects,
    measured in this process) does not land inside a timed run of either engine."""
    gc.collect()
    gc.freeze()


def kv_run(llm: LLM, prompts: list[list[int]], new: int) -> float:
    """All prompts in one continuous batch through `LLM.generate` (the offline API, as HF `generate`:
    outputs when each request is done); seconds until every request is done."""
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    seconds = sync_time(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    llm.engine.check_integrity()
    return seconds


def hf_model_from_config(config: dict, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def hf_run(hf, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts, device="cuda")
    mask = torch.ones_like(ids)

    def go():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              cache_implementation="static", pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new

    return sync_time(go)


def decode_rows(llm: LLM, hf, vocab: int, rng: random.Random, bandwidth: float) -> dict:
    """Throughput at each batch for kvforge and HF, and kvforge's decode step against the roofline."""
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    kv_per_token = llm.stats().kv_bytes_per_token  # K and V in the cache's format (bf16 with "auto")
    out = {}
    for batch in BATCHES:
        for _ in range(2):  # warm-up at the same sizes (graphs, kernels, HF's compile)
            kv_run(llm, random_prompts(rng, batch, PROMPT, vocab), NEW)
            hf_run(hf, random_prompts(rng, batch, PROMPT, vocab), NEW)
        settle()
        runs = []  # (kvforge 128 tokens, kvforge 1 token, HF 128 tokens), alternating
        for _ in range(RUNS):
            runs.append((kv_run(llm, random_prompts(rng, batch, PROMPT, vocab), NEW),
                         kv_run(llm, random_prompts(rng, batch, PROMPT, vocab), 1),
                         hf_run(hf, random_prompts(rng, batch, PROMPT, vocab), NEW)))
        kv_full, kv_first, hf_full = (statistics.median(column) for column in zip(*runs))
        step = (kv_full - kv_first) / (NEW - 1)
        kv_bytes = batch * (PROMPT + NEW / 2) * kv_per_token
        roofline_step = (weight_bytes + kv_bytes) / bandwidth
        out[f"b{batch}"] = {
            "kvforge_tok_s": round(batch * NEW / kv_full, 1),
            "hf_static_tok_s": round(batch * NEW / hf_full, 1),
            "ratio": round(hf_full / kv_full, 2),
            "kvforge_step_ms": round(step * 1e3, 3),
            "roofline_step_ms": round(roofline_step * 1e3, 3),
            "roofline_share": round(roofline_step / step, 3),
        }
    return out


def prefix_rows(llm: LLM, hf, vocab: int, rng: random.Random) -> dict:
    prefix = random_prompts(rng, 1, 32768, vocab)[0]
    one = SamplingParams(temperature=0, max_tokens=1)

    def ttft(tokens):
        return sync_time(lambda: llm.generate({"prompt_token_ids": tokens}, one, use_tqdm=False))

    llm.reset_prefix_cache()
    ttft(prefix + random_prompts(rng, 1, 32, vocab)[0])  # warm-up at this size
    llm.reset_prefix_cache()
    full = ttft(prefix + random_prompts(rng, 1, 32, vocab)[0])
    cached = statistics.median(ttft(prefix + random_prompts(rng, 1, 32, vocab)[0]) for _ in range(5))
    with torch.inference_mode():
        ids = torch.tensor([prefix], device="cuda")
        cache = hf(ids, use_cache=True, logits_to_keep=1).past_key_values

        def hf_reuse():
            suffix = torch.tensor(random_prompts(rng, 1, 32, vocab), device="cuda")
            hf(suffix, past_key_values=copy.deepcopy(cache), use_cache=True, logits_to_keep=1)

        hf_reuse()
        hf_cached = statistics.median(sync_time(hf_reuse) for _ in range(5))
        whole = torch.tensor([prefix + random_prompts(rng, 1, 32, vocab)[0]], device="cuda")
        hf(whole, logits_to_keep=1)
        hf_full = sync_time(lambda: hf(whole, logits_to_keep=1))
    torch.cuda.empty_cache()
    return {"kvforge_cached_ms": round(cached * 1e3, 2), "kvforge_full_ms": round(full * 1e3, 1),
            "hf_deepcopy_ms": round(hf_cached * 1e3, 2), "hf_full_ms": round(hf_full * 1e3, 1),
            "speedup_vs_full": round(full / cached, 1), "ratio_vs_hf_reuse": round(hf_cached / cached, 2)}


def cascade_rows(llm: LLM, vocab: int, rng: random.Random, chunk_len: int = 4096) -> dict:
    """Decode step time of 64 requests over one `chunk_len`-token system chunk, composed (cascade) and
    as plain prompts (eager and in CUDA graphs): the median of three runs of 64 timed steps each, taken
    once every prefill is done (outputs when each request ends, as LLM.generate gives them)."""
    engine = llm.engine
    system = random_prompts(rng, 1, chunk_len, vocab)[0]
    chunk = llm.register_chunk(system, kind="system")
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY)

    def composed(tag):
        for i, q in enumerate(random_prompts(rng, 64, 32, vocab)):
            engine.add_chunk_request(f"{tag}-{i}", [chunk], {"prompt_token_ids": q}, params, recompute_ratio=0.0)

    def plain(tag):
        for i, q in enumerate(random_prompts(rng, 64, 32, vocab)):
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": system + q}, params)

    def step_ms(add):
        runs = []
        for rep in range(3):
            add(f"r{time.monotonic_ns()}-{rep}")
            sched = engine.scheduler
            while sched.waiting or any(s.num_computed < s.num_prompt_tokens for s in sched.running):
                engine.step()
            for _ in range(4):  # the first decode steps
                engine.step()
            runs.append(sync_time(lambda: [engine.step() for _ in range(64)]) / 64)
            while engine.has_unfinished_requests():
                engine.step()
        engine.check_integrity()
        return round(statistics.median(runs) * 1e3, 3)

    cascade = step_ms(composed)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        eager = step_ms(plain)
    finally:
        engine.runner.graphs = graphs
    graphed = step_ms(plain)
    llm.unregister_chunk(chunk.chunk_id)
    return {"cascade_step_ms": cascade, "plain_eager_step_ms": eager, "plain_graphs_step_ms": graphed,
            "speedup_eager": round(eager / cascade, 2), "speedup_vs_graphs": round(graphed / cascade, 2)}


def cascade_attention_rows(rng: random.Random) -> dict:
    """The attention of one layer for the cascade workload, kernels only (each variant captured in a
    CUDA graph, so launch overhead is out): 64 decoding requests over a shared 4096-token chunk plus
    33 private tokens each, at the 1B shape (32 heads, 8 KV heads, D 64, bf16, pages of 16).
    Without cascade: one paged-attention launch over each request's 4129 keys (the shared pages in
    every block table). With cascade, as a cascade decode graph runs it: paged attention over the
    private pages with log-sum-exp, then the segment batch (the shared pages read once for all 64
    rows, split over the SMs) and the merge."""
    from triton.testing import do_bench

    from kvforge.model.staging import RunReads, SegmentStaging
    from kvforge.ops import triton as kernels
    from kvforge.types import ChunkPlacement

    n, heads, kv_heads, dim, page, shared, own = 64, 32, 8, 64, 16, 4096, 33
    shared_pages, own_pages = shared // page, -(-own // page)
    blocks = shared_pages + n * own_pages
    k_cache = torch.randn(blocks, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16)
    chunk_table = torch.arange(shared_pages, dtype=torch.int32, device="cuda")
    own_tables = (shared_pages + torch.arange(n * own_pages, dtype=torch.int32, device="cuda")).view(n, own_pages)
    full_tables = torch.cat([chunk_table.expand(n, -1), own_tables], dim=1).contiguous()
    cu = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    inv_freq = torch.ones(dim // 2, device="cuda")
    out, lse = torch.empty_like(q), torch.empty(n, heads, device="cuda")
    scale = dim ** -0.5

    def plain():
        kernels.paged_attention(q, k_cache, v_cache, cu, torch.full((n,), shared + own, dtype=torch.int32,
                                device="cuda"), full_tables, scale, out, lse, 1,
                                kernels.choose_num_splits(n, kv_heads, shared + own))

    staging = SegmentStaging(n, shared_pages, inv_freq, kv_heads, torch.device("cuda"))
    system = (ChunkPlacement("system", 0, 0, shared, tuple(range(shared_pages))),)
    staging.pack([RunReads(r, (shared + own - 1,), system, True) for r in range(n)], n)
    staging.upload()
    segments, own_out, own_lens = staging.batch(n), torch.empty_like(q), torch.full((n,), own, dtype=torch.int32,
                                                                                     device="cuda")

    def cascade():
        kernels.paged_attention(q, k_cache, v_cache, cu, own_lens, own_tables, scale, own_out, lse, 1, 1)
        kernels.segment_attention(q, k_cache, v_cache, segments, own_out, lse, scale, out)

    times = {}
    for name, fn in (("plain", plain), ("cascade", cascade)):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times[name] = do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3
    return {"plain_attention_us": round(times["plain"], 1), "cascade_attention_us": round(times["cascade"], 1),
            "speedup": round(times["plain"] / times["cascade"], 2)}


def rag_rows(llm: LLM, vocab: int, rng: random.Random) -> dict:
    one = SamplingParams(temperature=0, max_tokens=1)
    docs = random_prompts(rng, 4, 1024, vocab)
    chunks = [llm.register_chunk(d) for d in docs]
    rows: dict[str, list[float]] = {"full": [], "r0": [], "r15": []}
    for trial in range(6):
        question = random_prompts(rng, 1, 32, vocab)[0]
        llm.reset_prefix_cache()
        rows["full"].append(sync_time(lambda: llm.generate({"prompt_token_ids": sum(docs, []) + question}, one,
                                                           use_tqdm=False)))
        rows["r0"].append(sync_time(lambda: llm.generate_from_chunks(chunks, question, one, recompute_ratio=0.0)))
        rows["r15"].append(sync_time(lambda: llm.generate_from_chunks(chunks, question, one, recompute_ratio=0.15)))
    for c in chunks:
        llm.unregister_chunk(c.chunk_id)
    med = {k: statistics.median(v[1:]) * 1e3 for k, v in rows.items()}  # the first is a warm-up
    return {"full_ms": round(med["full"], 2), "reuse_r0_ms": round(med["r0"], 2), "reuse_r15_ms": round(med["r15"], 2),
            "speedup_r0": round(med["full"] / med["r0"], 2), "speedup_r15": round(med["full"] / med["r15"], 2)}


def smollm_rows(path: str | None, rng: random.Random, bandwidth: float, async_scheduling: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvforge.model.loader import load_model

    model = path or "smollm2-135m"
    loaded = load_model(model)
    c = loaded.config
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                         max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(loaded.weights, strict=False)
    hf = hf.to("cuda", torch.bfloat16).eval()
    del loaded
    llm = LLM(model, device="cuda", dtype="bfloat16", kv_cache_memory=8 << 30, max_num_seqs=128,
              max_num_batched_tokens=8192, enable_prefix_caching=False, async_scheduling=async_scheduling)
    rows = decode_rows(llm, hf, c.vocab_size, rng, bandwidth)
    del llm, hf
    torch.cuda.empty_cache()
    return rows


def progress(name: str, rows: dict) -> dict:
    """Each part's rows on stderr as soon as they exist (the JSON line comes at the end)."""
    print(json.dumps({name: rows}), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="decode,prefix,cascade,rag,smollm")
    ap.add_argument("--smollm", default=None, help="path to the SmolLM2 .gguf (default: the packaged alias)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-dtype", default="auto", help="the KV format of kvforge's cache (parts decode, "
                    "prefix, cascade, rag): auto (bf16), int8, int4, fp8_e4m3, fp8_e5m2")
    ap.add_argument("--async-scheduling", choices=("on", "off"), default="on",
                    help="launch each decode step before reading the previous one's tokens (kvforge's default on a GPU)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    parts = set(args.parts.split(","))
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    bandwidth = copy_bandwidth()
    result: dict = {"bench": "gpu", "device": torch.cuda.get_device_name(), "copy_tb_s": round(bandwidth / 1e12, 2),
                    "kv_cache_dtype": args.kv_cache_dtype, "async_scheduling": args.async_scheduling}
    config = json.loads((CONFIG_1B / "config.json").read_text())
    vocab = config["vocab_size"]
    if parts & {"decode", "prefix", "cascade", "rag"}:
        llm = LLM(str(CONFIG_1B), load_format="dummy", device="cuda", dtype="bfloat16", kv_cache_memory=40 << 30,
                  max_num_seqs=128, max_num_batched_tokens=8192, max_model_len=32768 + 256,
                  kv_cache_dtype=args.kv_cache_dtype, async_scheduling=args.async_scheduling == "on")
        settle()
        if "cascade" in parts:
            result["cascade_64x4k"] = progress("cascade_64x4k", cascade_rows(llm, vocab, rng))
            result["cascade_64x4k_attention"] = progress("cascade_64x4k_attention", cascade_attention_rows(rng))
            result["cascade_64x16k"] = progress("cascade_64x16k", cascade_rows(llm, vocab, rng, 16384))
        if "rag" in parts:
            result["rag_4x1k"] = progress("rag_4x1k", rag_rows(llm, vocab, rng))
        hf = hf_model_from_config(config, torch.bfloat16)
        settle()
        if "prefix" in parts:
            result["prefix_32k"] = progress("prefix_32k", prefix_rows(llm, hf, vocab, rng))
        if "decode" in parts:
            result["llama_1b_decode"] = progress("llama_1b_decode", decode_rows(llm, hf, vocab, rng, bandwidth))
        del hf
        del llm
        torch.cuda.empty_cache()
    if "smollm" in parts:
        result["smollm2_bf16_decode"] = progress("smollm2_bf16_decode", smollm_rows(args.smollm, rng, bandwidth,
                                                                                    args.async_scheduling == "on"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
