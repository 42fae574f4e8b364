"""Chunk KV reuse through the engine: registered chunks composed at offsets (cascade attention), exact
token accounting, selective recompute, chunk pages that never change, and clear errors that leak nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from kvforge import SamplingParams
from kvforge.config import EngineConfig
from tests.conftest import make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SCORED = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
ONE = SamplingParams(temperature=0, max_tokens=1)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant who answers from the documents.<|im_end|>\n"
DOC1 = "Document one: The library opens at nine in the morning and closes at eight in the evening on weekdays."
DOC2 = "Document two: On weekends the library opens at ten and closes at four, except on public holidays."
DOC3 = "Document three: The reading room on the second floor has two hundred seats and free wifi."
Q1 = "Question: When does the library open on Saturday? Answer:"
Q2 = "Question: How many seats does the reading room have? Answer:"
Q3 = "Question: Is the library open on public holidays? Answer:"


def _ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer().encode(text)


def _tokens(out) -> list[int]:
    return out.outputs[0].token_ids


def _usage(llm) -> tuple:
    s = llm.stats()
    c = s.cache
    return s.num_running, s.num_waiting, c.num_sequences, c.num_used_blocks, c.num_chunks, c.num_chunk_blocks


def _drain(engine, max_steps: int = 500) -> dict:
    """Step until every request finishes; the final output of each, by request id."""
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


@contextlib.contextmanager
def _model_tokens(llm):
    """Counts the tokens that enter the model's forward pass (every call, whatever calls it)."""
    counts: list[int] = []
    handle = llm.engine.model.register_forward_pre_hook(lambda module, args: counts.append(args[0].numel()))
    try:
        yield counts
    finally:
        handle.remove()


@contextlib.contextmanager
def _registered_docs(llm):
    """A system chunk and three context chunks registered on `llm`, unregistered (and the cache
    checked) on exit."""
    tok = llm.get_tokenizer()
    d = SimpleNamespace(system=llm.register_chunk(SYSTEM, kind="system"), c1=llm.register_chunk(DOC1),
                        c2=llm.register_chunk(DOC2), c3=llm.register_chunk(DOC3),
                        q1=tok.encode(Q1), q2=tok.encode(Q2), q3=tok.encode(Q3))
    d.all = [d.system, d.c1, d.c2, d.c3]
    yield d
    for chunk in d.all:
        llm.unregister_chunk(chunk.chunk_id)
    llm.engine.check_integrity()


@pytest.fixture(scope="module")
def docs(llm):
    with _registered_docs(llm) as d:
        yield d


@pytest.fixture(scope="module")
def small():
    """A tiny pool (24 blocks of 16, chunk budget 30%) and step (64 tokens): prefix-cache eviction,
    preemption and prompts computed in pieces all happen."""
    return make_llm(num_blocks=24, max_chunk_fraction=0.3, max_num_batched_tokens=64, max_model_len=400)


@pytest.fixture
def small_docs(small):
    """The same chunks on the tiny LLM (7 blocks: its whole chunk budget); nothing held after."""
    with _registered_docs(small) as d:
        yield d
    assert small.stats().cache.num_used_blocks == 0


# ---- composition is exact where it must be -------------------------------------------------------

def test_a_system_chunk_and_a_query_give_the_same_greedy_tokens_as_the_plain_prompt(llm, docs):
    plain = llm.generate({"prompt_token_ids": list(docs.system.token_ids) + docs.q1}, GREEDY)[0]
    by_id = llm.generate_from_chunks([docs.system.chunk_id], docs.q1, GREEDY)
    by_object = llm.generate_from_chunks([docs.system], Q1, GREEDY)
    assert _tokens(by_id) == _tokens(by_object) == _tokens(plain)
    assert by_id.prompt_token_ids == plain.prompt_token_ids
    assert by_id.num_cached_tokens == docs.system.num_tokens
    assert by_id.outputs[0].text == plain.outputs[0].text
    llm.engine.check_integrity()


def test_a_single_context_chunk_placed_first_is_a_true_prefix(llm, docs):
    plain = llm.generate({"prompt_token_ids": list(docs.c1.token_ids) + docs.q2}, GREEDY)[0]
    out = llm.generate_from_chunks([docs.c1.chunk_id], docs.q2, GREEDY)
    assert _tokens(out) == _tokens(plain)
    assert out.num_cached_tokens == docs.c1.num_tokens


@pytest.mark.parametrize("names", [("system", "c1", "c2"), ("system", "c1", "c1")],
                         ids=["distinct-chunks", "a-chunk-used-twice"])
def test_recompute_ratio_one_equals_a_full_prefill_of_the_concatenated_prompt(llm, docs, names):
    chunks = [getattr(docs, n) for n in names]
    full = [t for c in chunks for t in c.token_ids] + docs.q1
    plain = llm.generate({"prompt_token_ids": full}, SCORED)[0]
    out = llm.generate_from_chunks([c.chunk_id for c in chunks], docs.q1, SCORED, recompute_ratio=1.0)
    assert _tokens(out) == _tokens(plain)
    assert out.outputs[0].cumulative_logprob == pytest.approx(plain.outputs[0].cumulative_logprob, abs=1e-3)
    assert out.prompt_token_ids == full
    # Only the chunk at position 0 is reused; every later chunk token (both offsets of a chunk used
    # twice) is recomputed.
    assert out.num_cached_tokens == docs.system.num_tokens


def test_with_a_bos_adding_tokenizer_only_the_system_chunk_starts_with_bos(llm, monkeypatch):
    tok = llm.get_tokenizer()
    bos = llm.engine.model_config.bos_token_id
    monkeypatch.setattr(tok, "_add_bos", True)
    system = llm.register_chunk("You answer from the documents.", kind="system", chunk_id="bos-system")
    context = llm.register_chunk(DOC1, chunk_id="bos-context")
    try:
        assert system.token_ids[0] == bos and context.token_ids[0] != bos
        out = llm.generate_from_chunks([system.chunk_id, context.chunk_id], Q1, GREEDY)
        assert out.prompt_token_ids.count(bos) == 1 and out.prompt_token_ids[0] == bos
    finally:
        llm.unregister_chunk(system.chunk_id)
        llm.unregister_chunk(context.chunk_id)
    llm.engine.check_integrity()


# ---- only the query (and the recomputed fraction) is computed ------------------------------------

def test_without_recompute_only_the_query_tokens_enter_the_model(llm, docs):
    ids = [docs.system.chunk_id, docs.c1.chunk_id, docs.c2.chunk_id]
    before = llm.stats().prompt_tokens
    with _model_tokens(llm) as counts:
        out = llm.generate_from_chunks(ids, docs.q1, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                       recompute_ratio=0)
    assert counts == [len(docs.q1), 1, 1]  # the query's prefill, then one token per decode step
    assert llm.stats().prompt_tokens - before == len(docs.q1)
    reused = docs.system.num_tokens + docs.c1.num_tokens + docs.c2.num_tokens
    assert out.num_cached_tokens == reused
    assert len(out.prompt_token_ids) == reused + len(docs.q1)


def test_selective_recompute_computes_ceil_r_n_tokens_of_each_chunk_after_position_zero(llm, docs):
    ids = [docs.system.chunk_id, docs.c1.chunk_id, docs.c2.chunk_id]
    n1, n2 = docs.c1.num_tokens, docs.c2.num_tokens
    recomputed = math.ceil(0.15 * n1) + math.ceil(0.15 * n2)
    before = llm.stats().prompt_tokens
    with _model_tokens(llm) as counts:
        out = llm.generate_from_chunks(ids, docs.q1, ONE, recompute_ratio=0.15)
    assert counts == [len(docs.q1) + recomputed]
    assert llm.stats().prompt_tokens - before == len(docs.q1) + recomputed
    assert out.num_cached_tokens == docs.system.num_tokens + n1 + n2 - recomputed


def test_registering_runs_the_chunk_once_and_registering_it_again_runs_nothing(llm):
    text = "A note that is registered twice: the second time costs nothing."
    with _model_tokens(llm) as counts:
        chunk = llm.register_chunk(text)
        again = llm.register_chunk(text)
    try:
        assert counts == [chunk.num_tokens] and again == chunk
        assert chunk.chunk_id.startswith("chunk-") and chunk.kind == "context" and chunk.level == 1
        assert chunk.kv_length == chunk.num_tokens and chunk.stored_at == 0
        assert chunk.model_fingerprint == llm.engine.fingerprint
        assert len(chunk.page_indices) == -(-chunk.num_tokens // llm.engine.cache.block_size)
        assert llm.list_chunks()[-1] == chunk
        # The same text as a system chunk is other content: another id, its own pages.
        system = llm.register_chunk(text, kind="system")
        assert system.chunk_id != chunk.chunk_id and not set(system.page_indices) & set(chunk.page_indices)
        llm.unregister_chunk(system.chunk_id)
    finally:
        llm.unregister_chunk(chunk.chunk_id)
    assert chunk not in llm.list_chunks()
    llm.engine.check_integrity()


def test_the_deviation_rule_recomputes_as_many_tokens_as_the_first_rule(llm, docs):
    ids = [docs.system.chunk_id, docs.c1.chunk_id, docs.c2.chunk_id]
    results = {}
    for rule in ("first", "deviation"):
        before = llm.stats().prompt_tokens
        out = llm.generate_from_chunks(ids, docs.q1, GREEDY, recompute_ratio=0.15, recompute_rule=rule)
        results[rule] = (out.num_cached_tokens, llm.stats().prompt_tokens - before)
        assert len(_tokens(out)) == GREEDY.max_tokens and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text
    assert results["deviation"] == results["first"]
    # With every chunk token recomputed the rule cannot matter: both are the full prefill.
    full = llm.generate_from_chunks(ids, docs.q1, GREEDY, recompute_ratio=1.0, recompute_rule="first")
    dev = llm.generate_from_chunks(ids, docs.q1, GREEDY, recompute_ratio=1.0, recompute_rule="deviation")
    assert _tokens(dev) == _tokens(full)
    llm.engine.check_integrity()


def test_chunk_pages_hold_the_kv_a_plain_prefill_writes(llm):
    ids = _ids(llm, "Chunk pages and prefix blocks: the same tokens at the same positions give the same "
                    "keys and values, whatever path computed them, so reuse of a chunk is exact at position zero.")[:32]
    assert len(ids) == 32
    chunk = llm.register_chunk(ids, chunk_id="kv-compare")
    try:
        llm.generate({"prompt_token_ids": ids + [13]}, ONE)  # caches the same two blocks
        match = llm.engine.cached_prefix(ids)
        assert match.num_tokens == 32
        cache = llm.engine.kv_cache
        for layer in range(cache.num_layers):
            torch.testing.assert_close(cache.k[layer][list(chunk.page_indices)], cache.k[layer][list(match.block_ids)],
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache.v[layer][list(chunk.page_indices)], cache.v[layer][list(match.block_ids)],
                                       atol=1e-4, rtol=1e-4)
    finally:
        llm.unregister_chunk("kv-compare")


def test_registering_a_chunk_between_steps_leaves_running_requests_unchanged(llm, docs):
    prompt = {"prompt_token_ids": docs.q2 + docs.q3}
    alone = llm.generate(prompt, GREEDY)[0]
    engine = llm.engine
    engine.add_request("running", prompt, GREEDY)
    engine.step()
    engine.step()
    chunk = llm.register_chunk("Registered while another request is decoding.", chunk_id="mid-run")
    try:
        final = _drain(engine)
        assert _tokens(final["running"]) == _tokens(alone)
        engine.check_integrity()
    finally:
        llm.unregister_chunk(chunk.chunk_id)


# ---- batches -----------------------------------------------------------------------------------

def test_a_batch_mixing_shared_and_private_chunks_matches_each_request_alone(llm, docs):
    s, c1, c2, c3 = (c.chunk_id for c in docs.all)
    requests = {
        "mix-0": ([s, c1], docs.q1),
        "mix-1": ([s, c2], docs.q2),
        "mix-2": ([s, c1, c2], docs.q3),  # c1 at the same offset as in mix-0: read once for both
        "mix-3": ([s, c3], docs.q1),  # c3 is private to this request
        "mix-4": ([c2, c1], docs.q2),  # no system chunk; c2 at position 0, c1 after it
    }
    plain_prompt = {"prompt_token_ids": docs.q3 + docs.q1}
    engine = llm.engine
    steps = llm.stats().num_steps
    for request_id, (chunk_ids, query) in requests.items():
        engine.add_chunk_request(request_id, chunk_ids, {"prompt_token_ids": query}, SCORED, recompute_ratio=0.15)
    engine.add_request("mix-plain", plain_prompt, SCORED)
    batched = _drain(engine)
    assert llm.stats().num_steps - steps == SCORED.max_tokens  # all of them ran together, every step
    engine.check_integrity()
    alone = {rid: llm.generate_from_chunks(ids, query, SCORED, recompute_ratio=0.15)
             for rid, (ids, query) in requests.items()}
    alone["mix-plain"] = llm.generate(plain_prompt, SCORED)[0]
    assert set(batched) == set(alone)
    for rid, out in alone.items():
        assert _tokens(batched[rid]) == _tokens(out), rid
        assert batched[rid].outputs[0].cumulative_logprob == pytest.approx(out.outputs[0].cumulative_logprob,
                                                                           abs=1e-3), rid
        if rid != "mix-plain":  # (the plain prompt hits the prefix cache the second time)
            assert batched[rid].num_cached_tokens == out.num_cached_tokens, rid
    running, waiting, sequences, used, _, chunk_blocks = _usage(llm)
    assert (running, waiting, sequences, used) == (0, 0, 0, chunk_blocks)


def test_a_batch_with_full_recompute_matches_plain_generation_of_each_composed_prompt(llm, docs):
    by_id = {c.chunk_id: c for c in docs.all}
    requests = {
        "full-0": ([docs.system.chunk_id, docs.c1.chunk_id, docs.c2.chunk_id], docs.q1),
        "full-1": ([docs.system.chunk_id, docs.c2.chunk_id, docs.c1.chunk_id], docs.q1),
        "full-2": ([docs.c3.chunk_id, docs.c1.chunk_id], docs.q2),
    }
    for request_id, (chunk_ids, query) in requests.items():
        llm.engine.add_chunk_request(request_id, chunk_ids, {"prompt_token_ids": query}, SCORED, recompute_ratio=1.0)
    batched = _drain(llm.engine)
    prompts = [[t for cid in ids for t in by_id[cid].token_ids] + query for ids, query in requests.values()]
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], SCORED)
    for rid, expected, prompt in zip(requests, plain, prompts):
        assert batched[rid].prompt_token_ids == prompt
        assert _tokens(batched[rid]) == _tokens(expected), rid
        assert batched[rid].outputs[0].cumulative_logprob == pytest.approx(
            expected.outputs[0].cumulative_logprob, abs=1e-3), rid
    llm.engine.check_integrity()


# ---- chunk pages never change and are never evicted ----------------------------------------------

def test_chunk_pages_stay_allocated_and_bit_identical_across_many_generations(small, small_docs):
    d = small_docs
    cache = small.engine.kv_cache
    pages = [p for c in d.all for p in c.page_indices]
    snapshot = [(cache.k[i][pages].clone(), cache.v[i][pages].clone()) for i in range(cache.num_layers)]
    chunk_blocks = small.stats().cache.num_chunk_blocks
    assert chunk_blocks == len(pages) <= small.engine.cache.chunk_budget
    s, c1, c2, c3 = (c.chunk_id for c in d.all)
    plain = [{"prompt_token_ids": list(range(1000 * k + 100, 1000 * k + 190))} for k in range(1, 7)]  # 6 blocks each
    first = small.generate_from_chunks([s, c1, c2], d.q1, GREEDY)
    small.generate(plain[:2], GREEDY)
    small.generate_from_chunks([s, c2, c1], d.q2, GREEDY, recompute_ratio=0)
    small.generate(plain[2], GREEDY)
    small.generate_from_chunks([c1, c2, c3], d.q3, GREEDY, recompute_ratio=1.0)
    small.generate(plain[3:], GREEDY)
    small.generate_from_chunks([c3], d.q1, GREEDY)
    small.generate_from_chunks([s, c3, c1], d.q2, GREEDY, recompute_rule="deviation")
    small.reset_prefix_cache()
    again = small.generate_from_chunks([s, c1, c2], d.q1, GREEDY)
    stats = small.stats().cache
    assert stats.num_evictions > 0  # the prefix cache was under pressure throughout
    assert _tokens(again) == _tokens(first)
    for i, (k, v) in enumerate(snapshot):
        assert torch.equal(cache.k[i][pages], k), f"layer {i} keys changed"
        assert torch.equal(cache.v[i][pages], v), f"layer {i} values changed"
    assert stats.num_chunks == 4 and stats.num_chunk_blocks == chunk_blocks
    assert stats.num_used_blocks == chunk_blocks and stats.num_sequences == 0
    assert small.list_chunks() == d.all
    small.engine.check_integrity()


def test_preempted_composed_requests_are_recomputed_and_match_running_alone(small, small_docs):
    d = small_docs
    ids = [d.system.chunk_id, d.c1.chunk_id]
    # 17 blocks are left for sequences: two requests of 126 private tokens (8 blocks each) fit, but not
    # once both grow past 128 tokens.
    query = list(range(2000, 2000 + 126 - math.ceil(0.15 * d.c1.num_tokens)))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = small.engine
    assert small.stats().cache.num_blocks - small.stats().cache.num_chunk_blocks == 17
    preemptions = engine.stats().num_preemptions
    for i in range(2):
        engine.add_chunk_request(f"pre-{i}", ids, {"prompt_token_ids": query}, params)
    final = _drain(engine)
    assert engine.stats().num_preemptions > preemptions
    assert sum(out.metrics.num_preemptions for out in final.values()) > 0
    alone = small.generate_from_chunks(ids, query, params)
    assert all(_tokens(out) == _tokens(alone) for out in final.values())
    assert all(out.num_cached_tokens == alone.num_cached_tokens for out in final.values())
    engine.check_integrity()


# ---- errors: clear, and nothing leaks ----------------------------------------------------------

TEMP = "errors-temp"


@pytest.mark.parametrize("args, message", [
    (dict(chunk_ids=["no-such-chunk"]), "unknown chunk id 'no-such-chunk'; registered chunks: "),
    (dict(chunk_ids=[TEMP, "no-such-chunk"]), "unknown chunk id 'no-such-chunk'"),
    (dict(chunk_ids=[]), "needs at least one chunk"),
    (dict(chunk_ids=[TEMP, "system"]), "a system chunk must come first"),
    (dict(chunk_ids=["system", TEMP, "system"]), "a system chunk must come first, and at most one"),
    (dict(chunk_ids=["foreign"]), "was computed by another model"),
    (dict(recompute_ratio=-0.1), r"recompute_ratio must be a number in \[0, 1\], got -0.1"),
    (dict(recompute_ratio=1.5), r"recompute_ratio must be a number in \[0, 1\]"),
    (dict(recompute_ratio=True), r"recompute_ratio must be a number in \[0, 1\]"),
    (dict(recompute_ratio="0.5"), r"recompute_ratio must be a number in \[0, 1\]"),
    (dict(recompute_rule="last"), "recompute_rule must be 'first' or 'deviation', got 'last'"),
    (dict(query=""), "prompt is empty"),
    (dict(query=[]), "non-empty list"),
    (dict(sampling_params=SamplingParams(max_tokens=10 ** 6)), "over max_model_len"),
], ids=["unknown", "unknown-after-known", "no-chunks", "system-not-first", "two-systems", "foreign-model",
        "ratio-negative", "ratio-over-one", "ratio-bool", "ratio-str", "bad-rule", "empty-query", "no-query-ids",
        "too-long"])
def test_bad_chunk_requests_are_refused_and_leave_nothing_in_use(llm, docs, args, message):
    before = _usage(llm)
    temp = llm.register_chunk(DOC3 + " (a copy)", chunk_id=TEMP)
    names = {TEMP: TEMP, "system": docs.system.chunk_id,
             "foreign": dataclasses.replace(temp, model_fingerprint="other")}
    kwargs = dict(chunk_ids=[docs.system.chunk_id, TEMP], query=docs.q1, sampling_params=GREEDY)
    kwargs.update(args)
    kwargs["chunk_ids"] = [names.get(c, c) if isinstance(c, str) else c for c in kwargs["chunk_ids"]]
    with pytest.raises(ValueError, match=message):
        llm.generate_from_chunks(**kwargs)
    assert not llm.engine.has_unfinished_requests()
    llm.unregister_chunk(TEMP)  # not left in use by the refused request
    llm.engine.check_integrity()
    assert _usage(llm) == before


@pytest.mark.parametrize("prompt, kind, message", [
    ("", "context", "prompt is empty"),
    ([], "context", "non-empty list"),
    ([1, 49152], "context", "is not a token id"),
    ("A fine text.", "document", "chunk kind must be one of system, context, got 'document'"),
    ("A fine text.", None, "chunk kind must be one of"),
])
def test_bad_chunks_are_refused_at_registration_and_keep_nothing(llm, prompt, kind, message):
    before = _usage(llm), llm.list_chunks()
    with pytest.raises(ValueError, match=message):
        llm.register_chunk(prompt, kind=kind)
    llm.engine.check_integrity()
    assert (_usage(llm), llm.list_chunks()) == before


def test_reregistering_an_id_with_other_content_is_refused(llm):
    before = _usage(llm)
    chunk = llm.register_chunk("The first content.", chunk_id="reused-id")
    try:
        with pytest.raises(ValueError, match="'reused-id' is already registered with other content"):
            llm.register_chunk("Some other content.", chunk_id="reused-id")
        with pytest.raises(ValueError, match="already registered with other content"):
            llm.register_chunk("The first content.", kind="system", chunk_id="reused-id")
        assert llm.register_chunk("The first content.", chunk_id="reused-id") == chunk
        assert llm.list_chunks().count(chunk) == 1
    finally:
        llm.unregister_chunk("reused-id")
    llm.engine.check_integrity()
    assert _usage(llm) == before


def test_a_chunk_in_use_cannot_be_unregistered_until_its_request_ends(llm, docs):
    before = _usage(llm)
    temp = llm.register_chunk("A chunk that a pending request holds on to.", chunk_id="in-use")
    engine = llm.engine
    engine.add_chunk_request("holder", [docs.system.chunk_id, "in-use"], {"prompt_token_ids": docs.q1}, GREEDY)
    with pytest.raises(ValueError, match=r"chunk 'in-use' is in use by 1 request"):
        llm.unregister_chunk("in-use")  # waiting
    engine.step()
    with pytest.raises(ValueError, match="in use"):
        llm.unregister_chunk("in-use")  # running
    assert temp in llm.list_chunks()
    engine.check_integrity()
    engine.abort_request("holder")
    llm.unregister_chunk("in-use")
    assert temp not in llm.list_chunks()
    engine.check_integrity()
    assert _usage(llm) == before
    # A finished request lets go of its chunks too.
    llm.register_chunk("A chunk that a pending request holds on to.", chunk_id="in-use")
    llm.generate_from_chunks(["in-use"], docs.q1, ONE)
    llm.unregister_chunk("in-use")
    assert _usage(llm) == before


def test_unregistering_an_unknown_chunk_is_refused(llm):
    before = _usage(llm)
    with pytest.raises(ValueError, match="unknown chunk id 'never-registered'"):
        llm.unregister_chunk("never-registered")
    assert _usage(llm) == before


def test_the_chunk_fraction_option_reaches_the_cache_and_bounds_registration(small):
    assert EngineConfig.from_kwargs(max_chunk_fraction=0.05).cache.max_chunk_fraction == 0.05
    cache = small.engine.cache
    assert cache.chunk_budget == int(0.3 * 24) == 7
    before = _usage(small), small.list_chunks()
    too_big = list(range(500, 500 + (cache.chunk_budget + 1) * cache.block_size))
    with pytest.raises(ValueError, match=r"needs 8 blocks but the chunk budget is 7 blocks .*max_chunk_fraction"):
        small.register_chunk(too_big)
    small.engine.check_integrity()
    assert (_usage(small), small.list_chunks()) == before
    fits = small.register_chunk(too_big[:cache.chunk_budget * cache.block_size])
    assert small.stats().cache.num_chunk_blocks == 7
    with pytest.raises(ValueError, match="chunk budget"):
        small.register_chunk([7])
    small.unregister_chunk(fits.chunk_id)
    small.engine.check_integrity()
    assert (_usage(small), small.list_chunks()) == before


def test_a_chunk_longer_than_one_step_is_registered_in_pieces_and_is_still_a_true_prefix(small):
    ids = list(range(3000, 3100))  # 100 tokens: two pieces of at most 64
    with _model_tokens(small) as counts:
        chunk = small.register_chunk(ids)
    try:
        assert counts == [64, 36]
        query = _ids(small, Q1)
        plain = small.generate({"prompt_token_ids": ids + query}, GREEDY)[0]
        assert _tokens(small.generate_from_chunks([chunk], query, GREEDY)) == _tokens(plain)
    finally:
        small.unregister_chunk(chunk.chunk_id)
    small.engine.check_integrity()


def test_a_chunk_over_max_model_len_is_refused(small):
    before = _usage(small), small.list_chunks()
    with pytest.raises(ValueError, match="a chunk of 401 tokens is over max_model_len=400"):
        small.register_chunk(list(range(401)))
    assert (_usage(small), small.list_chunks()) == before


def test_a_chunk_that_finds_no_free_block_is_refused_and_keeps_nothing(small):
    engine = small.engine
    # A running request holds every block of the pool.
    engine.add_request("hog", {"prompt_token_ids": list(range(4000, 4370))}, GREEDY)
    while not engine.step():  # prefill in pieces until the first token
        pass
    assert small.stats().cache.num_used_blocks == 24
    before = _usage(small), small.list_chunks()
    with pytest.raises(ValueError, match="no room for chunk"):
        small.register_chunk("Any text at all.")
    engine.check_integrity()
    assert (_usage(small), small.list_chunks()) == before
    engine.abort_request("hog")
    chunk = small.register_chunk("Any text at all.")
    small.unregister_chunk(chunk.chunk_id)
    engine.check_integrity()
    assert small.stats().cache.num_used_blocks == 0


@pytest.mark.parametrize("composed", [False, True], ids=["plain", "composed"])
def test_a_request_that_cannot_fit_beside_the_chunk_pages_is_refused_up_front(small, composed):
    engine = small.engine
    held = small.register_chunk(list(range(500, 596)), chunk_id="held")  # 6 blocks
    used = small.register_chunk(list(range(600, 616)), chunk_id="used")  # 1 block: 17 of 24 left
    try:
        with pytest.raises(ValueError):
            if composed:  # 18 private blocks (the whole prompt is 19)
                engine.add_chunk_request("too-big", ["used"], {"prompt_token_ids": list(range(1000, 1280))}, GREEDY)
            else:  # 20 blocks
                engine.add_request("too-big", {"prompt_token_ids": list(range(1000, 1300))}, GREEDY)
    finally:
        engine.abort_request("too-big")
        small.unregister_chunk(held.chunk_id)
        small.unregister_chunk(used.chunk_id)
    engine.check_integrity()
