"""Token sampling: logits processors (allowed ids, bad words, min_tokens, logit bias, penalties),
then greedy or temperature / min-p / top-k / top-p sampling; per-request seeded generators."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvforge.types import Logprob, SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one row of logits: the request's params and generator (None: the
    global one), its tokens so far (`token_ids`, prompt then output, the first `num_prompt_tokens`
    of them the prompt; read, never kept), `stop_token_ids` (EOS and params.stop_token_ids: banned
    while fewer than params.min_tokens tokens are out) and `bad_words` (params.bad_words tokenized:
    each word's token ids, possibly several spellings)."""

    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: Sequence[int] = ()
    num_prompt_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    bad_words: tuple[tuple[int, ...], ...] = ()


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Pick one token per row of `logits` `[N, vocab]` (float32). Does not modify `logits`.

    A row with a generator draws only from it, so a seeded request samples the same tokens whatever
    else shares its batch.
    """
    out = logits.argmax(dim=-1).tolist()
    for row, r in enumerate(rows):
        p, gen = r.params, r.generator
        if p.greedy:
            continue
        x = logits[row] / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            probs = sorted_x.softmax(-1)
            # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
        out[row] = int(torch.multinomial(x.softmax(-1), 1, generator=gen))
    return out


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[dict[int, Logprob]]:
    """Per row r of `logits` `[R, vocab]`: the `k` most likely tokens (all of them for k = -1) and
    `tokens[r]`, with their log-probabilities under the model (log-softmax of the raw logits, in
    float32) and 1-based ranks. One batched pass over the rows."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(list(tokens), device=logprobs.device)[:, None])  # [R, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    chosen_values = chosen[:, 0].tolist()
    k = logprobs.shape[-1] if k < 0 else min(k, logprobs.shape[-1])
    values, ids = torch.topk(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0].long())
    out = []
    for r, (vs, ts) in enumerate(zip(values.tolist(), ids.tolist())):
        entry = {t: Logprob(v, rank) for rank, (t, v) in enumerate(zip(ts, vs), start=1)}
        if tokens[r] not in entry:
            entry[tokens[r]] = Logprob(chosen_values[r], ranks[r])
        out.append(entry)
    return out
