"""Shared fixtures: the embedded model loaded once per session, for kvforge and for HF transformers."""

from __future__ import annotations

import os

import pytest
import torch

from kvforge import LLM
from kvforge.model.loader import resolve_model_path

MODEL = "smollm2-135m"
# The device the engine tests run on: the CPU by default; KVFORGE_TEST_DEVICE=cuda runs the same
# engine and server tests on a GPU, in float32 unless a test asks for another dtype.
DEVICE = os.environ.get("KVFORGE_TEST_DEVICE", "cpu")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
]


def assert_engine_idle(engine) -> None:
    """No request left anywhere in `engine` and every block accounted for: integrity holds (which
    checks the per-request maps, generators, detokenizers and chunk user counts against the
    queues), nothing runs or waits, every registered chunk has no user, and no block is held but by
    chunk pages and pins."""
    engine.check_integrity()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and not engine.has_unfinished_requests(), stats
    assert all(engine.cache.chunk_users(c.chunk_id) == 0 for c in engine.list_chunks())
    held = stats.cache.num_chunk_blocks + stats.cache.num_pinned_blocks
    assert stats.cache.num_used_blocks == held, stats.cache


def run_checked(llm, prompts, params):
    """Generate step by step, checking after every step that each running sequence's cache holds
    exactly its computed tokens (a rejected draft rolled back) and every block is accounted for (a
    draft model's cache too); the output token ids of each prompt, in order."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        engine.check_integrity()
        for seq in engine.scheduler.running:
            if seq.fills_chunk is None:
                assert engine.cache.length(seq.seq_id) == seq.num_computed
    return [done[str(i)] for i in range(len(prompts))]


def run_counted(llm, prompts, params):
    """`run_checked`, plus the tokens drafted and accepted meanwhile: (outputs, drafted, accepted)."""
    before = llm.stats()
    outputs = run_checked(llm, prompts, params)
    after = llm.stats()
    return (outputs, after.spec_draft_tokens - before.spec_draft_tokens,
            after.spec_accepted_tokens - before.spec_accepted_tokens)


def engine_kwargs(**kwargs) -> dict:
    """Engine options for a test: a 64 MiB arena on the test device (float32 unless given)."""
    kwargs.setdefault("kv_cache_memory", 64 << 20)
    kwargs.setdefault("device", DEVICE)
    kwargs.setdefault("dtype", "float32")
    return kwargs


def make_llm(**kwargs) -> LLM:
    return LLM(MODEL, **engine_kwargs(**kwargs))


@pytest.fixture(scope="session")
def llm() -> LLM:
    return make_llm()


@pytest.fixture(scope="session")
def hf_model():
    transformers = pytest.importorskip("transformers")
    path = resolve_model_path(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()
