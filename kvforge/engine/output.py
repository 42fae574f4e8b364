"""What a step does with a sampled token: detokenize, apply the stop conditions, build the output.

`OutputProcessor` owns each unfinished request's incremental detokenizer. Per token it costs O(1)
in the output's length: stop strings are searched only in a window at the end of the text, the
output count is a subtraction (never a slice), and a DELTA output copies only what is new.

Text that could still turn out to be the start of a stop string is held back (vLLM's stop buffer):
an unfinished output carries `text` up to `len(text) - (longest stop string - 1)`, so no consumer
ever sees characters that a matched stop string later cuts out. Finished outputs carry it all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvforge.model.tokenizer import IncrementalDetokenizer, Tokenizer
from kvforge.types import CompletionOutput, OutputKind, RequestMetrics, RequestOutput, Sequence


class OutputProcessor:
    """Detokenizes and stops sequences, and builds their RequestOutputs (see the module docstring).

    `finish(seq, reason, stop_reason)` is the scheduler's: it ends a sequence and frees its blocks.
    """

    def __init__(self, tokenizer: Tokenizer, finish: Callable[..., None]):
        self.tokenizer, self._finish = tokenizer, finish
        self._eos = frozenset(tokenizer.eos_token_ids)  # a set: one lookup per token
        self._detok: dict[int, IncrementalDetokenizer] = {}
        self._prompt_ids: dict[int, list[int]] = {}  # the whole prompt, composed ones included

    def __len__(self) -> int:
        return len(self._detok)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._detok

    def add(self, seq: Sequence) -> None:
        """Start detokenizing `seq`'s output with its prompt as context, so the first generated token
        decodes as it would in the middle of the text (SentencePiece keeps its leading space)."""
        prompt = whole_prompt(seq)
        self._prompt_ids[seq.seq_id] = prompt
        self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, prompt, seq.params.skip_special_tokens)

    def forget(self, seq: Sequence) -> None:
        self._detok.pop(seq.seq_id, None)
        self._prompt_ids.pop(seq.seq_id, None)

    def append_token(self, seq: Sequence, token: int, max_model_len: int) -> None:
        """Append `token` to `seq`, extend its text, and finish it on EOS, a stop token id, a stop
        string (cut from the text unless `include_stop_str_in_output`), max_tokens or the model
        length."""
        ids = seq.token_ids
        ids.append(token)
        p = seq.params
        if token in self._eos and not p.ignore_eos:
            return self._finish(seq, "stop")
        if p.stop_token_ids and token in p.stop_token_ids:
            return self._finish(seq, "stop", token)
        new = self._detok[seq.seq_id].add(token)
        if new:
            seq.text += new
        if p.stop and new:
            # A stop string can only end in the new text; look back far enough to catch it whole.
            window = len(new) + max(len(s) for s in p.stop)
            base = max(0, len(seq.text) - window)
            hits = [(seq.text.find(s, base), s) for s in p.stop]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, s = min(hits)
                seq.text = seq.text[:at + len(s)] if p.include_stop_str_in_output else seq.text[:at]
                return self._finish(seq, "stop", s)
        n = len(ids)
        positions = n if seq.composition is None else seq.total_len  # a composed prompt reuses chunk tokens
        if n - len(seq.prompt_token_ids) >= p.max_tokens or positions >= max_model_len:
            self._finish(seq, "length")

    def output(self, seq: Sequence) -> RequestOutput | None:
        """The RequestOutput of `seq` after its newest token, shaped by its `output_kind`; None for
        an unfinished FINAL_ONLY request. Advances what `seq` has handed out. Call before `forget`."""
        first = seq.num_sent_tokens == 0
        completion = self.completion(seq)
        return None if completion is None else self.request_output(seq, [completion], seq.finished, first)

    def completion(self, seq: Sequence) -> CompletionOutput | None:
        """`seq`'s CompletionOutput (index `seq.index`) after its newest token, shaped by its
        `output_kind` (DELTA: what is new since the last call); None for an unfinished FINAL_ONLY
        sequence. Advances what `seq` has handed out."""
        p = seq.params
        if p.output_kind is OutputKind.FINAL_ONLY and not seq.finished:
            return None
        hold = 0 if seq.finished or p.include_stop_str_in_output or not p.stop else max(map(len, p.stop)) - 1
        end = max(seq.num_sent_chars, len(seq.text) - hold)
        if p.output_kind is OutputKind.DELTA:
            first = seq.num_sent_tokens
            text, token_ids = seq.text[seq.num_sent_chars:end], seq.token_ids[seq.num_prompt_tokens + first:]
        else:
            first = 0
            text, token_ids = seq.text[:end], seq.output_token_ids
        seq.num_sent_chars, seq.num_sent_tokens = end, seq.num_output_tokens
        logprobs = (seq.cumulative_logprob, seq.logprobs[first:]) if p.logprobs is not None else ()
        return CompletionOutput(seq.index, text, token_ids, seq.finish_reason, seq.stop_reason, *logprobs)

    def request_output(self, seq: Sequence, completions: list[CompletionOutput], finished: bool,
                       first: bool) -> RequestOutput:
        """The RequestOutput of `seq`'s request holding `completions`. Prompt log-probabilities, when
        asked for, ride on every output, or on the `first` one only for DELTA outputs."""
        p = seq.params
        prompt_logprobs = seq.prompt_logprobs if p.prompt_logprobs is not None and (
            first or p.output_kind is not OutputKind.DELTA) else None
        prompt_ids = self._prompt_ids.get(seq.seq_id)
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=whole_prompt(seq) if prompt_ids is None else prompt_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=seq.num_cached_tokens or 0,
            metrics=RequestMetrics(seq.arrival, seq.first_token_time,
                                   time.monotonic() if finished else None, seq.num_preemptions),
            prompt_logprobs=prompt_logprobs,
        )


def whole_prompt(seq: Sequence) -> list[int]:
    """The prompt's token ids, a composed prompt's chunks included (a new list for a composed one)."""
    return list(seq.composition.prompt_token_ids) if seq.composition else seq.prompt_token_ids
