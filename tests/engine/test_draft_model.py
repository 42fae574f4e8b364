"""Speculative decoding with a draft model: greedy output equal to plain decoding token for token
(whether the draft is the target itself, accepted nearly always, or a random tiny model, rejected
nearly always), seeded sampling reproducible, the draft's own cache holding only running sequences'
accepted tokens after every step (finish, abort, preemption, a full draft cache, a failing draft
forward), and the configuration checked up front."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge import SamplingParams
from kvforge.cache import KVCache
from kvforge.cli import main
from kvforge.config import EngineConfig, SpeculativeConfig
from kvforge.engine import StepError
from tests.conftest import DEVICE, MODEL, PROMPTS, assert_engine_idle, make_llm, run_checked, run_counted

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SAME = {"method": "draft", "model": MODEL, "num_speculative_tokens": 4}
PROMPTS_PLUS = [*PROMPTS, "Repeat after me: one two three four five six seven eight nine ten. One two three"]
TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "vocab_size": 49152, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def tiny_draft(tmp_path, **overrides) -> dict:
    """A speculative config whose draft is a random two-layer model (a config.json in `tmp_path`), of
    the embedded model's vocabulary unless overridden."""
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **overrides}))
    return {"method": "draft", "model": str(tmp_path), "load_format": "dummy", "num_speculative_tokens": 3}


def assert_no_draft_sequences(llm) -> None:
    assert llm.engine.drafter.cache.num_sequences == 0
    assert llm.engine.drafter.cache.stats().num_used_blocks == 0
    assert_engine_idle(llm.engine)


@pytest.fixture(scope="module")
def plain():
    """Plain greedy decoding of PROMPTS_PLUS: (output token ids, engine steps it took)."""
    with make_llm() as llm:
        return run_checked(llm, PROMPTS_PLUS, GREEDY), llm.stats().num_steps


@pytest.fixture(scope="module")
def same_draft():
    return make_llm(kv_cache_memory=128 << 20, speculative_config=SAME)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """A draft that is nearly always wrong, with a small token budget: prompts are prefilled in pieces
    and the draft catches up with them over several steps."""
    return make_llm(max_num_batched_tokens=16, speculative_config=tiny_draft(tmp_path_factory.mktemp("tiny")))


def test_greedy_output_with_the_target_as_draft_is_plain_greedy_and_almost_all_accepted(plain, same_draft):
    expected, plain_steps = plain
    steps = same_draft.stats().num_steps
    outputs, drafted, accepted = run_counted(same_draft, PROMPTS_PLUS, GREEDY)
    assert outputs == expected
    assert drafted > 0 and accepted >= 0.9 * drafted
    assert same_draft.stats().num_steps - steps < plain_steps / 2
    assert_no_draft_sequences(same_draft)


def test_the_draft_cache_catches_a_shared_prompt_up_once(same_draft):
    shared = PROMPTS_PLUS[-1] * 3  # several full blocks
    prompts = [shared + " Eleven", shared + " Twelve"]
    with make_llm() as plain_llm:
        expected = run_checked(plain_llm, prompts, GREEDY)
    drafter = same_draft.engine.drafter
    hits = drafter.cache.stats().prefix_hit_tokens
    assert run_checked(same_draft, prompts[:1], GREEDY) == expected[:1]
    assert run_checked(same_draft, prompts[1:], GREEDY) == expected[1:]
    # the second request's draft sequence started from the first one's cached blocks of the prompt
    assert drafter.cache.stats().prefix_hit_tokens - hits >= 3 * 16
    assert_no_draft_sequences(same_draft)


def test_a_draft_that_is_nearly_always_wrong_still_gives_plain_greedy_output(plain, random_draft):
    expected, _ = plain
    outputs, drafted, accepted = run_counted(random_draft, PROMPTS_PLUS, GREEDY)
    assert outputs == expected
    assert drafted > 0 and accepted < 0.2 * drafted
    assert_no_draft_sequences(random_draft)


def test_sampled_requests_with_a_seed_are_reproducible(same_draft):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=10, seed=7)
    first = run_checked(same_draft, PROMPTS[:2], params)
    assert run_checked(same_draft, PROMPTS[:2], params) == first
    assert_no_draft_sequences(same_draft)


def test_an_aborted_request_leaves_nothing_in_the_draft_cache(same_draft):
    engine = same_draft.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", prompt, GREEDY)
    for _ in range(3):
        engine.step()
        engine.check_integrity()
    assert engine.drafter.cache.num_sequences == len(PROMPTS)
    engine.abort_request("abort-1")
    engine.check_integrity()
    assert engine.drafter.cache.num_sequences == len(PROMPTS) - 1
    for i in (0, 2, 3):
        engine.abort_request(f"abort-{i}")
    assert_no_draft_sequences(same_draft)


def test_preempted_sequences_give_their_draft_blocks_back_and_output_is_unchanged(plain, tmp_path):
    with make_llm(kv_cache_memory=None, num_blocks=4, speculative_config=tiny_draft(tmp_path)) as llm:
        assert llm.engine.drafter.cache.num_blocks == 4
        assert run_checked(llm, PROMPTS_PLUS[:3], GREEDY) == plain[0][:3]  # 2 blocks each
        assert llm.stats().num_preemptions > 0
        assert_no_draft_sequences(llm)


def test_a_full_draft_cache_means_no_draft_for_some_sequences_not_a_failure(plain, random_draft, tmp_path):
    prompts = PROMPTS_PLUS[:3]  # 2 blocks of 16 tokens each by their end
    before = random_draft.stats().spec_draft_tokens
    assert run_checked(random_draft, prompts, GREEDY) == plain[0][:3]
    roomy = random_draft.stats().spec_draft_tokens - before
    block = KVCache.block_bytes(TINY["num_hidden_layers"], 16, TINY["num_key_value_heads"], TINY["head_dim"],
                                torch.float32)
    spec = {**tiny_draft(tmp_path), "draft_kv_cache_memory": 3 * block}
    with make_llm(speculative_config=spec) as llm:
        assert llm.engine.drafter.cache.num_blocks == 3
        assert run_checked(llm, prompts, GREEDY) == plain[0][:3]
        assert 0 < llm.stats().spec_draft_tokens < 0.75 * roomy, roomy
        assert_no_draft_sequences(llm)


def test_a_failing_draft_forward_ends_only_the_drafting_requests(same_draft, monkeypatch):
    engine = same_draft.engine
    engine.add_request("drafting", PROMPTS[0], GREEDY)
    engine.step()  # its prefill: no draft yet
    engine.add_request("newcomer", PROMPTS[1], GREEDY)  # waits for the next step: prefilled, not drafting
    monkeypatch.setattr(engine.drafter.runner, "run", lambda runs: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(StepError) as e:
        engine.step()
    assert e.value.request_ids == ["drafting"] and str(e.value.cause) == "boom"
    engine.check_integrity()
    assert engine.drafter.cache.num_sequences == 0
    monkeypatch.undo()
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
        engine.check_integrity()
    assert list(outs) == ["newcomer"]
    assert_no_draft_sequences(same_draft)


def test_a_draft_with_another_vocabulary_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens, the target's has 49152"):
        make_llm(speculative_config=tiny_draft(tmp_path, vocab_size=1000))
    spec = json.dumps(tiny_draft(tmp_path, vocab_size=1000))
    assert main(["info", "--kv-cache-memory", str(64 << 20), "--speculative-config", spec]) != 0
    assert "vocabulary of 1000 tokens" in capsys.readouterr().err


def test_a_draft_cache_too_small_for_a_block_is_refused(tmp_path):
    with pytest.raises(ValueError, match="draft_kv_cache_memory=1 bytes holds no block"):
        make_llm(speculative_config={**tiny_draft(tmp_path), "draft_kv_cache_memory": 1})


def test_info_sizes_the_arena_beside_the_draft_as_the_engine_does(tmp_path, capsys):
    spec = tiny_draft(tmp_path)
    budget = 64 << 20
    built_as = ["--device", DEVICE, "--dtype", "float32"]  # as make_llm builds it
    assert main(["info", "--kv-cache-memory", str(budget), "--speculative-config", json.dumps(spec), *built_as]) == 0
    info = json.loads(capsys.readouterr().out)
    target, draft = info["kv_bytes_per_block"], info["draft"]["kv_bytes_per_block"]
    assert info["num_blocks"] == budget // (target + draft) == info["draft"]["num_blocks"]  # block for block
    llm = make_llm(speculative_config=spec, kv_cache_memory=budget)
    assert llm.engine.cache.num_blocks == info["num_blocks"]
    assert main(["info", "--kv-cache-memory", str(budget), "--speculative-config",
                 json.dumps({**spec, "draft_kv_cache_memory": 10 * draft}), *built_as]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_blocks"], info["draft"]["num_blocks"]) == (budget // target, 10)


def test_speculative_config_for_a_draft_model_is_validated():
    spec = EngineConfig.from_kwargs(speculative_config=json.dumps(SAME)).speculative
    assert (spec.method, spec.model, spec.num_speculative_tokens) == ("draft", MODEL, 4)
    assert SpeculativeConfig(model=MODEL).method == "draft"  # inferred from the model, as vLLM does
    assert SpeculativeConfig(method="draft_model", model=MODEL).method == "draft"  # vLLM's name
    assert SpeculativeConfig().method == "ngram"
    bad = [({"method": "draft"}, "needs model"),
           ({"method": "draft", "model": ""}, "needs model"),
           ({"method": "ngram", "model": MODEL}, "takes no model"),
           ({"method": "ngram", "draft_kv_cache_memory": 1 << 20}, "takes no draft_kv_cache_memory"),
           ({"model": MODEL, "load_format": "safetensors"}, "load_format must be one of"),
           ({"model": MODEL, "draft_kv_cache_memory": 0}, "draft_kv_cache_memory must be a positive"),
           ({"model": MODEL, "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer"),
           ({"method": "eagle", "model": MODEL}, "method must be one of ngram, draft"),
           ({"model": MODEL, "prompt_lookup_min": 2}, "'draft' takes no prompt_lookup_min")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            EngineConfig.from_kwargs(speculative_config=kwargs)
