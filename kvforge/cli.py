"""kvforge command line: `kvforge generate`, `kvforge serve`, `kvforge info`. Options are built from the
config dataclasses' fields, so the CLI and the Python API share their defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from kvforge.config import CacheConfig, EngineConfig, SchedulerConfig
from kvforge.server import ServerConfig
from kvforge.types import SamplingParams

_ENGINE_GROUPS = (EngineConfig, CacheConfig, SchedulerConfig)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "ignore_eos")


def _add_fields(parser: argparse.ArgumentParser, klass: type, names: typing.Iterable[str] | None = None,
                dest_prefix: str = "") -> None:
    hints = typing.get_type_hints(klass)
    for f in dataclasses.fields(klass):
        kind = hints[f.name]
        if (names is not None and f.name not in names) or any(  # a nested config has options of its own
                dataclasses.is_dataclass(t) for t in (kind, *typing.get_args(kind))):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        dest = dest_prefix + f.name
        if kind is bool or kind == bool | None:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {default})")
            continue
        args = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
        scalar = next((t for t in args if t in (int, float, str)), str)
        nargs = "+" if f.name == "stop" or typing.get_origin(kind) is tuple else None
        parser.add_argument(flag, dest=dest, type=scalar, default=default, nargs=nargs,
                            help=f"(default: {default})")


def _engine_kwargs(ns: argparse.Namespace) -> dict:
    names = {f.name for k in _ENGINE_GROUPS for f in dataclasses.fields(k)} | {"speculative_config"}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def _engine_parser(parser: argparse.ArgumentParser) -> None:
    for klass in _ENGINE_GROUPS:
        _add_fields(parser, klass)
    parser.add_argument("--speculative-config", dest="speculative_config", default=None,
                        help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                             'or \'{"method": "draft", "model": "smollm2-135m", "num_speculative_tokens": 4}\' '
                             "(see SpeculativeConfig; default: off)")


def _cmd_generate(ns: argparse.Namespace) -> int:
    from kvforge.engine import LLM

    params = SamplingParams(**{k.removeprefix("sp_"): v for k, v in vars(ns).items()
                               if k.startswith("sp_") and v is not None})
    llm = LLM(**_engine_kwargs(ns))
    if len(ns.prompts) == 1:
        for piece in llm.stream(ns.prompts[0], params):
            print(piece, end="", flush=True)
        print()
    else:
        for out in llm.generate(ns.prompts, params):
            print(f"--- {out.prompt!r} ({out.outputs[0].finish_reason})")
            print(out.prompt + out.outputs[0].text)
    if ns.stats:
        s = llm.stats()
        print(f"\nsteps {s.num_steps}, prompt tokens {s.prompt_tokens}, generated tokens {s.generation_tokens}, "
              f"preemptions {s.num_preemptions}")
        print(llm.dump_stats())
    llm.close()  # cached blocks to the kv_tiers, if any
    return 0


def _cmd_serve(ns: argparse.Namespace) -> int:
    from kvforge.server.serve import Server

    server_kwargs = {k.removeprefix("srv_"): v for k, v in vars(ns).items()
                     if k.startswith("srv_") and v is not None}
    config = ServerConfig(**server_kwargs)  # validated before the model loads
    Server.from_config(EngineConfig.from_kwargs(**_engine_kwargs(ns)), config).run()
    return 0


def _cmd_info(ns: argparse.Namespace) -> int:
    from kvforge.engine import model_info

    print(json.dumps(model_info(EngineConfig.from_kwargs(**_engine_kwargs(ns))), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvforge", description="Paged KV-cache LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate from one prompt (streamed) or several (batched)")
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    gen.add_argument("--stats", action="store_true", help="print engine and cache stats afterwards")
    _engine_parser(gen)
    _add_fields(gen, SamplingParams, _SAMPLING_FIELDS, dest_prefix="sp_")
    gen.set_defaults(func=_cmd_generate)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (completions, chat, metrics)")
    _engine_parser(serve)
    _add_fields(serve, ServerConfig, dest_prefix="srv_")
    serve.set_defaults(func=_cmd_serve)
    info = sub.add_parser("info", help="model config, KV bytes per token and cache capacity")
    _engine_parser(info)
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except ValueError as e:
        print(f"kvforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
