"""Tokenizer and IncrementalDetokenizer: the embedded GGUF tokenizer against HF's, chat templates,
streaming detokenization, SentencePiece GGUFs and HF directories."""

from __future__ import annotations

import json

import pytest

from kvforge.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.model.conftest import tiny_bpe_fields, write_gguf

transformers = pytest.importorskip("transformers")

TEXTS = [
    "", " ", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n\n",
    "numbers 1234567890 3.14159 -42 1,000,000 2024-06-01", "héllo wörld ñandú Ünïcödé ÆØÅ ß ﬁ",
    "日本語のテキストと中文", "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷", "def f(x):\n    return x**2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>text<repo_name>a<file_sep>", "a<|im_start|>b",
    "it's they're I'll we've DON'T", "   multiple    spaces   \n\n   ", "\u00a0nbsp\u2009thin\u200bzero",
    'x=1;y=2\n\tz=[1,2,3] {"k": null}', "Ω≈ç√∫˜µ≤≥÷ ∑ ∂ ∆", "mixedCASE_snake_case-kebab-case",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi 😀"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\n  Thanks"}],
]


# ------------------------------------------------------------------ the embedded tokenizer vs HF
def test_special_ids_of_the_embedded_model(smollm_tokenizer):
    tok = smollm_tokenizer
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (49152, 1, 2, (2,))
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    assert not tok.add_bos_token and tok.encode("Hi") == tok.encode("Hi", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_hf_tokenizer_from_the_same_gguf(smollm_tokenizer, hf_tokenizer, text):
    ids = smollm_tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    for skip in (True, False):
        assert smollm_tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_special_token_text_becomes_one_id_and_is_skipped_on_decode(smollm_tokenizer):
    ids = smollm_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm_tokenizer.decode(ids) == "user\nhi"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_equals_hf(smollm_tokenizer, hf_tokenizer, messages, add_generation_prompt):
    ours = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    ([{"role": "user"}], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": ["a", "b"]}], r"messages\[0\]"),
    ([{"role": "user", "content": "ok"}, ("user", "hi")], r"messages\[1\]"),
])
def test_malformed_messages_are_refused(smollm_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        smollm_tokenizer.apply_chat_template(messages)


def test_missing_or_refusing_template_raises_value_error(smollm_tokenizer):
    tok = smollm_tokenizer
    bare = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos_token=False)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    strict = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos_token=False,
                       chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                     "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}")
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"
    with pytest.raises(ValueError, match="rejected these messages: user first"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_encode_and_decode_refuse_bad_input(smollm_tokenizer):
    with pytest.raises(ValueError, match="takes a str"):
        smollm_tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="49152 is outside"):
        smollm_tokenizer.decode([5, 49152])


# ------------------------------------------------------------------ incremental detokenization
MULTI_BYTE = ["héllo wörld — 日本語のテキスト 😀👍🏽 👨‍👩‍👧‍👦 done", "<|im_start|>é<|im_end|>ü😀"]


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_incremental_pieces_concatenate_to_the_full_decode(smollm_tokenizer, text):
    ids = smollm_tokenizer.encode(text)
    for skip in (True, False):
        detok = IncrementalDetokenizer(smollm_tokenizer, skip_special_tokens=skip)
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) == detok.text == smollm_tokenizer.decode(ids, skip)
        assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[1:]  # some token ended inside a multi-byte character and was held back


def test_incremental_with_prompt_context_returns_only_new_text(smollm_tokenizer):
    prompt = smollm_tokenizer.encode("Say: ")
    out = smollm_tokenizer.encode("naïve café 😀")
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_token_ids=prompt)
    assert "".join(detok.add(i) for i in out) == detok.text == "naïve café 😀"


def test_incremental_after_a_long_prompt_keeps_only_its_context(smollm_tokenizer):
    prompt = smollm_tokenizer.encode("word " * 3000 + "Say: ")
    out = smollm_tokenizer.encode("naïve café 😀 and more text", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_token_ids=prompt)
    expected = smollm_tokenizer.decode(prompt + out)[len(smollm_tokenizer.decode(prompt)):]
    assert "".join(detok.add(i) for i in out) == detok.text == expected
    assert len(detok._ids) < 20  # neither the prompt nor the printed output is kept


class _FailingStream:
    def step(self, backend, token_id):
        raise Exception("DecodeStreamError: InvalidPrefix")


@pytest.mark.parametrize("fails_at", [0, 3, 9])
def test_incremental_goes_on_from_its_window_when_the_decode_stream_fails(smollm_tokenizer, fails_at):
    prompt = smollm_tokenizer.encode("Say: ")
    out = smollm_tokenizer.encode(MULTI_BYTE[0], add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_token_ids=prompt)
    pieces = []
    for i, token in enumerate(out):
        if i == fails_at:
            detok._stream = _FailingStream()
        pieces.append(detok.add(token))
    assert detok._stream is None
    assert "".join(pieces) == detok.text == MULTI_BYTE[0]
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_refuses_an_id_outside_the_vocabulary_and_changes_nothing(smollm_tokenizer):
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_token_ids=smollm_tokenizer.encode("Say: "))
    detok.add(smollm_tokenizer.encode("ok", add_special_tokens=False)[0])
    with pytest.raises(ValueError, match="49152 is outside the vocabulary"):
        detok.add(49152)
    assert detok.add(smollm_tokenizer.encode("!", add_special_tokens=False)[0]) == "!"
    assert detok.text == "ok!"


# ------------------------------------------------------------------ other sources
def test_tiny_byte_level_gguf_splits_digits_and_keeps_control_tokens(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", "llama", None, None, tiny_bpe_fields())
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode("hello world<|im_end|>12")
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġworld", "<|im_end|>", "1", "2"]
    assert tok.decode(ids) == "hello world12" and tok.eos_token_ids == (1,)


def _spm_fields() -> dict:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "▁h", "he", "ll", "▁he", "llo", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world", "▁t", "at", "▁th", "▁a"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.mark.parametrize("text", ["hello world", "  hello", "hello\nworld é😀", "that a what", "", "</s>hello"])
def test_sentencepiece_gguf_equals_hf(tmp_path, text):
    path = write_gguf(tmp_path / "spm.gguf", "llama", None, None, _spm_fields())
    ours = Tokenizer.from_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = ours.encode(text)
    assert ids[0] == 1 and ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("prompt_tail", [[], [2] * 6], ids=["text-last", "control-tokens-last"])
def test_sentencepiece_first_generated_piece_keeps_its_leading_space_only_with_prompt_context(tmp_path,
                                                                                               prompt_tail):
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "spm.gguf", "llama", None, None, _spm_fields()))
    prompt = tok.encode("hello that") + prompt_tail  # [<s>, ▁hello, ▁th, at, (</s> x 6)]
    generated = tok.encode("world a hello", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in generated] == ["▁world", "▁a", "▁hello"]
    expected = tok.decode(prompt + generated)[len(tok.decode(prompt)):]
    assert expected == " world a hello"
    # Without context the decoder strips the leading space of the text's first token, as decode() does.
    bare = IncrementalDetokenizer(tok)
    assert [bare.add(i) for i in generated] == ["world", " a", " hello"]
    assert bare.text == tok.decode(generated) == "world a hello"
    # With the prompt as context the space is kept (even when the prompt ends in skipped control tokens).
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
    assert [detok.add(i) for i in generated] == [" world", " a", " hello"]
    assert detok.text == expected


def test_hf_directory_tokenizer_and_its_add_bos_flag(tmp_path, hf_tokenizer, smollm_tokenizer):
    hf_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (49152, 1, (2,), False)
    for text in TEXTS:
        assert tok.encode(text) == smollm_tokenizer.encode(text)
    messages = CONVERSATIONS[1]
    assert tok.apply_chat_template(messages) == smollm_tokenizer.apply_chat_template(messages)
    cfg_file = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "add_bos_token": True}))
    assert Tokenizer.from_hf_dir(tmp_path).encode("hi") == [1, *smollm_tokenizer.encode("hi")]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")
