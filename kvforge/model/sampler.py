"""Token sampling: logits processors, then greedy or temperature / min-p / top-k / top-p sampling with
per-request seeded generators.

Order, for each row of logits (vLLM's):

1. Logits processors, only for rows whose `params.processes_logits` (greedy rows too), batched over
   those rows on a copy of their logits (the rest are never copied or touched):
   a. `allowed_token_ids`: every other token -> -inf;
   b. `bad_words`: a word's last token -> -inf where the output so far ends with the rest of the word
      (a one-token word: always);
   c. `min_tokens`: the row's `stop_token_ids` (EOS and params.stop_token_ids, which the engine passes
      only while fewer than min_tokens tokens are out) -> -inf;
   d. `logit_bias`: added to its token's logit;
   e. penalties: `repetition_penalty` over the tokens of the prompt or the output (positive logits
      divided by it, the others multiplied), then minus `frequency_penalty` x the token's count in the
      output, minus `presence_penalty` once the token is in the output.
   Token ids >= vocab in (a)-(d) are ignored. A row left with no token by (a)-(c) falls back to its
   logits after (a) alone (the raw ones if (a) leaves none), so contradictory settings of one request
   cannot fail the batch.
2. Greedy rows take the argmax of their (processed) logits.
3. Other rows: divided by temperature, then `min_p` (tokens less likely than min_p x the most likely
   one dropped), `top_k`, `top_p`, then one draw with the row's generator.

`token_logprobs` reports the raw model distribution, before any of this (vLLM's default).
"""

from __future__ import annotations

import dataclasses
import math
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
    """Pick one token per row of `logits` `[N, vocab]` (float32, on any device) in the module
    docstring's order. Does not modify `logits`; a batch whose params are all neutral costs one argmax.

    A row with a generator draws only from it, so a seeded request samples the same tokens whatever
    else shares its batch.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
    out = logits.argmax(dim=-1).tolist()
    picked = [i for i, r in enumerate(rows) if r.params.processes_logits]
    processed: dict[int, torch.Tensor] = {}
    if picked:
        x = process_logits(logits, picked, [rows[i] for i in picked])
        for j, (i, token) in enumerate(zip(picked, x.argmax(dim=-1).tolist())):
            out[i] = token
            processed[i] = x[j]
    for i, r in enumerate(rows):
        if not r.params.greedy:
            out[i] = _draw(processed.get(i, logits[i]), r.params, r.generator)
    return out


def _draw(x: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from a row `[vocab]` of (processed) logits: temperature, min_p, top_k, top_p, then a draw."""
    return int(torch.multinomial(_probabilities(x, p), 1, generator=gen))


def _probabilities(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: (processed) logits `[vocab]` after temperature, min_p,
    top_k and top_p, softmaxed. A new tensor."""
    x = torch.nan_to_num_(x / p.temperature, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
    if p.min_p > 0:  # p < min_p * p_max, in logits: x < x_max + log(min_p)
        x.masked_fill_(x < x.max() + math.log(p.min_p), float("-inf"))  # x: a new tensor
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False  # a top_p below float32's smallest value compares as 0: the first must stay
        x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
    return x.softmax(-1)


def verify_draft(logits: torch.Tensor, draft: Sequence[int], row: SamplingRow,
                 argmax: Sequence[int] | None = None) -> list[int]:
    """Speculative decoding's acceptance for one sequence: `logits` `[len(draft) + 1, vocab]` are the
    target model's at the sequence's last token and at each drafted token, `row` describes the
    sequence before the draft. Returns the tokens to append: the accepted prefix of `draft` and one
    more token (the correction at the first rejection, or a bonus token after the last draft), so 1 to
    len(draft) + 1. `argmax`: the rows' argmax when the caller has read it already (one read from the
    device for a whole batch's greedy rows), used when the params process no logits.

    Row i is the distribution plain decoding would sample from after the draft's first i tokens: with
    logits processors (module docstring, step 1) it is processed as if those tokens were already out
    (penalties count them, bad words and min_tokens see them).

    Greedy: a drafted token is accepted while it equals the argmax, and the argmax follows: exactly
    the tokens plain greedy decoding gives. Sampled: the draft is a point proposal (q = 1 at the
    drafted token), so the drafted token d is accepted with probability p(d) and a rejection draws from
    p with d removed, renormalized (the standard rule: each emitted token is distributed as p). Draws
    use the row's generator."""
    p = row.params
    assert logits.shape[0] == len(draft) + 1, (tuple(logits.shape), len(draft))
    if p.processes_logits:
        logits = process_logits(logits, range(len(draft) + 1), _rows_along(row, draft))
        argmax = None
    if p.greedy:
        targets = logits.argmax(dim=-1).tolist() if argmax is None else argmax
        assert len(targets) == len(draft) + 1, (len(targets), len(draft))
        out = []
        for d, t in zip(draft, targets):
            if d != t:
                break
            out.append(d)
        return out + [targets[len(out)]]
    out = []
    for i, d in enumerate(draft):
        probs = _probabilities(logits[i], p)
        u = float(torch.rand((), generator=row.generator, device=logits.device))
        if u < float(probs[d]):
            out.append(d)
            continue
        rest = probs.clone()
        rest[d] = 0
        if float(rest.sum()) <= 0:  # p was all on d: cannot happen after a rejection, but never divide by 0
            return out + [d]
        return out + [int(torch.multinomial(rest, 1, generator=row.generator))]
    return out + [_draw(logits[len(draft)], p, row.generator)]


def _rows_along(row: SamplingRow, draft: Sequence[int]) -> list[SamplingRow]:
    """`row` after each prefix of `draft` (0 .. len(draft) tokens) were emitted: the tokens so far
    extended, and the stop ids banned only while fewer than min_tokens tokens would be out."""
    out_so_far = len(row.token_ids) - row.num_prompt_tokens
    tokens = list(row.token_ids)
    rows = []
    for i in range(len(draft) + 1):
        stop = row.stop_token_ids if out_so_far + i < row.params.min_tokens else frozenset()
        rows.append(dataclasses.replace(row, token_ids=tokens + list(draft[:i]), stop_token_ids=stop))
    return rows


def process_logits(logits: torch.Tensor, index: Sequence[int], rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The logits processors (module docstring, step 1) applied to the rows `index` of `logits`
    `[N, vocab]`, `rows[j]` describing row `index[j]`. Returns a new tensor `[len(index), vocab]`;
    `logits` is not modified. Each step is a few tensor operations over all the rows that need it;
    Python loops only over the rows' ids (never over the vocabulary)."""
    vocab, device = logits.shape[-1], logits.device
    neg_inf = float("-inf")
    x = logits[torch.tensor(index, dtype=torch.long, device=device)]  # advanced indexing: a copy

    # a. allowed_token_ids
    allowed = [(j, r.params.allowed_token_ids) for j, r in enumerate(rows) if r.params.allowed_token_ids]
    if allowed:
        keep = _allowed_mask(allowed, vocab, device)
        at = torch.tensor([j for j, _ in allowed], dtype=torch.long, device=device)
        x[at] = x[at].masked_fill(~keep, neg_inf)

    # b. bad_words and c. min_tokens: bans, gathered as (row, token) pairs
    ban_rows, ban_ids = [], []
    for j, r in enumerate(rows):
        for word in r.bad_words:
            if word and word[-1] < vocab and _output_ends_with(r, word[:-1]):
                ban_rows.append(j)
                ban_ids.append(word[-1])
        for t in r.stop_token_ids:
            if t < vocab:
                ban_rows.append(j)
                ban_ids.append(t)
    if ban_rows:
        x[torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device)] = neg_inf
    if allowed or ban_rows:
        touched = torch.tensor(sorted(set(ban_rows) | {j for j, _ in allowed}), dtype=torch.long, device=device)
        for j in touched[x[touched].amax(dim=-1) == neg_inf].tolist():  # rare: every token banned
            x[j] = logits[index[j]]
            if rows[j].params.allowed_token_ids:
                keep = _allowed_mask([(0, rows[j].params.allowed_token_ids)], vocab, device)[0]
                if keep.any():
                    x[j] = x[j].masked_fill(~keep, neg_inf)

    # d. logit_bias
    bias_rows, bias_ids, bias_values = [], [], []
    for j, r in enumerate(rows):
        for t, b in (r.params.logit_bias or {}).items():
            if t < vocab:
                bias_rows.append(j)
                bias_ids.append(t)
                bias_values.append(b)
    if bias_rows:
        x.index_put_((torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device)),
                     torch.tensor(bias_values, dtype=x.dtype, device=device), accumulate=True)

    # e. penalties
    penalized = [j for j, r in enumerate(rows) if r.params.has_penalties]
    if penalized:
        _penalize(x, rows, penalized)
    # An extreme penalty can overflow a logit: keep the row drawable (+inf -> the largest float).
    return torch.nan_to_num_(x, nan=neg_inf, posinf=torch.finfo(x.dtype).max, neginf=neg_inf)


def _allowed_mask(allowed: list[tuple[int, list[int]]], vocab: int, device: torch.device) -> torch.Tensor:
    """`[len(allowed), vocab]` bool: True at each entry's allowed ids (those < vocab)."""
    rows = [k for k, (_, ids) in enumerate(allowed) for t in ids if t < vocab]
    ids = [t for _, ids in allowed for t in ids if t < vocab]
    keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=device)
    keep[torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(ids, dtype=torch.long, device=device)] = True
    return keep


def _output_ends_with(r: SamplingRow, prefix: Sequence[int]) -> bool:
    """Whether the row's output tokens (not the prompt) end with `prefix` (always, for an empty one)."""
    n = len(prefix)
    if n == 0:
        return True
    total = len(r.token_ids)
    return total - r.num_prompt_tokens >= n and list(r.token_ids[total - n:]) == list(prefix)


def _penalize(x: torch.Tensor, rows: Sequence[SamplingRow], penalized: list[int]) -> None:
    """Repetition, then frequency and presence penalties on the rows `penalized` of `x` `[R, vocab]`
    (contiguous; modified in place), `rows[j]` describing row j. Only the (row, token) entries of the
    rows' outputs, and of their prompts where a repetition penalty asks, are gathered, changed and
    scattered back: work in the number of tokens, not rows x vocab."""
    vocab, device = x.shape[-1], x.device
    out_ids, out_lens, prompt_rows, prompt_ids, prompt_lens = [], [], [], [], []
    for j in penalized:
        r = rows[j]
        out = r.token_ids[r.num_prompt_tokens:]
        out_ids.extend(out)
        out_lens.append(len(out))
        if r.params.repetition_penalty != 1:
            prompt_ids.extend(r.token_ids[:r.num_prompt_tokens])
            prompt_rows.append(j)
            prompt_lens.append(r.num_prompt_tokens)
    out_at = _flat_index(out_ids, penalized, out_lens, vocab, device)
    prompt_at = _flat_index(prompt_ids, prompt_rows, prompt_lens, vocab, device)
    # Every (row, token) entry seen once; counts are of the output only.
    at, inverse = torch.unique(torch.cat([out_at, prompt_at]), return_inverse=True)
    counts = torch.bincount(inverse[:len(out_ids)], minlength=len(at)).to(x.dtype)
    row = at // vocab

    def per_row(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in rows], dtype=x.dtype, device=device)[row]

    flat = x.view(-1)
    values = flat[at]
    rep = per_row("repetition_penalty")
    values = torch.where(values > 0, values / rep, values * rep)
    values -= per_row("frequency_penalty") * counts + per_row("presence_penalty") * (counts > 0)
    flat[at] = values


def _flat_index(ids: list[int], rows: list[int], lengths: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Positions of `ids` in a flattened `[R, vocab]` tensor: the first lengths[0] of them in row
    rows[0], the next lengths[1] in row rows[1], and so on."""
    row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long, device=device),
                                  torch.tensor(lengths, dtype=torch.long, device=device))
    return row * vocab + torch.tensor(ids, dtype=torch.long, device=device)


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
