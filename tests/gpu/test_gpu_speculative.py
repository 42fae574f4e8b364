"""Speculative decoding on a CUDA GPU (SmolLM2 GGUF): verify steps replay CUDA graphs of query length
k + 1 whose logits equal the eager forward's, and greedy output equals plain greedy decoding in
float32, with prompt lookup and with a draft model; bf16 agreement is reported. Skipped, visibly,
without a GPU."""

from __future__ import annotations

import pytest
import torch

from kvforge import SamplingParams
from kvforge.model.runner import TokenRun
from tests.conftest import MODEL, PROMPTS, assert_engine_idle, make_llm, run_checked, run_counted
from tests.engine.test_speculative import EDIT, TEXT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

K = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": K}
DRAFT = {"method": "draft", "model": MODEL, "num_speculative_tokens": K}
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
PROMPTS_EDIT = [EDIT, *PROMPTS, TEXT * 2]


def _recording_shapes(llm) -> list:
    """Record the graph shapes `llm`'s runner replays from now on."""
    graphs, shapes = llm.engine.runner.graphs, []
    replay = graphs.run

    def run(runs, shape, *args, **kw):
        shapes.append(shape)
        return replay(runs, shape, *args, **kw)

    graphs.run = run
    return shapes


@pytest.fixture(scope="module")
def plain32():
    return run_checked(make_llm(device="cuda", dtype="float32"), PROMPTS_EDIT, GREEDY)


@pytest.mark.parametrize("spec", [NGRAM, DRAFT], ids=["ngram", "draft"])
def test_float32_speculation_on_cuda_replays_verify_graphs_and_gives_plain_greedy_tokens(plain32, spec):
    llm = make_llm(device="cuda", dtype="float32", speculative_config=spec)
    shapes = _recording_shapes(llm)
    outputs, drafted, accepted = run_counted(llm, PROMPTS_EDIT, GREEDY)
    assert outputs == plain32
    assert drafted > 0 and accepted > 0
    assert any(s.query_len == K + 1 for s in shapes), shapes
    assert_engine_idle(llm.engine)


def test_a_verify_graph_gives_the_eager_forwards_logits():
    llm = make_llm(device="cuda", dtype="float32", speculative_config=NGRAM)
    engine, runner = llm.engine, llm.engine.runner
    prompts = [list(range(100, 100 + n)) for n in (37, 5, 70)]
    for i, ids in enumerate(prompts):
        engine.cache.add_sequence(90_000 + i, capacity=len(ids) + K + 1)
    try:
        prefill = [TokenRun(ids, 0, engine.cache.append(90_000 + i, len(ids)), engine.cache.block_table(90_000 + i),
                            True) for i, ids in enumerate(prompts)]
        runner.run(prefill)
        lengths = (K + 1, 1, 3)  # a full verify, a plain decode, a short run
        runs = []
        for i, (ids, n) in enumerate(zip(prompts, lengths)):
            slots = engine.cache.append(90_000 + i, n)
            runs.append(TokenRun(list(range(7, 7 + n)), len(ids), slots, engine.cache.block_table(90_000 + i), True,
                                 all_logits=n > 1))
        shape = runner.graphs.shape_for(runs)
        assert shape is not None and shape.query_len == K + 1
        graphed = runner.run(runs).clone()
        eager = runner._forward(runs, runner.pages())
        assert graphed.shape == eager.shape == (K + 1 + 1 + 3, engine.model_config.vocab_size)
        torch.testing.assert_close(graphed, eager, atol=2e-3, rtol=1e-3)
    finally:
        for i in range(len(prompts)):
            engine.cache.free(90_000 + i)
    assert_engine_idle(engine)


def test_bfloat16_speculation_agreement_with_plain_decoding_is_reported():
    plain = run_checked(make_llm(device="cuda", dtype=None), PROMPTS_EDIT, GREEDY)
    got = run_checked(make_llm(device="cuda", dtype=None, speculative_config=NGRAM), PROMPTS_EDIT, GREEDY)
    same = sum(a == b for a, b in zip(plain, got))
    first = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(plain, got)]
    print(f"\nbf16 prompt lookup vs plain: {same}/{len(plain)} outputs identical; first difference at {first}")
    assert all(a[0] == b[0] for a, b in zip(plain, got))  # the prefill is the same forward
