"""prompt_logprobs: the model's log-probabilities of every prompt token, teacher-forced."""

from __future__ import annotations

import pytest
import torch

from kvforge import SamplingParams
from kvforge.types import InvalidRequestError
from tests.conftest import PROMPTS, assert_engine_idle, make_llm

ASK = SamplingParams(prompt_logprobs=3, max_tokens=1, temperature=0)


def hf_prompt_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row i predicts token i + 1


def test_prompt_logprobs_equal_hf_teacher_forced(llm, hf_model):
    out = llm.generate(PROMPTS[2], ASK)[0]
    ids, got = out.prompt_token_ids, out.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    ref = hf_prompt_logprobs(hf_model, ids)
    for i in range(1, len(ids)):
        entry = got[i]
        assert entry[ids[i]].logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=2e-3)
        assert abs(entry[ids[i]].rank - (int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1)) <= 1  # near-ties
        top = [t for t, lp in entry.items() if lp.rank <= 3]
        assert len(top) == 3
        assert all(entry[t].logprob == pytest.approx(float(ref[i - 1, t]), abs=2e-3) for t in top)
        assert min(entry[t].logprob for t in top) >= float(ref[i - 1].topk(3).values[-1]) - 2e-3


def test_a_cached_prefix_does_not_hide_prompt_logprobs(llm):
    first = llm.generate(PROMPTS[0], ASK)[0]
    second = llm.generate(PROMPTS[0], ASK)[0]
    assert [None if e is None else sorted(e) for e in second.prompt_logprobs] == \
        [None if e is None else sorted(e) for e in first.prompt_logprobs]
    assert second.num_cached_tokens == 0


def test_prompt_logprobs_survive_chunked_prefill():
    long_prompt = " ".join(PROMPTS * 4)
    whole = make_llm().generate(long_prompt, ASK)[0]
    pieces = make_llm(max_num_batched_tokens=16).generate(long_prompt, ASK)[0]
    for a, b in zip(whole.prompt_logprobs[1:], pieces.prompt_logprobs[1:]):
        assert sorted(a) == sorted(b)
        assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)


def test_prompt_logprobs_are_refused_for_a_composed_prompt(llm):
    chunk = llm.register_chunk("A short document.")
    try:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate_from_chunks([chunk.chunk_id], " Why?", ASK)
        assert e.value.param == "prompt_logprobs"
        assert_engine_idle(llm.engine)
    finally:
        llm.unregister_chunk(chunk.chunk_id)


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(truncate_prompt_tokens=4, max_tokens=2))[0]
    assert out.prompt_token_ids == ids[-4:]
