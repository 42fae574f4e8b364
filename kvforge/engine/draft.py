"""Drafting with a draft model (`SpeculativeConfig(method="draft")`): a smaller model of the same
vocabulary proposes each speculating sequence's next tokens greedily, over a paged KV cache of its
own; the target verifies them in one forward (the engine) and accepts them (`sampler.verify_draft`).

Greedy drafts are point proposals (the draft puts all its probability on the token it proposes), for
which `verify_draft`'s rule is exact: a greedy request keeps exactly its plain greedy output, and a
sampled one keeps each token distributed as the target says (a drafted token d is kept with
probability p(d), a rejection draws from p without d), whatever the draft proposes. A better draft
only raises the acceptance rate.

Per speculating sequence with tokens t[0..L-1] (the last one sampled, not yet computed by the target)
and k drafts this step, the draft cache's positions are owned so:

    [0, D)          t[0..D-1]    computed by the draft in earlier steps (D <= L - 1)
    [D, L)          t[D..L-1]    the catch-up: one prefill batched over every speculating sequence;
                                 the logits of t[L-1] give d1
    [L, L + k - 1)  d1..d(k-1)   one decode forward each, batched over the sequences still drafting;
                                 the logits of d(j) give d(j+1)
    dk is never computed. After the step (`settle`) the cache keeps the positions whose tokens the
    sequence kept: [0, L + m), m the leading drafts it accepted (at most k - 1), never its newest token.

So the draft cache of a running sequence always holds a prefix of its tokens, at most the ones the
target has computed (`check_integrity`). All slots of a step are reserved up front, so a sequence
the draft cache has no room for simply gets no draft (it is never failed or preempted for it); the
catch-up prefill is bounded by the step's token budget (`max_num_batched_tokens`), a sequence beyond
it catching up part of its tokens and drafting in a later step. The draft cache has no prefix caching:
each sequence's prompt is prefilled by the draft once per admission.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.cache import KVCache, KVCacheManager, NoFreeBlocksError
from kvforge.config import ModelConfig, SpeculativeConfig
from kvforge.model.llama import LlamaForCausalLM
from kvforge.model.loader import LoadedModel, build_model, load_model
from kvforge.model.runner import ModelRunner, TokenRun
from kvforge.types import Sequence


def load_draft_model(spec: SpeculativeConfig, target: ModelConfig, device: torch.device, dtype: torch.dtype,
                     seed: int) -> LlamaForCausalLM:
    """The draft model `spec.model` (loaded like the engine's, `spec.load_format`, dummy weights drawn
    with `seed`) on `device` in `dtype`. ValueError when it cannot be loaded or its vocabulary is not
    the target's (drafted token ids would mean other tokens)."""
    return build_model(load_draft_checkpoint(spec, target, device, seed), device, dtype, seed)


def load_draft_checkpoint(spec: SpeculativeConfig, target: ModelConfig, device: torch.device,
                          seed: int) -> LoadedModel:
    """The draft model's checkpoint (config and weights, no model built); ValueError as
    `load_draft_model`."""
    loaded = load_model(spec.model, spec.load_format, seed=seed, device=device)
    if loaded.config.vocab_size != target.vocab_size:
        raise ValueError(f"speculative model {spec.model!r} has a vocabulary of {loaded.config.vocab_size} tokens, "
                         f"the target's has {target.vocab_size}: a draft model must share the target's vocabulary "
                         f"(tokenizer)")
    return loaded


@dataclass(frozen=True)
class _Plan:
    """One sequence's work this step: `catch_up` tokens from position `start`, then `k` drafts (0: a
    catch-up cut short by the token budget); `slots` reserved for the catch-up and the first k - 1
    drafts; `index` of the sequence in `propose`'s argument."""

    index: int
    seq: Sequence
    start: int
    catch_up: int
    k: int
    slots: list[int]
    block_table: list[int]


@dataclass(frozen=True)
class _Drafted:
    """A sequence that got a draft this step: its token count `start` when drafting began, and the
    drafted tokens whose K/V the draft cache holds at positions start.. (all but the last)."""

    seq: Sequence
    start: int
    computed: list[int]


class DraftProposer:
    """Owns a draft model, its KV arena (`kv_cache`), the arena's `KVCacheManager` (`cache`: one
    draft sequence per speculating sequence, under the same seq_id) and a `ModelRunner` over them.
    With `enable_prefix_caching` the draft cache caches its full blocks of accepted tokens as the
    target's does (under the sequence's extra keys), and a new sequence starts from the longest
    cached prefix of its tokens: a shared prompt is caught up once.

    The engine calls `propose` before scheduling a step, `settle` once the step has run (or failed),
    and `free` when a sequence ends (finished, aborted, failed or preempted). Nothing here touches the
    target's cache or sequences' state: it reads their tokens.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, kv_format: str,
                 max_model_len: int, max_num_batched_tokens: int, cuda_graphs: bool = False,
                 max_graph_batch: int = 256, graph_query_lens: tuple[int, ...] = (1,),
                 enable_prefix_caching: bool = True):
        cfg = model.cfg
        weight = model.embed_tokens.weight
        self.model = model
        self.max_model_len = min(max_model_len, cfg.max_position_embeddings)
        self.kv_cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, weight.dtype,
                                weight.device, kv_format)
        self.cache = KVCacheManager(num_blocks, block_size, self.kv_cache.bytes_per_block,
                                    enable_prefix_caching=enable_prefix_caching)
        self.runner = ModelRunner(model, self.kv_cache.k, self.kv_cache.v, block_size,
                                  k_scales=self.kv_cache.k_scale, v_scales=self.kv_cache.v_scale,
                                  cuda_graphs=cuda_graphs, max_graph_batch=max_graph_batch,
                                  max_model_len=self.max_model_len, graph_query_lens=graph_query_lens)
        self._budget = max_num_batched_tokens
        self._drafted: list[_Drafted] = []  # this step's drafts, until settle()

    def propose(self, seqs: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Greedy drafts for decoding sequences (one uncomputed token each), each given with the most
        tokens it may draft (>= 1): one list per sequence, in order, [] for a sequence the draft cache
        or the step's token budget has no room for, or past the draft model's length. Catches the draft
        cache up with each sequence's tokens (one prefill), then drafts (k - 1 decode forwards).
        Call `settle` after the step. On an exception (from a forward) the draft sequences of `seqs`
        are freed (their K/V is not trusted) and the exception propagates; the cache stays consistent.
        """
        assert not self._drafted, "settle() the previous step's drafts first"
        try:
            return self._propose(seqs)
        except BaseException:
            for seq, _ in seqs:
                self.cache.free(seq.seq_id)
            self._drafted = []
            raise

    def _propose(self, seqs: list[tuple[Sequence, int]]) -> list[list[int]]:
        plans = self._plan(seqs)
        drafts: list[list[int]] = [[] for _ in seqs]
        if not plans:
            return drafts
        runs = [TokenRun(p.seq.token_ids[p.start:p.start + p.catch_up], p.start, p.slots[:p.catch_up], p.block_table,
                         needs_logits=p.k > 0) for p in plans]
        drafting = [p for p in plans if p.k > 0]
        for p, token in zip(drafting, self.runner.run(runs).argmax(-1).tolist()):
            drafts[p.index].append(token)
        for j in range(1, max((p.k for p in drafting), default=1)):  # d(j) at position start + catch_up + j - 1
            step = [p for p in drafting if p.k > j]
            runs = [TokenRun([drafts[p.index][-1]], p.start + p.catch_up + j - 1, [p.slots[p.catch_up + j - 1]],
                             p.block_table, True) for p in step]
            for p, token in zip(step, self.runner.run(runs).argmax(-1).tolist()):
                drafts[p.index].append(token)
        self._drafted = [_Drafted(p.seq, len(p.seq.token_ids), drafts[p.index][:-1]) for p in drafting]
        for p in plans:  # the caught-up blocks are final: cache the full ones
            self.cache.commit(p.seq.seq_id, p.seq.token_ids, p.start + p.catch_up)
        return drafts

    def _plan(self, seqs: list[tuple[Sequence, int]]) -> list[_Plan]:
        """Register each sequence's draft sequence when new and reserve its slots for this step, in
        order, while the token budget and the draft cache's blocks allow (a sequence without room is
        left out, its draft cache unchanged)."""
        cache, budget, plans = self.cache, self._budget, []
        for index, (seq, room) in enumerate(seqs):
            total = len(seq.token_ids)
            k = min(room, self.max_model_len - total + 1)  # positions up to total + k - 2
            if k < 1:  # past the draft model's length for good
                cache.free(seq.seq_id)
                continue
            if not cache.has_sequence(seq.seq_id):  # starts from the draft K/V its cache holds of the prefix
                cache.add_sequence(seq.seq_id, capacity=min(seq.max_len, self.max_model_len),
                                   prefix=cache.match_prefix(seq.token_ids, seq.cache_extra), extra=seq.cache_extra)
            start = cache.length(seq.seq_id)
            catch_up = total - start  # >= 1: the draft cache never holds the newest token
            if catch_up > budget:  # part of it now, the draft in a later step
                catch_up, k = budget, 0
            if catch_up == 0:  # the step's token budget is spent
                continue
            try:
                slots = cache.append(seq.seq_id, catch_up + max(k - 1, 0))
            except NoFreeBlocksError:
                continue  # no room in the draft cache: no draft this step
            budget -= catch_up
            plans.append(_Plan(index, seq, start, catch_up, k, slots, cache.block_table(seq.seq_id)))
        return plans

    def settle(self) -> None:
        """After the step in which `propose` ran (whether it ran, failed, or dropped some drafts): cut
        each drafted sequence's draft cache back to the positions whose tokens it kept (the drafts the
        target accepted), never its newest token. Sequences freed meanwhile are skipped."""
        drafted, self._drafted = self._drafted, []
        for d in drafted:
            seq_id = d.seq.seq_id
            if not self.cache.has_sequence(seq_id):
                continue
            kept = d.start
            for token, computed in zip(d.seq.token_ids[d.start:], d.computed):
                if token != computed:
                    break
                kept += 1
            kept = min(kept, len(d.seq.token_ids) - 1)
            copy = self.cache.rollback(seq_id, self.cache.length(seq_id) - kept)
            if copy is not None:
                self.kv_cache.copy_block(*copy)
            self.cache.commit(seq_id, d.seq.token_ids, kept)

    def free(self, seq_id: int) -> None:
        """Drop `seq_id`'s draft sequence and its blocks; unknown ids are ignored."""
        self.cache.free(seq_id)

    def check_integrity(self, running: list[Sequence]) -> None:
        """The draft cache's blocks all accounted for, and it holds only running sequences' draft
        sequences, each at most the tokens the target has computed. RuntimeError naming the first
        disagreement. Changes nothing."""
        self.cache.check_integrity()
        held = [s for s in running if self.cache.has_sequence(s.seq_id)]
        if len(held) != self.cache.num_sequences:
            raise RuntimeError(f"the draft cache holds {self.cache.num_sequences} sequences, {len(held)} of them "
                               f"running")
        for s in held:
            if self.cache.length(s.seq_id) > s.num_computed:
                raise RuntimeError(f"the draft cache holds {self.cache.length(s.seq_id)} tokens of sequence "
                                   f"{s.seq_id}, which has computed {s.num_computed}")
        if self._drafted:
            raise RuntimeError(f"{len(self._drafted)} drafts were never settled")
