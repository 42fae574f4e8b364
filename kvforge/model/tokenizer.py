"""Tokenizer (text <-> ids, chat template) and IncrementalDetokenizer (ids -> text while streaming).

A `Tokenizer` wraps a `tokenizers.Tokenizer` and is built either from a GGUF file's `tokenizer.*`
metadata (byte-level BPE for `tokenizer.ggml.model == "gpt2"`, SentencePiece-style BPE for
`"llama"`) or from a HF directory's `tokenizer.json`. Special tokens (BOS/EOS) are added by this
class, never by the backend's post-processor, so `encode(..., add_special_tokens=True)` means the same
thing for both sources: prepend BOS when the model asks for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
import functools
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from kvforge.types import check_unicode

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# How each llama.cpp pre-tokenizer (tokenizer.ggml.pre) splits text before byte-level BPE.
_GPT2 = "gpt2"            # the GPT-2 regex (ByteLevel's own)
_DIGITS = "digits"        # each digit alone, then the GPT-2 regex (StarCoder/SmolLM)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r"), _DIGITS),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_REGEX),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_REGEX),
}
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe")  # llama.cpp takes a whole-word vocab hit first


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet byte-level BPE vocabularies use)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Immutable after construction; safe to share between requests (the backend is thread-safe for
    encode/decode).
    """

    def __init__(self, backend: Backend, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos_token: bool, add_eos_token: bool = False, chat_template: str | None = None):
        self._tk = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for name, tid in [("bos_token_id", bos_token_id), *(("eos_token_ids", t) for t in eos_token_ids)]:
            if tid is not None and not 0 <= tid < self._vocab_size:
                raise ValueError(f"{name} {tid} is outside the vocabulary [0, {self._vocab_size})")
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token=True needs a bos_token_id")
        self._bos = bos_token_id
        self._eos = tuple(dict.fromkeys(eos_token_ids))
        self._add_bos = add_bos_token
        self._add_eos = add_eos_token and bool(self._eos)
        self._chat_template = chat_template or None

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        """The primary end-of-sequence id (the first of `eos_token_ids`)."""
        return self._eos[0] if self._eos else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation, as the model files declare them (no guessing by name)."""
        return self._eos

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> Backend:
        """The wrapped `tokenizers.Tokenizer` (do not mutate it)."""
        return self._tk

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. `<|im_start|>`) become their ids.

        With `add_special_tokens`, BOS (and EOS) are added only when the model's files ask for it.
        """
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}")
        check_unicode(text, "text")
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self._add_bos:
                ids.insert(0, self._bos)
            if self._add_eos:
                ids.append(self._eos[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; with `skip_special_tokens`, control tokens (BOS, `<|im_end|>`, ...) are dropped.

        An incomplete UTF-8 sequence at either end decodes to U+FFFD.
        """
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self._vocab_size})")
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, continue_final_message: bool = False) -> str:
        """Render `messages` (`[{"role": str, "content": str}, ...]`) with the model's chat template,
        or with `chat_template` (Jinja source) instead.

        Renders like HF's `apply_chat_template(..., tokenize=False)`; the result holds the template's
        special tokens as text, so encode it with `add_special_tokens=False`. With
        `continue_final_message` the text ends right after the last message's content (no
        end-of-turn), so generation continues that message; it excludes `add_generation_prompt`.
        ValueError for messages or a template that cannot be rendered.
        """
        source = chat_template if chat_template is not None else self._chat_template
        if source is None:
            raise ValueError("this model has no chat template; pass chat_template, or format the prompt yourself "
                             "and call generate()")
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message continues the last message; it cannot be combined with "
                             "add_generation_prompt (set that to False)")
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with str 'role' and str 'content', got {m!r}")
            check_unicode(m["role"], f"messages[{i}].role")
            check_unicode(m["content"], f"messages[{i}].content")
        context = {"messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
        for name, tid in (("bos_token", self._bos), ("eos_token", self.eos_token_id)):
            if tid is not None:
                context[name] = self._tk.id_to_token(tid)
        try:
            text = compile_chat_template(source).render(**context)
        except jinja2.TemplateError as e:  # raise_exception() in the template: the conversation is refused
            raise ValueError(f"the chat template rejected these messages: {e}") from e
        if continue_final_message:
            final = messages[-1]["content"].strip()
            at = text.rfind(final)
            if not final or at < 0:
                raise ValueError("continue_final_message: the last message's content does not appear in the "
                                 "rendered conversation, so there is nothing to continue")
            text = text[:at + len(final)]
        return text

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata given as plain values (`{"tokenizer.ggml.tokens": [...], ...}`).

        `tokenizer.ggml.model` "gpt2" gives byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre`
        names; "llama" gives SentencePiece-style BPE (merges derived from the scores when absent).
        """
        kind = fields.get("tokenizer.ggml.model")
        tokens = list(fields.get("tokenizer.ggml.tokens") or ())
        if not tokens:
            raise ValueError("the GGUF has no tokenizer.ggml.tokens; kvforge needs the tokenizer in the file")
        types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if kind == "gpt2":
            backend, spelled = _byte_level_bpe(tokens, fields)
        elif kind == "llama":
            backend, spelled = _sentencepiece_bpe(tokens, types, fields)
        else:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2', 'llama'")
        # Control tokens stay whole and are skippable; user-defined ones stay whole but print.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL and spelled(t)])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and spelled(t)])
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise RuntimeError(f"built a vocabulary of {backend.get_vocab_size(with_added_tokens=True)} "
                               f"tokens from a GGUF listing {len(tokens)}")
        eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id") if fields.get(k) is not None]
        return cls(backend, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_ids=eos,
                   add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
                   add_eos_token=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from the `tokenizer.*` metadata of a GGUF file (reads no tensor data)."""
        from gguf import GGUFReader

        reader = GGUFReader(path)
        return cls.from_gguf_fields({k: f.contents() for k, f in reader.fields.items()
                                     if k.startswith("tokenizer.")})

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a HF directory: tokenizer.json (required), tokenizer_config.json, chat_template.jinja,
        and the eos ids that generation_config.json / config.json add."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; kvforge needs the fast-tokenizer file "
                             f"(save it with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        cfg, gen, model_cfg = (_read_json(path / n) for n in
                               ("tokenizer_config.json", "generation_config.json", "config.json"))

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, Mapping) else tok
            return backend.token_to_id(tok) if isinstance(tok, str) else None

        bos = token_id("bos_token")
        if bos is None:
            bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos = [token_id("eos_token")]
        for source in (gen, model_cfg):
            ids = source.get("eos_token_id")
            eos += ids if isinstance(ids, list) else [ids]
        # What the backend's post-processor adds decides, unless tokenizer_config says otherwise.
        plain, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
        add_bos = cfg.get("add_bos_token", bos is not None and full[:1] == [bos] and plain[:1] != [bos])
        add_eos = cfg.get("add_eos_token", len(full) > len(plain) and full[-1:] != plain[-1:])
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_token_id=bos, eos_token_ids=[e for e in eos if e is not None],
                   add_bos_token=bool(add_bos), add_eos_token=bool(add_eos), chat_template=template)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _byte_level_bpe(tokens: list[str], fields: Mapping[str, Any]):
    """Byte-level BPE (GPT-2 family) and a predicate: is this token spelled in the vocabulary as given?"""
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; "
                         f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spelled(token: str) -> bool:
        return set(token) <= letters

    # A token written in raw text (llama.cpp does this for some added tokens) is respelled byte-wise.
    vocab = {(t if spelled(t) else "".join(alphabet[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or ()]
    backend = Backend(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    split = _PRE_TOKENIZERS[pre]
    if split == _GPT2:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


def _sentencepiece_bpe(tokens: list[str], types: list[int], fields: Mapping[str, Any]):
    """SentencePiece BPE (Llama 2, Mistral) as a `tokenizers` BPE with byte fallback, like HF's Llama."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if fields.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    else:  # rank every split of a piece into two pieces by the score of the merged piece, best first
        scores = list(fields.get("tokenizer.ggml.scores") or range(len(tokens), 0, -1))
        found = []
        for t, i in vocab.items():
            if types[i] != _NORMAL:  # byte, control, user-defined pieces are never merge results
                continue
            for cut in range(1, len(t)):
                left, right = t[:cut], t[cut:]
                if left in vocab and right in vocab:
                    found.append((-scores[i], vocab[left], vocab[right], left, right))
        merges = [(left, right) for *_, left, right in sorted(found)]
    unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
    backend = Backend(models.BPE(vocab, merges, unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    add_prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return backend, lambda token: True


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template's Jinja source compiled as HF compiles it (sandboxed, trimmed blocks, loop
    controls, `raise_exception`, `tojson`, `strftime_now`); ValueError naming the line when it does
    not compile. Cached: a server compiles its template once."""
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile (line {e.lineno}): {e.message}") from e


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, vLLM-style (prefix/read offsets).

    `add()` returns only newly completed text: a token that ends inside a multi-byte UTF-8 character
    returns "" and its text arrives with the token that completes it, so no U+FFFD is ever emitted
    for a split character. The concatenation of all pieces is `text`. Not thread-safe: one per sequence.

    `prompt_token_ids` give context and are not part of `text`: then `text == decode(prompt +
    generated)[len(decode(prompt)):]`, so the first generated token keeps the leading space a
    SentencePiece decoder strips from the start of a text ("▁Hello" decodes alone to "Hello"). Pass
    the whole prompt: only its tail is decoded (back to the last ids that decode to text). Without a
    prompt `text == decode(generated)`, that space stripped.

    Pieces come from the tokenizers library's `DecodeStream` (the same offsets, kept in Rust: one
    decode per token); a decoder whose earlier text changes as ids are added makes the stream fail,
    and the sequence then goes on decoding its window of ids here, with the same result.
    """

    _CONTEXT = 5  # tokens of already-printed text decoded again as context

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._backend, self._vocab_size = tokenizer.backend, tokenizer.vocab_size
        self._skip = skip_special_tokens
        # The context for the next piece: the last _CONTEXT prompt ids, widened back while they
        # decode to "" (say, a prompt ending in skipped control tokens), or the decoder's
        # leading-space strip would fall on the first generated token instead of on the context.
        read = len(prompt_token_ids)
        prefix, step = max(0, read - self._CONTEXT), self._CONTEXT
        while prefix > 0 and not self._tok.decode(prompt_token_ids[prefix:read], self._skip):
            step *= 2
            prefix = max(0, prefix - step)
        # Only ids from the context on are kept (not a long prompt): ids[:read] are the context of
        # the next piece, ids[read:] not printed yet.
        self._ids = list(prompt_token_ids[prefix:])
        self._read = read - prefix
        self._text = ""
        self._stream: decoders.DecodeStream | None = decoders.DecodeStream(self._ids, skip_special_tokens)

    @property
    def text(self) -> str:
        """All text returned by `add()` so far."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is still partial).
        Raises ValueError for an id outside the vocabulary, changing nothing."""
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})")
        self._ids.append(token_id)
        piece = None
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id) or ""
            except Exception:  # the decoder rewrote text already given out: decode the window from now on
                self._stream = None
        if piece is None:
            piece = self._window_piece()
        if piece:
            del self._ids[:self._read]  # the new piece's ids become the context; older ones are done with
            self._read = len(self._ids)
            self._text += piece
        return piece

    def _window_piece(self) -> str:
        """The text the newest id completes, from decoding the window with and without the ids not
        printed yet ("" while a character is partial or the text did not grow)."""
        decode = self._backend.decode  # every id is checked as it comes: no pass over the window
        before = decode(self._ids[:self._read], skip_special_tokens=self._skip)
        after = decode(self._ids, skip_special_tokens=self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        return after[len(before):]
