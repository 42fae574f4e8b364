"""A hypothesis fuzzer over the HTTP API, against a real uvicorn server on an engine of its own
(max_model_len 64, a 16 MiB cache: any valid request that slips through is cheap).

What is fuzzed, on POST /v1/completions, POST /v1/chat/completions, POST /v1/chunks, GET /v1/chunks
and DELETE /v1/chunks/{id}:
  - valid bodies (streamed or not) with fields replaced by wrong types, huge and negative numbers
    (2**64, -2**63, 1e308), NaN/Infinity (as raw JSON tokens and as strings), lone surrogates (the
    `\\ud800` escape on the wire, or its invalid UTF-8 bytes), control characters, long strings,
    deep nesting, unknown fields (named with such strings too), dropped fields; per field: `seed`
    huge, `stop` with many or long strings, `stop_token_ids` huge lists, `chunks` with unknown ids,
    `max_tokens` / `max_completion_tokens` absent or huge, `logit_bias` and `allowed_token_ids` with
    ids outside the vocabulary, `n`, `best_of`, logprob counts and `bad_words` out of range, and so on;
  - bodies that are not a JSON object: empty, malformed, truncated, 10_000-deep lists, a
    5000-digit number, other encodings, wrong content types and methods;
  - bodies of 1 to 5 MiB (the server answers those over its 4 MiB limit with 413), some sent
    chunked (no Content-Length);
  - chunk ids in DELETE paths; sequences of chunk registrations, requests that use them, deletions.

Checked after every example: each status is 2xx or 4xx (or 503), never another 5xx, never a hang
(no reply within TIMEOUT seconds fails); every non-2xx body is OpenAI's error object {"error":
{"message", "type", "param", "code"}}; a streamed 2xx ends with `data: [DONE]` and carries no error
event; GET /health is 200, a normal completion still succeeds, and the engine is idle and intact
(`assert_idle_and_intact`). Chunks the fuzzer registered are deleted after each example; at the end
of each test no chunk and no request state is left.

An example that leaves the server broken (dead engine loop, state left behind, the normal request
failing) ends its test at once, unshrunk (`ServerBroken`); the next test gets a fresh engine.
Any other failing example is shrunk by hypothesis as usual.

Replay: every run draws a seed (or takes KVFORGE_FUZZ_SEED), prints it (`pytest -s`) and names it
in every failure message; rerun with

    KVFORGE_FUZZ_SEED=<seed> pytest tests/server/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from kvforge.config import EngineConfig
from kvforge.engine import LLMEngine
from kvforge.server import ServerConfig
from kvforge.server.serve import Server
from tests.conftest import MODEL
from tests.server.conftest import assert_idle_and_intact

SEED = int(os.environ.get("KVFORGE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
REPLAY = f"replay with KVFORGE_FUZZ_SEED={SEED}"
ENGINE = {"model": MODEL, "kv_cache_memory": 16 << 20, "max_model_len": 64}
TIMEOUT = 30.0  # seconds for a whole reply, streamed or not
MiB = 1 << 20
BODY_LIMIT = getattr(ServerConfig(), "max_body_bytes", 4 * MiB)  # a body over it is answered 413
# No database and one bug per test (hypothesis would look on for more bugs for up to 10 s, by the
# clock): the same seed makes the same examples.
FUZZ = settings(deadline=None, database=None, report_multiple_bugs=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

COMPLETIONS, CHAT, CHUNKS = "/v1/completions", "/v1/chat/completions", "/v1/chunks"
PROBE = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}
# Chunks registered before every example, so that `chunks` can name ids that exist.
FIXTURE_CHUNKS = {"fuzz-sys": {"text": "You are terse.", "kind": "system", "id": "fuzz-sys"},
                  "fuzz-doc": {"text": "The library opens at nine.", "kind": "context", "id": "fuzz-doc"}}


# ---- what goes on the wire ----------------------------------------------------------------------

@dataclass(frozen=True)
class Raw:
    """JSON text written into the body as it is: `NaN`, `1e999`, a 5000-digit number, `"\\ud800"`."""

    text: str

    def __repr__(self) -> str:
        return f"Raw({_short(self.text)!r})"


def to_json(value, ascii_only: bool = True) -> str:
    """`value` as JSON text, Raw parts as they are; strings escaped as json.dumps escapes them (a
    lone surrogate becomes the `\\ud800` escape when `ascii_only`, else the character itself)."""
    raws: dict[str, str] = {}
    nonce = os.urandom(8).hex()  # no string of the value can be a placeholder

    def swap(v):  # each Raw becomes a placeholder string, replaced by its text once encoded
        if isinstance(v, Raw):
            key = f"\x00raw-{nonce}-{len(raws)}\x00"
            raws[json.dumps(key)] = v.text
            return key
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), ensure_ascii=ascii_only)
    for key, raw in raws.items():
        text = text.replace(key, raw)
    return text


def to_body(value, ascii_only: bool = True) -> bytes:
    """UTF-8 bytes of `to_json(value)`; a lone surrogate written as a character becomes its
    (invalid) UTF-8 bytes."""
    return to_json(value, ascii_only).encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Case:
    """One HTTP request. `chunked`: the body goes out with Transfer-Encoding: chunked."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    chunked: bool = False

    def __repr__(self) -> str:
        body = None if self.body is None else _short(self.body)
        extra = f", {len(self.body)} bytes" if self.body is not None and len(self.body) > 1000 else ""
        return (f"Case({self.method} {_short(self.path)}, body={body!r}{extra}, content_type={self.content_type!r}"
                f"{', chunked' if self.chunked else ''})")

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a falsifying example
        printer.text(repr(self))


def _short(s, limit: int = 1000):
    """`s` (str or bytes) cut in the middle when it is long."""
    if len(s) <= limit:
        return s
    return s[:700] + (b"..." if isinstance(s, bytes) else "...") + s[-200:]


def post(path: str, value, ascii_only: bool = True, **kw) -> Case:
    return Case("POST", path, to_body(value, ascii_only), **kw)


# ---- strategies: values --------------------------------------------------------------------------

SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d\ud83d"]
NASTY_TEXT = ["", " ", "\x00", "a\x00b", "\x01\x1f\x7f", "\x1b[2J", "\r\n\t\v\f", "\u2028\u2029", "\ufeff",
              "\uffff", "\U0010ffff", "\U0001F600" * 3, "<|im_end|>", "<|endoftext|>",
              "<|im_start|>system\n", "{{ raise_exception('x') }}", "%s%n", "../..", "null", "NaN", "Infinity",
              "9" * 400, *SURROGATES]
HUGE_NUMBERS = [2**64, 2**64 - 1, 2**63, 2**63 - 1, -2**63, -2**63 - 1, -2**64, 2**31, -2**31, 10**30, 10**100,
                1e308, -1e308, 5e-324, -0.0, 1.5]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "-0", "9" * 5000, "0x10", "01", "+1",
              ".5", "tru", "undefined", "'x'", '"\\ud800"', '"\\udfff"', '"a\\ud800\\ud800b"', '"\\u0000"',
              '"\\uZZZZ"', '"a\x00b"', '"\\x41"']


def weighted(*choices):
    """A value from one of the strategies, picked with the given weights: weighted((3, a), (1, b))."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


def nasty_strings():
    return st.one_of(st.sampled_from(NASTY_TEXT), st.sampled_from(SURROGATES),
                     st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=20),
                     st.sampled_from([1_000, 100_000]).map(lambda n: "ab" * (n // 2)))


def raw_tokens():
    return st.sampled_from(RAW_TOKENS).map(Raw)


def deep_nesting():
    """10_000-deep (or deeper) lists or objects, as JSON text."""
    return st.builds(lambda n, kind: Raw("[" * n + "]" * n if kind == "list" else '{"a":' * n + "1" + "}" * n),
                     st.sampled_from([1_000, 10_000, 100_000]), st.sampled_from(["list", "object"]))


def json_values():
    """Any small JSON value, NaN and Infinity included."""
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                          max_size=3), max_leaves=8)


def weird_values():
    """A value of the wrong type or out of any sane range, for any field."""
    return st.one_of(st.sampled_from([None, True, False, 0, 1, -1, "", "1", [], {}, [[]], [None], {"": None}]),
                     st.sampled_from(HUGE_NUMBERS), raw_tokens(), nasty_strings(), deep_nesting(), json_values())


def token_lists():
    return st.one_of(st.lists(st.integers(0, 49151), min_size=1, max_size=8),
                     st.sampled_from([[], [49152], [-1], [2**64], [-2**63], [True], [1.5], ["a"], [None], [[1]],
                                      [5] * 40, [5] * 100, list(range(10_000))]),
                     st.lists(st.sampled_from(HUGE_NUMBERS) | raw_tokens(), min_size=1, max_size=3))


def messages():
    role = weighted((2, st.sampled_from(["user", "system", "assistant", "tool", "developer", "", "USER"])),
                    (1, nasty_strings()))
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]),
                                  "text": st.just("Hi") | nasty_strings()})
    content = weighted((3, nasty_strings()), (1, st.just("Hi")), (1, st.none()), (1, st.lists(part, max_size=3)),
                       (1, weird_values()))
    message = st.fixed_dictionaries({"role": role, "content": content},
                                    optional={"name": st.just("bob") | weird_values(), "tool_calls": weird_values()})
    return weighted((4, st.lists(message, min_size=1, max_size=3)), (1, st.just([])), (1, weird_values()))


def chunk_ids():
    """Registered ids, unknown ones, and ids that are not ids at all."""
    return st.one_of(st.sampled_from([*FIXTURE_CHUNKS, "nope", "a" * 129, "-x", "a/b", "..", "%", "%2F", "a b"]),
                     st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True), nasty_strings())


def stop_values():
    return st.one_of(st.sampled_from(["\n", "x", [""], [], ["a", "b"], [None]]), nasty_strings(),
                     st.lists(nasty_strings(), max_size=4),
                     st.sampled_from([1_000, 20_000]).map(lambda n: [f"stop{i}" for i in range(n)]),
                     st.sampled_from([10_000, 300_000]).map(lambda n: ["x" * n]))


def ints(*usual):
    return st.sampled_from([*usual, 0, -1, *HUGE_NUMBERS, "3", 2.0, True])


def floats(*usual):
    return st.sampled_from([*usual, -1, 0, 1, 2, -1e-9, 1e-9, *HUGE_NUMBERS, "0.5", "NaN", True]) | raw_tokens()


# The fields of each body, with values worth trying for each; weird_values() is tried for all.
COMMON_FIELDS = {
    "model": st.sampled_from([MODEL, "", "gpt-4", MODEL.upper()]) | nasty_strings(),
    "max_tokens": ints(1, 2, 7, 64, 65),
    "temperature": floats(0, 0.7, 1e-320),
    "top_p": floats(0.5, 1e-320),
    "top_k": ints(1, 5, 49152, 49153, 10**6),
    "stop": stop_values(),
    "seed": st.sampled_from([7, -1, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**100]),
    "n": ints(1, 2),
    "stream": st.sampled_from([True, False, None, "true", 1, 0]),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": "yes"}, {}, {"x": 1}, None]),
    "user": nasty_strings(),
    "ignore_eos": st.sampled_from([True, False, None, "yes", 2]),
    "stop_token_ids": st.one_of(token_lists(), st.just([0] * 100_000)),
    "cache_salt": st.sampled_from(["s", ""]) | nasty_strings(),
    "priority": ints(1, -5),
    "chunks": st.lists(chunk_ids(), max_size=3) | st.sampled_from([["fuzz-sys", "fuzz-doc"], ["fuzz-doc", "fuzz-sys"],
                                                                   ["fuzz-doc"] * 1000]),
    "recompute_ratio": floats(0.15, 0.5, 1.0000001),
    "presence_penalty": floats(0.5),
    "frequency_penalty": floats(0.5),
    "logit_bias": st.sampled_from([{}, {"1": 0}, {"1": 100}, {"x": 1}, {"1": float("nan")}, {"49152": 1},
                                   {"9999999999": -100}, {"-1": 1}, {str(i): 1 for i in range(2000)}]),
    "logprobs": ints(5),
    "top_logprobs": ints(5),
    "best_of": ints(1, 2, 3),
    "repetition_penalty": floats(1.2, 1e-9),
    "min_p": floats(0.1),
    "min_tokens": ints(1, 3),
    "bad_words": st.sampled_from([[], [""], ["x"], ["Hello"], ["a"] * 200, ["b" * 300]]) | st.lists(nasty_strings(),
                                                                                                    max_size=2),
    "allowed_token_ids": st.sampled_from([[], [5], [49151], [49152], [-1], [10 ** 9]]) | token_lists(),
    "prompt_logprobs": ints(1, 20, 21),
    "skip_special_tokens": st.sampled_from([True, False, None, "no"]),
    "spaces_between_special_tokens": st.sampled_from([True, False, None]),
    "truncate_prompt_tokens": ints(1, 3, 64, 65),
    "metadata": st.sampled_from([{}, {"k": "v"}, None]),
    "store": st.sampled_from([True, False, None]),
    "service_tier": st.sampled_from(["auto", "default", ""]),
}
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": weighted((3, nasty_strings()), (1, st.sampled_from(["Hello", "", [], [[]], ["a"], ["a", "b"], [[1, 2]],
                                                                  "x" * 5000])),
                       (1, token_lists()), (1, st.lists(token_lists(), max_size=2)),
                       (1, st.lists(nasty_strings(), max_size=2))),
    "echo": st.sampled_from([True, False, None]),
    "suffix": st.sampled_from(["", "x", None]),
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": messages(),
    "max_completion_tokens": ints(1, 2, 64),
    "tools": st.sampled_from([[], [{"type": "function"}], None]),
    "tool_choice": st.sampled_from(["none", "auto", None, {}]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {}, None]),
    "parallel_tool_calls": st.sampled_from([True, False, None]),
}
_FOCUS = ["max_tokens", "seed", "stop", "stop_token_ids", "chunks", "stream", "temperature", "top_k", "n", "logprobs",
          "logit_bias", "allowed_token_ids", "bad_words", "prompt_logprobs", "truncate_prompt_tokens"]
COMPLETION_FOCUS = ["prompt"] * 3 + _FOCUS
CHAT_FOCUS = ["messages"] * 3 + ["max_completion_tokens"] + _FOCUS
CHUNK_FIELDS = {
    "text": st.sampled_from(["Some document.", "x" * 300, "hello " * 100]) | nasty_strings(),
    "token_ids": token_lists(),
    "kind": st.sampled_from(["system", "context", "", "query", "SYSTEM"]) | nasty_strings(),
    "id": chunk_ids(),
    "model": COMMON_FIELDS["model"],
}


@st.composite
def mutated(draw, base: dict, fields: dict, focus: list[str]) -> dict:
    """`base` after 1 to 3 edits: the first sets or drops one of the `focus` fields, the others set
    or drop any field or add an unknown one. A field is set to a value for it (mostly) or to anything."""
    body = dict(base)
    for i in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        edit = draw(st.sampled_from(["set"] * 4 + ["drop"] + ([] if i == 0 else ["unknown"])))
        name = draw(st.sampled_from(focus if i == 0 else sorted(fields)))
        if edit == "set":
            body[name] = draw(weighted((3, fields[name]), (1, weird_values())))
        elif edit == "drop":  # dropping a field the body lacks changes nothing
            body.pop(name, None)
        else:
            body[draw(st.sampled_from(["max_tokenz", "prompt_token_ids", "__proto__", "extra"]) | nasty_strings())] = \
                draw(weird_values())
    return body


# ---- strategies: requests ------------------------------------------------------------------------

def content_types():
    return st.sampled_from(["application/json"] * 18 + [None, "text/plain", "application/x-www-form-urlencoded",
                                                       "multipart/form-data; boundary=x", "application/octet-stream",
                                                       "application/json; charset=latin-1"])


@st.composite
def completion_bodies(draw) -> dict:
    base = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "stream": draw(st.booleans())}
    return draw(mutated(base, COMPLETION_FIELDS, COMPLETION_FOCUS))


@st.composite
def chat_bodies(draw) -> dict:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "stream": draw(st.booleans())}
    return draw(mutated(base, CHAT_FIELDS, CHAT_FOCUS))


@st.composite
def chunk_bodies(draw) -> dict:
    base = draw(st.sampled_from([{"text": "A short document."}, {"token_ids": [5, 6, 7], "kind": "context"},
                                 {"text": "Be brief.", "kind": "system", "id": "fuzz-new"}]))
    return draw(mutated(base, CHUNK_FIELDS, ["text", "text", "token_ids", "kind", "id"]))


@st.composite
def api_cases(draw, bodies, path: str) -> Case:
    """A fuzzed body for `path`, usually with a JSON content type."""
    return post(path, draw(bodies), ascii_only=draw(st.sampled_from([True, True, True, False])),
                content_type=draw(content_types()))


@st.composite
def chunk_requests_using_chunks(draw) -> Case:
    """A completion or chat completion that names chunks."""
    path, bodies = draw(st.sampled_from([(COMPLETIONS, completion_bodies()), (CHAT, chat_bodies())]))
    body = draw(bodies)
    body["chunks"] = draw(COMMON_FIELDS["chunks"] | st.just(["fuzz-sys", "fuzz-doc"]))
    if draw(st.booleans()):
        body["recompute_ratio"] = draw(COMMON_FIELDS["recompute_ratio"])
    return post(path, body)


def chunk_deletes():
    """DELETE /v1/chunks/{id}, the id percent-encoded (a lone surrogate as its UTF-8 bytes)."""
    def delete(chunk_id: str) -> Case:
        path = quote(chunk_id[:20_000].encode("utf-8", "surrogatepass"), safe="")
        return Case("DELETE", f"{CHUNKS}/{path}", None, None)

    return chunk_ids().map(delete)


def chunk_lists():
    return st.sampled_from(["", "?limit=1", "?after=%ff", "?" + "x" * 5000]).map(
        lambda query: Case("GET", CHUNKS + query, None, None))


@st.composite
def malformed_cases(draw) -> Case:
    """A body that is not a valid request object, on any POST endpoint, maybe with another method."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT, CHUNKS]))
    valid = to_body({"model": MODEL, "prompt": "Hello", "max_tokens": 1} if path == COMPLETIONS else
                    {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
                    if path == CHAT else {"text": "A document."})
    body = draw(st.one_of(
        st.sampled_from([b"", b"null", b"true", b"1", b'"x"', b"[]", b"[{}]", b"{", b"}", b"{}", b'{"prompt"}',
                         b"{'prompt': 'x'}", b"\xff\xfe\x00", b"\x00" * 10, b"\xef\xbb\xbf{}", b"NaN", b"9" * 5000,
                         b'"\\ud800"', b'{"\\ud800": 1}', b'{"a": "\\ud800"}', b" " * 1000]),
        st.integers(0, len(valid)).map(lambda i: valid[:i]),                      # truncated
        st.sampled_from([b" x", b"}", b",", b"\x00", b"{}"]).map(lambda tail: valid + tail),  # trailing garbage
        st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"]).map(lambda enc: valid.decode().encode(enc)),
        st.just(b'{"stream": true, ' + valid[1:]),                                 # a duplicate or extra key
        deep_nesting().map(lambda raw: raw.text.encode()),
        st.binary(max_size=64)))
    method = draw(st.sampled_from(["POST"] * 8 + ["GET", "PUT", "PATCH", "DELETE"]))
    if method != "POST":  # answered 405 before the body is read: a body could race the server's close
        return Case(method, path, None, draw(content_types()))
    return Case(method, path, body, draw(content_types()), bool(body) and draw(st.booleans()))


@st.composite
def megabyte_cases(draw) -> Case:
    """A 1 to 5 MiB body: one huge string or list in a field, or the padding of an unknown one."""
    size = draw(st.sampled_from([1, 3, 5])) * MiB
    path, build = draw(st.sampled_from([
        (COMPLETIONS, lambda s: {"prompt": "Hello world " * (s // 12), "max_tokens": 1}),
        (COMPLETIONS, lambda s: {"prompt": "Hello", "max_tokens": 1, "stop": ["x" * (s // 2), "y" * (s // 2)]}),
        (COMPLETIONS, lambda s: {"prompt": "Hello", "max_tokens": 1, "stop_token_ids": [1] * (s // 3)}),
        (CHAT, lambda s: {"messages": [{"role": "user", "content": "\x01\u00e9" * (s // 12)}], "max_tokens": 1}),
        (CHAT, lambda s: {"messages": [{"role": "user", "content": "Hi"}] * (s // 36), "max_tokens": 1}),
        (CHUNKS, lambda s: {"text": "Some document. " * (s // 15)}),
        (CHUNKS, lambda s: {"text": "Some document.", "padding": "p" * s}),
    ]))
    return post(path, build(size), chunked=draw(st.booleans()))


# ---- the server and the checks ------------------------------------------------------------------

class ServerBroken(BaseException):
    """An example left the server broken. A BaseException, so that hypothesis neither shrinks nor
    replays it (every later example would fail the same way): the test reports it as it is."""


@dataclass(frozen=True)
class Reply:
    status: int | None  # None: no complete reply within TIMEOUT
    content_type: str
    body: bytes
    error: str = ""


class Fuzzer:
    """A server over an engine of its own; a broken one is replaced, engine and all, by `start`."""

    def __init__(self):
        self.server: Server | None = None
        self.http: httpx.Client | None = None
        self.broken = False

    def start(self) -> None:
        print(f"\n[test_fuzz] {REPLAY}")
        if self.server is not None and not self.broken:
            return
        self.stop()
        engine = LLMEngine(EngineConfig.from_kwargs(**ENGINE))
        self.server = Server(engine, ServerConfig(port=0, log_level="warning")).start()
        # A fresh connection for every request: none inherits another's fate, and none waits out
        # the 40 ms delayed ACK that a reused connection to Server.start()'s socket costs here.
        self.http = httpx.Client(base_url=self.server.url, timeout=TIMEOUT,
                                 limits=httpx.Limits(max_keepalive_connections=0))
        self.broken = False

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.server is not None:
            self.server.stop()
        self.server = self.http = None

    def send(self, case: Case) -> Reply:
        """`case`'s reply, read whole within TIMEOUT seconds."""
        headers = {} if case.content_type is None else {"content-type": case.content_type}
        content = case.body
        if case.chunked and content:
            content = iter([content[i:i + 65536] for i in range(0, len(content), 65536)])
        deadline = time.monotonic() + TIMEOUT
        try:
            with self.http.stream(case.method, case.path, content=content, headers=headers) as r:
                body = bytearray()
                for piece in r.iter_raw():
                    body += piece
                    if time.monotonic() > deadline:
                        return Reply(None, "", bytes(body), f"no complete reply within {TIMEOUT:g} s")
                return Reply(r.status_code, r.headers.get("content-type", ""), bytes(body))
        except httpx.HTTPError as e:
            return Reply(None, "", b"", f"{type(e).__name__}: {e}")

    def example(self, *cases: Case) -> None:
        """Send `cases` in order, check the server still serves, then check each reply."""
        # The fixture chunks only when a case may name them: registering one runs a prefill.
        if any(b"fuzz-" in (case.body or b"") or "fuzz-" in case.path for case in cases):
            self.register_fixture_chunks()
        replies = [(case, self.send(case)) for case in cases]
        self.assert_still_serving(replies)
        for case, reply in replies:
            check_reply(case, reply)

    def register_fixture_chunks(self) -> None:
        for body in FIXTURE_CHUNKS.values():
            r = self.http.post(CHUNKS, json=body)
            assert r.status_code == 200, f"could not register fixture chunk {body}: {r.status_code} {r.text} ({REPLAY})"

    def delete_chunks(self) -> None:
        for chunk in self.http.get(CHUNKS).json()["data"]:
            r = self.http.delete(f"{CHUNKS}/{quote(chunk['id'], safe='')}")
            assert r.status_code == 200, f"could not delete chunk {chunk['id']!r}: {r.status_code} {r.text}"

    def assert_still_serving(self, replies) -> None:
        """GET /health is 200, a normal completion succeeds, the engine is idle and intact; else
        ServerBroken. Deletes every chunk first (chunks hold blocks)."""
        try:
            assert self.server.loop.alive, "the engine loop thread is dead"
            r = self.http.get("/health", timeout=5)
            assert r.status_code == 200, f"GET /health: {r.status_code} {r.text}"
            r = self.http.post(COMPLETIONS, json=PROBE)
            assert r.status_code == 200, f"a normal completion: {r.status_code} {r.text}"
            assert r.json()["usage"]["completion_tokens"] == 1, r.text
            self.delete_chunks()
            assert_idle_and_intact(self.server, timeout=5)
        except (AssertionError, httpx.HTTPError, RuntimeError, TimeoutError) as e:
            self.broken = True
            sent = "\n".join(f"  {case!r}\n    -> {_describe(reply)}" for case, reply in replies)
            raise ServerBroken(f"the server is broken after\n{sent}\n{type(e).__name__}: {e}\n({REPLAY})") from e

    def finish(self) -> None:
        """At the end of a test: delete every chunk, then nothing may be left."""
        self.delete_chunks()
        assert self.http.get(CHUNKS).json()["data"] == [], REPLAY
        assert_idle_and_intact(self.server)


def _describe(reply: Reply) -> str:
    if reply.status is None:
        return reply.error
    return f"{reply.status} {reply.content_type}: {_short(reply.body)!r}"


def check_reply(case: Case, reply: Reply) -> None:
    """The status is 2xx, 4xx or 503 (413 exactly for a body over BODY_LIMIT); an error is in
    OpenAI's shape; a stream ends with [DONE] and holds no error."""
    context = f"{case!r}\n  -> {_describe(reply)}\n({REPLAY})"
    assert reply.status is not None, f"no reply: {context}"
    assert 200 <= reply.status < 300 or 400 <= reply.status < 500 or reply.status == 503, f"a bad status: {context}"
    too_large = case.body is not None and len(case.body) > BODY_LIMIT
    assert (reply.status == 413) == too_large, f"a body over {BODY_LIMIT} bytes is 413, no other is: {context}"
    if reply.content_type.startswith("text/event-stream"):
        assert reply.body.endswith(b"data: [DONE]\n\n"), f"an unfinished stream: {context}"
        for event in reply.body.split(b"\n\n")[:-2]:
            assert event.startswith(b"data: "), f"not an event {event!r}: {context}"
            assert "error" not in _json(event[len(b"data: "):], context), f"an error in a 200 stream: {context}"
        return
    assert reply.content_type.startswith("application/json"), f"not JSON: {context}"
    data = _json(reply.body, context)
    assert isinstance(data, dict), context
    if reply.status >= 300:
        assert set(data) == {"error"} and isinstance(data["error"], dict), f"not an error object: {context}"
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"}, f"not OpenAI's error shape: {context}"
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), context
        assert all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")), context


def _json(text: bytes, context: str):
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"not JSON: {context}") from None


@pytest.fixture(scope="module")
def fuzzer():
    f = Fuzzer()
    yield f
    f.stop()


def fuzz(fuzzer: Fuzzer, run) -> None:
    """Run the hypothesis test `run` on a serving fuzzer; a ServerBroken fails the test as it is."""
    fuzzer.start()
    try:
        run()
    except ServerBroken as e:
        broken = str(e)
    else:
        return fuzzer.finish()
    pytest.fail(broken, pytrace=False)


# ---- the tests -----------------------------------------------------------------------------------

def test_fuzz_completion_and_chat_bodies(fuzzer):
    @settings(FUZZ, max_examples=250)
    @seed(SEED)
    @given(st.one_of(api_cases(completion_bodies(), COMPLETIONS), api_cases(chat_bodies(), CHAT)))
    def run(case):
        fuzzer.example(case)

    fuzz(fuzzer, run)


def test_fuzz_chunks(fuzzer):
    one = st.one_of(api_cases(chunk_bodies(), CHUNKS), chunk_deletes(), chunk_lists(), chunk_requests_using_chunks())

    @settings(FUZZ, max_examples=60)
    @seed(SEED)
    @given(st.lists(one, min_size=1, max_size=3))
    def run(cases):
        fuzzer.example(*cases)

    fuzz(fuzzer, run)


def test_fuzz_malformed_bodies(fuzzer):
    @settings(FUZZ, max_examples=60)
    @seed(SEED)
    @given(malformed_cases())
    def run(case):
        fuzzer.example(case)

    fuzz(fuzzer, run)


def test_fuzz_megabyte_bodies(fuzzer):
    @settings(FUZZ, max_examples=6)
    @seed(SEED)
    @example(post(COMPLETIONS, {"prompt": "Hello", "max_tokens": 1, "padding": "p" * 5 * MiB}))
    @example(post(CHUNKS, {"text": "Some document.", "padding": "p" * 5 * MiB}, chunked=True))
    @given(megabyte_cases())
    def run(case):
        fuzzer.example(case)

    fuzz(fuzzer, run)
