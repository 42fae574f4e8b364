"""The OpenAI wire format, responses side: the bodies and stream chunks of completions and chat
completions (choices, logprobs in OpenAI's shapes, echo, usage), and the objects of the other
endpoints. Requests and errors: protocol.py. Nothing here touches the engine.

Logprob shapes, per output token (k = `logprobs` for completions, `top_logprobs` for chat):

    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
                 "bytes"}, ...the top k, best first]}, ...]}
    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob} of the
                 top k and the token itself, ...], "text_offset": [...]}; with echo the prompt's
                 tokens come first, the first of them with None for its logprob and its top
    prompt_logprobs (vLLM's extension; completions: per choice, chat: beside the choices)
                 [None, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...] per prompt token

A token's text is the token decoded alone, special tokens kept (as vLLM), so the texts of a
choice's tokens need not add up to its text; text offsets add up those texts (as vLLM). A logprob
of -inf is written -9999.0 (JSON has no infinity; vLLM's value).
"""

from __future__ import annotations

import time
from typing import Any

from kvforge.engine import KVEvent, Tokenizer
from kvforge.server.jobs import ChoiceDelta, Delta, PromptResult
from kvforge.types import Chunk, Logprob

LOGPROB_FLOOR = -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def kv_event(event: KVEvent) -> dict:
    """A KV event as GET /v1/kv_events shows it: its type and fields, hashes as hex."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for name in getattr(event, "__slots__", ()):
        value = getattr(event, name)
        if name == "block_hashes":
            value = [h.hex() for h in value]
        elif name == "parent_hash":
            value = value.hex() if value is not None else None
        elif name == "token_ids":
            value = list(value)
        out[name] = value
    return out


def chunk_object(chunk: Chunk, created: int, model: str) -> dict:
    """A registered chunk as /v1/chunks shows it."""
    return {"id": chunk.chunk_id, "object": "chunk", "created": created, "model": model, "kind": chunk.kind,
            "num_tokens": chunk.num_tokens, "num_pages": len(chunk.page_indices)}


# ---- logprobs -----------------------------------------------------------------------------------

class TokenTexts:
    """Each token id's text, decoded alone with its special tokens kept; cached, so at most one
    entry per id of the vocabulary. For one thread (the event loop)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, LOGPROB_FLOOR)


def _top(entries: dict[int, Logprob], k: int, token: int | None = None) -> list[tuple[int, Logprob]]:
    """The entries ranked in the top k, and `token`'s when given, best first."""
    return sorted(((t, lp) for t, lp in entries.items() if lp.rank <= k or t == token), key=lambda e: e[1].rank)


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int, texts: TokenTexts) -> dict:
    def entry(token: int, logprob: Logprob) -> dict:
        text = texts(token)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}

    return {"content": [{**entry(t, lps[t]), "top_logprobs": [entry(i, lp) for i, lp in _top(lps, k)]}
                        for t, lps in zip(token_ids, logprobs)]}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob] | None], k: int,
                        texts: TokenTexts, offset: int = 0) -> dict:
    """The completions shape for these tokens, the first at text offset `offset`."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lps in zip(token_ids, logprobs):
        text = texts(t)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if lps is None else _value(lps[t]))
        out["top_logprobs"].append(None if lps is None else {texts(i): _value(lp) for i, lp in _top(lps, k, t)})
    return out


def prompt_logprobs(prompt: PromptResult, k: int, texts: TokenTexts) -> list[dict | None] | None:
    """vLLM's shape; None when the engine gave none."""
    if prompt.logprobs is None:
        return None
    return [None if lps is None else {str(i): {"logprob": _value(lp), "rank": lp.rank, "decoded_token": texts(i)}
                                      for i, lp in _top(lps, k, t)}
            for t, lps in zip(prompt.token_ids, prompt.logprobs)]


# ---- completions and chat completions -----------------------------------------------------------

class Answer:
    """One request's response, built from its Deltas: a whole body (`body`), or a stream's chunks
    (`opening`, then `chunks` per delta). Choice i is completion i % n of prompt i // n.

    `logprobs` is k for the output tokens and `prompt_logprobs` k for the prompt tokens (None: not
    asked for); `echo` (completions) holds each prompt's text, put before its choices' text, with
    its tokens' logprobs first when logprobs are asked for. Between chunks it keeps what a stream
    needs: the prompts' results and, per choice that has started, the text offset of its next token.
    """

    def __init__(self, rid: str, model: str, chat: bool, n: int, num_prompts: int, texts: TokenTexts, *,
                 logprobs: int | None = None, prompt_logprobs: int | None = None, echo: list[str] | None = None,
                 include_usage: bool = False):
        self.rid, self.model, self.chat, self.n, self.num_choices = rid, model, chat, n, n * num_prompts
        self.texts, self.logprobs, self.prompt_logprobs, self.echo = texts, logprobs, prompt_logprobs, echo
        self.include_usage = include_usage
        self.created = int(time.time())
        self._prompts: dict[int, PromptResult] = {}
        self._offsets: dict[int, int] = {}

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def body(self, d: Delta) -> dict:
        """The whole response, from the one delta that holds everything."""
        self._prompts.update(d.prompts)
        choices = [self._choice(i, d.choices.get(i) or ChoiceDelta(), stream=False) for i in range(self.num_choices)]
        body = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens)}
        if self.chat and self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(0)
        return body

    def opening(self) -> list[dict]:
        """The chunks a stream starts with: for chat, each choice's role."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(self.num_choices)]

    def chunks(self, d: Delta) -> list[dict]:
        """The chunks of delta `d`: one per choice with something to show, then, at the end, the
        usage chunk (no choices) when asked for."""
        self._prompts.update(d.prompts)
        out = []
        for i, c in sorted(d.choices.items()):
            starts = i not in self._offsets and self.echo is not None
            if c.text or c.finish_reason or starts or (c.token_ids and self.logprobs is not None):
                out.append(self._chunk([self._choice(i, c, stream=True)]))
        if d.finished and self.include_usage:
            out.append(self._chunk([], usage(d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens)))
        return out

    def _chunk(self, choices: list[dict], use: dict | None = None) -> dict:
        chunk = {"id": self.rid, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                 "model": self.model, "choices": choices}
        if self.include_usage:
            chunk["usage"] = use
        return chunk

    def _choice(self, i: int, c: ChoiceDelta, stream: bool) -> dict:
        text, token_ids, logprobs = c.text, c.token_ids, c.logprobs
        if i not in self._offsets and self.echo is not None:
            text = self.echo[i // self.n] + text
            if self.logprobs is not None:
                prompt = self._prompts.get(i // self.n, PromptResult([], None))
                token_ids = prompt.token_ids + token_ids
                logprobs = (prompt.logprobs or [None] * len(prompt.token_ids)) + logprobs
        offset = self._offsets.setdefault(i, 0)
        choice: dict[str, Any] = {"index": i}
        if self.chat:
            if stream:
                choice["delta"] = {} if c.finish_reason and not text else {"content": text}
            else:
                choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = None if self.logprobs is None else \
                chat_logprobs(token_ids, logprobs, self.logprobs, self.texts)
        else:
            choice["text"] = text
            choice["logprobs"] = None
            if self.logprobs is not None:
                choice["logprobs"] = completion_logprobs(token_ids, logprobs, self.logprobs, self.texts, offset)
                self._offsets[i] = offset + sum(map(len, choice["logprobs"]["tokens"]))
            if self.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(i // self.n)
        choice["finish_reason"] = c.finish_reason
        return choice

    def _prompt_logprobs(self, prompt: int) -> list[dict | None] | None:
        result = self._prompts.get(prompt)
        return None if result is None else prompt_logprobs(result, self.prompt_logprobs, self.texts)
