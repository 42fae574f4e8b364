"""The sampler on tiny hand-made logits (no model): each logits processor's effect, min_p, and that rows
with neutral params sample exactly as before."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvforge.model import sampler
from kvforge.model.sampler import SamplingRow, process_logits, sample
from kvforge.types import SamplingParams

GREEDY = SamplingParams(temperature=0)
VOCAB = 6
# Ranked 5 > 4 > 3 > 2 > 1 > 0; two negative logits for the repetition penalty.
LOGITS = torch.tensor([[-2.0, -1.0, 0.5, 1.0, 2.0, 3.0]])


def row(params: SamplingParams = GREEDY, prompt=(), output=(), stop=(), bad=(), gen=None) -> SamplingRow:
    return SamplingRow(params, gen, (*prompt, *output), len(prompt), frozenset(stop), tuple(bad))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 2000, **kwargs) -> Counter:
    """`n` seeded draws from one row of logits, as one batch of n identical rows."""
    gen = seeded()
    return Counter(sample(logits.expand(n, -1), [row(params, gen=gen, **kwargs)] * n))


def reference_sample(logits: torch.Tensor, rows) -> list[int]:
    """The sampler before logits processors and min_p existed."""
    out = logits.argmax(dim=-1).tolist()
    for i, r in enumerate(rows):
        p, gen = r.params, r.generator
        if p.greedy:
            continue
        x = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            probs = sorted_x.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
        out[i] = int(torch.multinomial(x.softmax(-1), 1, generator=gen))
    return out


# ------------------------------------------------------------------ masks
def test_allowed_token_ids_restrict_the_argmax_and_the_draws():
    p = SamplingParams(temperature=0, allowed_token_ids=[1, 3])
    assert sample(LOGITS, [row(p)]) == [3]
    assert set(draws(SamplingParams(temperature=1.0, allowed_token_ids=[1, 3]), LOGITS)) == {1, 3}


def test_single_token_bad_word_is_always_banned():
    p = SamplingParams(temperature=0, bad_words=["x"])
    assert sample(LOGITS, [row(p, bad=[(5,)])]) == [4]
    assert sample(LOGITS, [row(p, output=(2, 3), bad=[(5,)])]) == [4]


def test_multi_token_bad_word_is_banned_only_after_its_prefix_in_the_output():
    p = SamplingParams(temperature=0, bad_words=["x"])
    bad = [(2, 3, 5)]
    assert sample(LOGITS, [row(p, output=(1, 2, 3), bad=bad)]) == [4]
    assert sample(LOGITS, [row(p, output=(2, 1, 3), bad=bad)]) == [5]  # prefix not at the end
    assert sample(LOGITS, [row(p, output=(3,), bad=bad)]) == [5]  # only half the prefix
    assert sample(LOGITS, [row(p, prompt=(2, 3), bad=bad)]) == [5]  # the prompt does not count
    assert sample(LOGITS, [row(p, prompt=(2,), output=(3,), bad=bad)]) == [5]


def test_min_tokens_bans_the_stop_ids_the_engine_passes():
    p = SamplingParams(temperature=0, min_tokens=3)
    assert sample(LOGITS, [row(p, output=(1,), stop={5, 4})]) == [3]
    assert sample(LOGITS, [row(p, output=(1, 1, 1), stop=())]) == [5]  # min_tokens reached: none passed


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one():
    assert sample(LOGITS, [row(SamplingParams(temperature=0, logit_bias={5: -100}))]) == [4]
    assert sample(LOGITS, [row(SamplingParams(temperature=0, logit_bias={0: 100}))]) == [0]
    assert set(draws(SamplingParams(temperature=1.0, logit_bias={0: 100}), LOGITS, n=200)) == {0}


def test_ids_beyond_the_vocabulary_are_ignored():
    p = SamplingParams(temperature=0, logit_bias={VOCAB: 100, 1: 100}, allowed_token_ids=[1, VOCAB + 3])
    assert sample(LOGITS, [row(p, stop={VOCAB + 1}, bad=[(VOCAB + 2,)])]) == [1]


def test_a_row_whose_bans_leave_nothing_falls_back_to_its_allowed_tokens():
    greedy = SamplingParams(temperature=0, allowed_token_ids=[2], min_tokens=1)
    hot = SamplingParams(temperature=1.0, allowed_token_ids=[2], min_tokens=1, seed=0)
    assert sample(LOGITS.expand(2, -1), [row(greedy, stop={2}), row(hot, stop={2}, gen=seeded())]) == [2, 2]


# ------------------------------------------------------------------ penalties
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    x = process_logits(LOGITS, [0], [row(p, prompt=(0, 5), output=(1, 3, 3))])
    assert x.tolist() == [[-4.0, -2.0, 0.5, 0.5, 2.0, 1.5]]


def test_frequency_penalty_scales_with_output_counts_only():
    p = SamplingParams(temperature=0, frequency_penalty=0.5)
    x = process_logits(LOGITS, [0], [row(p, prompt=(2, 2, 2), output=(3, 5, 5, 5))])
    assert x.tolist() == [[-2.0, -1.0, 0.5, 0.5, 2.0, 1.5]]


def test_presence_penalty_applies_once_per_output_token():
    p = SamplingParams(temperature=0, presence_penalty=0.5)
    x = process_logits(LOGITS, [0], [row(p, prompt=(2,), output=(3, 5, 5, 5))])
    assert x.tolist() == [[-2.0, -1.0, 0.5, 0.5, 2.0, 2.5]]


def test_penalties_combine_after_the_bias():
    p = SamplingParams(temperature=0, logit_bias={4: 2.0}, repetition_penalty=2.0, frequency_penalty=1.0,
                       presence_penalty=0.5)
    x = process_logits(LOGITS, [0], [row(p, prompt=(3,), output=(4, 4))])
    assert x[0, 4].item() == pytest.approx((2.0 + 2.0) / 2 - 2 * 1.0 - 0.5)
    assert x[0, 3].item() == 0.5  # a prompt token: the repetition penalty only


def test_a_penalty_moves_the_sampled_distribution_away_from_repeated_tokens():
    flat = torch.zeros(1, 4)
    base = draws(SamplingParams(temperature=1.0), flat, output=(0, 0, 0))
    penalized = draws(SamplingParams(temperature=1.0, frequency_penalty=1.0), flat, output=(0, 0, 0))
    assert base[0] > 400  # about 1/4 of 2000
    assert penalized[0] < 100  # about e^-3 / (e^-3 + 3) = 1.6%
    rewarded = draws(SamplingParams(temperature=1.0, presence_penalty=-2.0), flat, output=(0,))
    assert rewarded[0] > 1300  # about e^2 / (e^2 + 3) = 71%


# ------------------------------------------------------------------ min_p
def test_min_p_drops_tokens_less_likely_than_min_p_times_the_top_one():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert set(draws(SamplingParams(temperature=1.0), logits)) == {0, 1, 2, 3}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.2), logits)) == {0, 1, 2}  # below 0.1: dropped
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.7), logits)) == {0}



@pytest.mark.parametrize("extreme", [dict(top_p=1e-320), dict(top_p=1e-45, temperature=1e-320),
                                     dict(min_p=1.0, temperature=1e-300)])
def test_extreme_but_valid_params_still_draw_the_top_token(extreme):
    """A top_p or temperature below float32's range (a denormal double) keeps the most likely token."""
    params = SamplingParams(**{"temperature": 1.0, **extreme})
    assert set(draws(params, LOGITS, n=50)) == {5}

# ------------------------------------------------------------------ neutral rows and batches
NEUTRAL = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
           SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.9, top_k=20, top_p=0.95)]


@pytest.fixture
def processed_rows(monkeypatch) -> list[list[int]]:
    """The row indices of each process_logits call that sample makes."""
    calls = []

    def spy(logits, index, rows):
        calls.append(list(index))
        return process_logits(logits, index, rows)

    monkeypatch.setattr(sampler, "process_logits", spy)
    return calls


def test_neutral_params_give_exactly_the_tokens_of_the_sampler_before_processors(processed_rows):
    logits = torch.randn(len(NEUTRAL) * 4, 50, generator=seeded(1))
    params = NEUTRAL * 4
    rows = [row(p, prompt=(1, 2), output=(3,), gen=seeded(i)) for i, p in enumerate(params)]
    expected = [row(p, prompt=(1, 2), output=(3,), gen=seeded(i)) for i, p in enumerate(params)]
    for _ in range(3):
        assert sample(logits, rows) == reference_sample(logits, expected)
    assert processed_rows == []  # the all-neutral batch never reaches the processors


def test_mixed_batch_processes_only_the_rows_that_ask_for_it(processed_rows):
    logits = torch.randn(6, 50, generator=seeded(2))
    top = logits.argmax(-1).tolist()
    forced = SamplingParams(temperature=0, logit_bias={top[1]: -100})
    penalized = SamplingParams(temperature=0.8, presence_penalty=2.0, frequency_penalty=2.0)
    params = [NEUTRAL[0], forced, NEUTRAL[1], penalized, NEUTRAL[3], NEUTRAL[0]]
    outputs = [(), (), (), tuple(range(50)), (), ()]

    def rows():
        return [row(p, output=o, gen=seeded(i)) for i, (p, o) in enumerate(zip(params, outputs))]

    got = sample(logits, rows())
    assert processed_rows == [[1, 3]]
    want = reference_sample(logits, rows())
    assert [got[i] for i in (0, 2, 4, 5)] == [want[i] for i in (0, 2, 4, 5)]
    assert got[1] == logits[1].masked_fill(torch.arange(50) == top[1], float("-inf")).argmax().item()
    # Every token of row 3 is in the output once, so its penalties shift all logits alike: same draw.
    assert got[3] == want[3]
    x = process_logits(logits, [1, 3], rows()[1:4:2])
    assert torch.allclose(x[1], logits[3] - 4.0)


def test_logits_are_unchanged_by_the_call():
    logits = torch.randn(4, 50, generator=seeded(3))
    before = logits.clone()
    every = dict(allowed_token_ids=list(range(0, 50, 2)), bad_words=["x"], min_tokens=2, logit_bias={4: 5.0},
                 repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5, min_p=0.05)
    params = [SamplingParams(temperature=0, **every), SamplingParams(temperature=0.8, top_k=10, top_p=0.9, **every),
              NEUTRAL[1], SamplingParams(temperature=0.8, repetition_penalty=1.5)]
    rows = [row(p, prompt=(6, 8), output=(4, 4, 10), stop={0, 2}, bad=[(10, 12), (14,)], gen=seeded(i))
            for i, p in enumerate(params)]
    sample(logits, rows)
    assert torch.equal(logits, before)
