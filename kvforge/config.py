"""Frozen configuration dataclasses, validated at construction.

Each dataclass is the single source of defaults: the CLI builds its options from these fields.
Derived values are properties, never stored twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" picks one GPU
LOAD_FORMATS = ("auto", "dummy")
KV_CACHE_DTYPES = ("auto", "int8", "int4", "fp8_e4m3", "fp8_e5m2")  # "auto": the model's dtype
SPECULATIVE_METHODS = ("ngram", "draft")
_METHOD_ALIASES = {"draft_model": "draft"}  # vLLM's name for "draft"
TIER_POLICIES = ("write_back", "write_through")  # when blocks reach the kv_tiers: on eviction, or as cached
CPU_KV_CACHE_MEMORY = 1 << 30  # the arena's size on CPU when neither num_blocks nor kv_cache_memory is given


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing and reuse.

    The arena is sized from `num_blocks` when given, else from `kv_cache_memory` (bytes) when given,
    else by device: on CPU `CPU_KV_CACHE_MEMORY` (1 GiB); on a GPU what is left of
    `gpu_memory_utilization` of the device's memory once the weights, the activations of the largest
    step (measured by one profiling forward) and the memory torch does not manage are taken out (see
    `kvforge.model.memory`).
    With `enable_prefix_caching`, full blocks are shared between requests with the same prefix and
    kept after a request ends until memory is needed; pinned prefixes may hold at most
    `max_pinned_fraction` of the blocks, registered document chunks `max_chunk_fraction`.
    `kv_cache_dtype`: the KV format, "auto" (the model's dtype) or a quantized one ("int8", "int4",
    "fp8_e4m3", "fp8_e5m2"; see `kvforge.ops.quant`): a budget in bytes then holds more blocks.
    `kv_quality_sample`: with a quantized format, the fraction of decode steps of each request that
    are also computed from full-precision K/V (a recompute of the request's tokens) to measure the
    KL divergence between the two next-token distributions (`EngineStats.kv_quality_kl`).
    `kv_tiers`: storage below the arena, top first: "host:4GiB" (process memory), "disk:PATH:50GiB" (a
    directory) and "redis://HOST:PORT/DB" (a Redis or Valkey server; `?ttl=SECONDS` optional). Evicted
    cached blocks are written to them (`kv_tier_policy="write_back"`), or every block as it is cached
    ("write_through", for sharing with other processes at once); a prompt's blocks found there are
    loaded instead of recomputed (see `kvforge.cache.tiered`).
    `load_cache`: a directory written by `LLM.save_cache`, restored at start (cached prefixes, pins
    and registered chunks).
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_pinned_fraction: float = 0.5
    max_chunk_fraction: float = 0.25
    kv_cache_dtype: str = "auto"
    kv_quality_sample: float = 0.0
    kv_tiers: tuple[str, ...] = ()
    kv_tier_policy: str = "write_back"
    load_cache: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.kv_tiers, str) or not all(isinstance(t, str) and t for t in self.kv_tiers):
            raise ValueError(f"kv_tiers must be a list of tier specs such as ['host:4GiB', 'disk:/var/cache/kvforge:"
                             f"50GiB', 'redis://127.0.0.1:6379/0'], got {self.kv_tiers!r}")
        object.__setattr__(self, "kv_tiers", tuple(self.kv_tiers))
        if self.kv_tier_policy not in TIER_POLICIES:
            raise ValueError(f"kv_tier_policy must be one of {', '.join(TIER_POLICIES)}, got {self.kv_tier_policy!r}")
        if self.load_cache is not None and (not isinstance(self.load_cache, str) or not self.load_cache):
            raise ValueError(f"load_cache must be the path of a saved cache directory, got {self.load_cache!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if isinstance(self.kv_quality_sample, bool) or not 0 <= self.kv_quality_sample <= 1:
            raise ValueError(f"kv_quality_sample must be a fraction in [0, 1], got {self.kv_quality_sample!r}")
        if self.kv_quality_sample and self.kv_cache_dtype == "auto":
            raise ValueError("kv_quality_sample measures a quantized KV format against full precision: "
                             "set kv_cache_dtype (int8, int4, fp8_e4m3, fp8_e5m2) too")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes or None, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if isinstance(self.gpu_memory_utilization, bool) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {self.gpu_memory_utilization!r}")
        if not 0 <= self.max_pinned_fraction <= 1:
            raise ValueError(f"max_pinned_fraction must be in [0, 1], got {self.max_pinned_fraction}")
        if not 0 <= self.max_chunk_fraction <= 1:
            raise ValueError(f"max_chunk_fraction must be in [0, 1], got {self.max_chunk_fraction}")

    @property
    def sized_explicitly(self) -> bool:
        """Whether `num_blocks` or `kv_cache_memory` fixes the arena (no profiling on a GPU)."""
        return self.num_blocks is not None or self.kv_cache_memory is not None

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        """The number of blocks the arena holds for a model whose block takes `bytes_per_block`, from
        `num_blocks`, else `kv_cache_memory`, else `CPU_KV_CACHE_MEMORY` (a GPU's profiled budget is
        `kvforge.model.memory`'s business)."""
        if self.num_blocks is not None:
            return self.num_blocks
        memory = self.kv_cache_memory if self.kv_cache_memory is not None else CPU_KV_CACHE_MEMORY
        n = memory // bytes_per_block
        if n < 1:
            raise ValueError(
                f"kv_cache_memory={memory} bytes holds no block of {bytes_per_block} bytes; "
                f"raise it to at least {bytes_per_block}"
            )
        return n


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits. A waiting request is admitted only while `watermark` of the
    pool's blocks stay available after it (room for running requests to grow; 0 disables it)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be a fraction in [0, 1), got {self.watermark}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config`): each step, a decoding sequence proposes up
    to `num_speculative_tokens` tokens and one forward of the model verifies them all. Greedy requests
    keep exactly their plain output; sampled ones keep their output distribution (rejection sampling).

    `method` "ngram" is prompt lookup: the longest suffix of the sequence (between `prompt_lookup_min`
    and `prompt_lookup_max` tokens) found earlier in its prompt or output proposes the tokens that
    followed it there; no extra model.

    `method` "draft" (vLLM also spells it "draft_model"; inferred when `model` is given without a
    method) runs a draft model, `model` (anything the engine loads: "smollm2-135m", a .gguf path, a HF
    directory, or with `load_format="dummy"` a config.json), greedily for `num_speculative_tokens`
    tokens; it must share the target's vocabulary. It runs in the target's dtype and KV format over its
    own paged KV cache: with `draft_kv_cache_memory` None that cache holds as many blocks as the
    target's and the KV budget (`kv_cache_memory`, the CPU default, or a GPU's profiled budget) is
    shared between the two arenas in proportion to their bytes per block (`num_blocks` fixes both);
    `draft_kv_cache_memory` (bytes) sizes it on its own, beyond the target's budget.
    The `prompt_lookup_*` fields are ngram's (default 2 and 4); `model`, `load_format` and
    `draft_kv_cache_memory` the draft's. Giving one method another's option is a ValueError.
    """

    method: str | None = None  # None: "draft" when a model is given, else "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int | None = None  # ngram's; None: 2
    prompt_lookup_max: int | None = None  # ngram's; None: 4
    model: str | None = None
    load_format: str = "auto"
    draft_kv_cache_memory: int | None = None

    def __post_init__(self) -> None:
        method = self.method
        if method is None:
            method = "ngram" if self.model is None else "draft"
        if isinstance(method, str):
            method = _METHOD_ALIASES.get(method, method)
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got "
                             f"{self.method!r}")
        object.__setattr__(self, "method", method)
        lookup = ("prompt_lookup_min", "prompt_lookup_max")
        if method == "ngram":
            for name, default in zip(lookup, (2, 4)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        for name in ("num_speculative_tokens", *(lookup if method == "ngram" else ())):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative {name} must be an integer >= 1, got {value!r}")
        if method == "ngram" and self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"speculative load_format must be one of {', '.join(LOAD_FORMATS)}, got "
                             f"{self.load_format!r}")
        memory = self.draft_kv_cache_memory
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
            raise ValueError(f"speculative draft_kv_cache_memory must be a positive number of bytes or None, got "
                             f"{memory!r}")
        # Each method refuses the other's options.
        if method == "draft":
            if not isinstance(self.model, str) or not self.model.strip():
                raise ValueError(f"speculative method 'draft' needs model: the draft model, e.g. 'smollm2-135m', a "
                                 f".gguf path or a HF directory, got {self.model!r}")
            given = [name for name in lookup if getattr(self, name) is not None]
            if given:
                raise ValueError(f"speculative method 'draft' takes no {given[0]} (an option of method 'ngram', "
                                 f"prompt lookup); the draft model proposes the tokens")
        else:
            given = [name for name in ("model", "draft_kv_cache_memory") if getattr(self, name) is not None]
            given += ["load_format"] if self.load_format != "auto" else []
            if given:
                raise ValueError(f"speculative method 'ngram' takes no {given[0]} (an option of method 'draft', "
                                 f"which runs a draft model); ngram takes num_speculative_tokens, "
                                 f"prompt_lookup_min and prompt_lookup_max")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an LLMEngine needs; composes the room configs.

    `device`: "auto" (a GPU when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N".
    `dtype` of the weights and the KV cache: None picks bfloat16 on a GPU, float32 on the CPU.
    `load_format`: "auto" reads the checkpoint `model` names; "dummy" builds random weights (seeded by
    `seed`) from a HF config.json (`model` is a directory holding one, or the .json file), for
    benchmarks of shapes whose weights are not at hand.
    `enforce_eager`: on a GPU, run decode steps eagerly instead of replaying CUDA graphs captured at
    start-up (one per batch-size bucket up to `max_num_seqs`).
    `async_scheduling`: launch each plain greedy decode step before reading the tokens of the step in
    flight, so the host's work overlaps the device's (engine/overlap.py); `step()` then returns a
    step's outputs one call later. None (the default) turns it on where it pays: on a GPU with CUDA
    graphs. On the CPU, whose ops run synchronously, it overlaps nothing.
    The engine resolves device and dtype (`LLMEngine.device`, `LLMEngine.dtype`).
    """

    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str | None = None
    load_format: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None (bfloat16 on a GPU, float32 "
                             f"on the CPU), got {self.dtype!r}")
        if not isinstance(self.device, str) or not (self.device in DEVICES or _is_cuda_index(self.device)):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} or 'cuda:N', got {self.device!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (on with CUDA graphs), got "
                             f"{self.async_scheduling!r}")
        if not self.model:
            raise ValueError("model must name a model: 'smollm2-135m', a .gguf path or a HF directory")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (`block_size=16, max_num_seqs=8, ...`), as `LLM` takes them.

        Unknown names raise ValueError listing the accepted ones.
        """
        groups = {"cache": CacheConfig, "scheduler": SchedulerConfig}
        top = {f.name for f in fields(cls)} - set(groups) - {"speculative"}
        parts: dict[str, dict] = {g: {} for g in groups}
        own: dict = {}
        spec = kwargs.pop("speculative_config", None)  # vLLM's name: a dict or a SpeculativeConfig
        if spec is not None:
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except ValueError as e:
                    raise ValueError(f"speculative_config must be JSON such as "
                                     f"'{{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}' ({e})") from None
            if isinstance(spec, dict):
                unknown = set(spec) - {f.name for f in fields(SpeculativeConfig)}
                if unknown:
                    raise ValueError(f"unknown speculative_config keys {sorted(unknown)}; allowed: "
                                     f"{', '.join(f.name for f in fields(SpeculativeConfig))}")
                spec = SpeculativeConfig(**spec)
            if not isinstance(spec, SpeculativeConfig):
                raise ValueError(f"speculative_config must be a dict or a SpeculativeConfig, got {type(spec).__name__}")
            own["speculative"] = spec
        for key, value in kwargs.items():
            if key in top:
                own[key] = value
                continue
            for group, klass in groups.items():
                if key in {f.name for f in fields(klass)}:
                    parts[group][key] = value
                    break
            else:
                allowed = sorted(top | {"speculative_config"} | {f.name for k in groups.values() for f in fields(k)})
                raise ValueError(f"unknown engine option {key!r}; allowed: {', '.join(allowed)}")
        return cls(**own, **{g: groups[g](**p) for g, p in parts.items()})


def _is_cuda_index(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind == "cuda" and index.isdigit()



def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
