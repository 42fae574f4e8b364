"""The engine on a CUDA GPU against the CPU engine (SmolLM2 GGUF): same greedy tokens in float32,
bf16 close to float32, CUDA-graph decode equal to eager decode, and preemption-, prefix- and
chunk-heavy runs that leave every block accounted for. Skipped, visibly, without a GPU."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kvforge import SamplingParams
from kvforge.model.runner import TokenRun
from tests.conftest import PROMPTS, assert_engine_idle, make_llm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MORE = PROMPTS + [
    "Water boils at a temperature of",
    "import numpy as np\n\ndef softmax(x):",
    "The quick brown fox",
    "List of prime numbers: 2, 3, 5, 7,",
    "In 1969, the first humans",
    "A recipe for pancakes: first,",
    "SELECT name, age FROM users WHERE",
    "The mitochondria is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def cpu_llm():
    return make_llm(device="cpu")


@pytest.fixture(scope="module")
def gpu_llm():
    return make_llm(device="cuda", dtype="float32")


def test_the_gpu_engine_keeps_weights_and_arena_on_the_gpu(gpu_llm):
    engine = gpu_llm.engine
    assert engine.kv_cache.k[0].is_cuda and next(engine.model.parameters()).is_cuda
    assert engine.runner.graphs is not None  # decode steps replay CUDA graphs


def test_float32_on_cuda_gives_the_cpu_engines_greedy_tokens(cpu_llm, gpu_llm):
    expected = _tokens(cpu_llm.generate(MORE, GREEDY))
    got = _tokens(gpu_llm.generate(MORE, GREEDY))
    same = sum(a == b for a, b in zip(expected, got))
    print(f"\nfloat32 cuda vs cpu: {same}/{len(MORE)} prompts with identical 32 greedy tokens")
    assert same == len(MORE)
    assert_engine_idle(gpu_llm.engine)


@pytest.fixture(scope="module")
def eager_llm():
    return make_llm(device="cuda", dtype="float32", enforce_eager=True)


def test_cuda_graph_decode_gives_the_eager_decodes_tokens(gpu_llm, eager_llm):
    assert eager_llm.engine.runner.graphs is None
    assert _tokens(eager_llm.generate(MORE, GREEDY)) == _tokens(gpu_llm.generate(MORE, GREEDY))


def _chunk_requests(llm, recompute_ratios=(0.0,)) -> dict[str, list[int]]:
    """8 requests composed from a system chunk and 1-3 documents (recomputing the ratios in turn)
    beside 8 plain ones, run to the end: each request's tokens. Leaves the engine idle, its chunks
    unregistered."""
    system = "<|im_start|>system\nYou answer from the documents, briefly.<|im_end|>\n"
    docs = [f"Document {i}: the {w} costs {i * 7 + 3} coins. " for i, w in enumerate(["lamp", "chair", "rug"])]
    sys_chunk = llm.register_chunk(system, kind="system")
    chunks = [llm.register_chunk(d) for d in docs]
    engine, out = llm.engine, {}
    for i in range(8):
        picked = [chunks[(i + j) % 3] for j in range(1 + i % 3)]
        engine.add_chunk_request(f"c{i}", [sys_chunk, *picked], f"Question {i}: what costs the most?",
                                 GREEDY, recompute_ratio=recompute_ratios[i % len(recompute_ratios)])
        engine.add_request(f"p{i}", MORE[i], GREEDY)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    for c in [sys_chunk, *chunks]:
        llm.unregister_chunk(c.chunk_id)
    assert_engine_idle(engine)
    return out


def _lone_queries(llm) -> dict[str, list[int]]:
    """A composed prompt alone (its query a step of its own: an extend graph), whole and recomputing
    half of its second document: each one's tokens."""
    chunks = [llm.register_chunk(f"Document {i}: the {w} costs {i * 5 + 2} coins. ") for i, w in enumerate(["cup", "pen"])]
    try:
        return {f"q{r}": llm.generate_from_chunks(chunks, "Question: which costs more?", GREEDY,
                                                  recompute_ratio=r).outputs[0].token_ids for r in (0.0, 0.5)}
    finally:
        for c in chunks:
            llm.unregister_chunk(c.chunk_id)


def test_composed_steps_replay_cascade_graphs_with_the_eager_tokens(gpu_llm, eager_llm):
    graphs = gpu_llm.engine.runner.graphs
    replays = []
    run = graphs.run
    graphs.run = lambda runs, shape, *args, **kw: replays.append(shape) or run(runs, shape, *args, **kw)
    ratios = (0.0, 0.15, 1.0)  # chunks seen whole; recomputed tokens inside them (masked graphs)
    try:
        results = [_chunk_requests(llm, ratios) | _lone_queries(llm) for llm in (eager_llm, gpu_llm)]
    finally:
        graphs.run = run
    decode = sum(s.cascade and s.query_len == 1 for s in replays)
    query = sum(s.cascade and s.query_len > 1 for s in replays)  # composed prompts' queries
    masked = sum(s.masked for s in replays)
    same = sum(results[0][k] == results[1][k] for k in results[0])
    print(f"\ncascade graphs: {decode} decode and {query} extend replays, {masked} of them masked; "
          f"{same}/{len(results[0])} requests with the eager tokens")
    assert decode >= 16 and query >= 2 and masked >= 17 and same == len(results[0])


def test_eager_composed_steps_read_their_chunks_as_one_segment_batch_with_the_per_chunk_tokens(eager_llm):
    runner = eager_llm.engine.runner
    staging, packed = runner.segments, []
    pack = staging.pack
    staging.pack = lambda reads, n: (pack(reads, n), packed.append(staging.num_masks))
    ratios = (0.0, 0.15, 1.0)  # selective recompute: masked chunk keys, rows inside the chunks
    try:
        batched = _chunk_requests(eager_llm, ratios)
        runner.segments = None  # every chunk attention call by call, with its mask (a step too big for the batch)
        per_chunk = _chunk_requests(eager_llm, ratios)
    finally:
        runner.segments = staging
        del staging.pack
    same = sum(batched[k] == per_chunk[k] for k in batched)
    print(f"\neager segment batches: {len(packed)} steps, {sum(m > 0 for m in packed)} with masks; "
          f"{same}/{len(batched)} requests with the per-chunk tokens")
    assert packed and max(packed) > 0 and same == len(batched)


def _last_logits(llm, ids: list[int]) -> torch.Tensor:
    engine = llm.engine
    engine.cache.add_sequence(99_999, capacity=len(ids))
    try:
        slots = engine.cache.append(99_999, len(ids))
        return engine.runner.run([TokenRun(ids, 0, slots, engine.cache.block_table(99_999), True)])[0].float()
    finally:
        engine.cache.free(99_999)


def test_bfloat16_first_tokens_agree_with_float32_and_kl_is_small(gpu_llm):
    bf16 = make_llm(device="cuda", dtype=None)
    assert bf16.engine.kv_cache.k[0].dtype == torch.bfloat16  # the default dtype on GPU
    tok = gpu_llm.get_tokenizer()
    agree, kls = 0, []
    for prompt in MORE:
        ids = tok.encode(prompt)
        ref, low = _last_logits(gpu_llm, ids), _last_logits(bf16, ids)
        agree += int(ref.argmax() == low.argmax())
        kls.append(float(torch.nn.functional.kl_div(low.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                    reduction="sum")))
    mean_kl = sum(kls) / len(kls)
    print(f"\nbf16 vs float32 on cuda: first-token agreement {agree}/{len(MORE)}, mean KL {mean_kl:.4f}")
    assert agree >= len(MORE) - 2 and mean_kl < 0.1


def test_a_preemption_heavy_run_on_cuda_keeps_greedy_outputs_and_every_block(gpu_llm):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = _tokens(gpu_llm.generate(MORE, params))
    tiny = make_llm(device="cuda", dtype="float32", num_blocks=12, block_size=16)
    outs = tiny.generate(MORE, params)
    assert tiny.stats().num_preemptions > 0
    assert _tokens(outs) == expected
    assert_engine_idle(tiny.engine)


def test_a_prefix_and_chunk_heavy_run_on_cuda_matches_the_cpu_engine_and_stays_intact(cpu_llm, gpu_llm):
    system = "<|im_start|>system\nYou answer from the documents, briefly.<|im_end|>\n"
    docs = [f"Document {i}: the {w} costs {i * 7 + 3} coins and is sold on weekdays only. "
            for i, w in enumerate(["lamp", "chair", "kettle", "clock", "rug", "vase"])]
    questions = [f"Question: how much does the {w} cost? Answer:" for w in ["lamp", "rug", "clock", "vase"]]
    results = {}
    for name, llm in (("cpu", cpu_llm), ("cuda", gpu_llm)):
        sys_chunk = llm.register_chunk(system, kind="system")
        chunks = [llm.register_chunk(d) for d in docs]
        handle = llm.pin_prefix(system + docs[0])
        engine, params, out = llm.engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), {}
        for i, q in enumerate(questions * 3):
            picked = [chunks[(i + j) % len(chunks)] for j in range(3)]
            engine.add_chunk_request(f"{name}-c{i}", [sys_chunk, *picked], q, params,
                                     recompute_ratio=(0.0, 0.15, 1.0)[i % 3])
            engine.add_request(f"{name}-p{i}", system + docs[i % 2] + q, params)
            engine.add_request(f"{name}-s{i}", system + docs[0] + q,
                               dataclasses.replace(params, cache_salt=f"tenant{i % 2}"))
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id.split("-", 1)[1]] = o.outputs[0].token_ids
        results[name] = out
        llm.unpin(handle)
        for c in [sys_chunk, *chunks]:
            llm.unregister_chunk(c.chunk_id)
        assert_engine_idle(engine)
        assert engine.cache.stats().num_used_blocks == 0
    same = sum(results["cpu"][k] == results["cuda"][k] for k in results["cpu"])
    print(f"\nprefix/chunk-heavy run: {same}/{len(results['cpu'])} requests with the CPU engine's tokens")
    assert same >= len(results["cpu"]) - 2


def test_the_openai_server_serves_completions_on_cuda(tmp_path):
    """The server over a GPU engine (a tiny dummy model: no checkpoint needed), through HTTP."""
    import httpx

    from kvforge.config import EngineConfig
    from kvforge.engine import LLMEngine
    from kvforge.server import ServerConfig
    from kvforge.server.serve import Server
    from tests.gpu.test_gpu_memory import TINY

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tmp_path), load_format="dummy", device="cuda",
                                                kv_cache_memory=64 << 20))
    server = Server(engine, ServerConfig(port=0, log_level="warning")).start()
    try:
        body = {"model": str(tmp_path), "prompt": "<t5> <t6> <t7>", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert out.get("usage", {}).get("completion_tokens") == 8, out
        stream = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60)
        assert stream.status_code == 200 and "[DONE]" in stream.text
    finally:
        server.stop()
    assert_engine_idle(engine)


def test_a_short_suffix_after_a_cached_prefix_replays_an_extend_graph_with_the_eager_logits(gpu_llm):
    engine, runner = gpu_llm.engine, gpu_llm.engine.runner
    ids = list(range(200, 500))
    engine.cache.add_sequence(99_998, capacity=len(ids))
    try:
        prefix = TokenRun(ids[:270], 0, engine.cache.append(99_998, 270), engine.cache.block_table(99_998), False)
        runner.run([prefix])
        suffix = TokenRun(ids[270:], 270, engine.cache.append(99_998, 30), engine.cache.block_table(99_998), True)
        shape = runner.graphs.shape_for([suffix])
        assert shape is not None and shape.query_len == 32 and shape.batch == 1
        graphed = runner.run([suffix]).clone()
        eager = runner._forward([suffix], runner.pages())
        assert graphed.shape == eager.shape == (1, engine.model_config.vocab_size)
        torch.testing.assert_close(graphed, eager, atol=2e-3, rtol=1e-3)
        # prompt log-probabilities need every row's logits: eager
        assert runner.graphs.shape_for([suffix._replace(all_logits=True)]) is None
    finally:
        engine.cache.free(99_998)
    assert_engine_idle(engine)
