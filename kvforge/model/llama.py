"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) reading and writing K/V only through
the paged cache. Shapes: T = tokens in the packed step batch, H = heads, K = kv heads, D = head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from kvforge import ops
from kvforge.config import ModelConfig
from kvforge.model.attention import paged_attention
from kvforge.ops.library import backend_for


class RMSNorm(nn.Module):
    """RMSNorm; with a `residual`, the residual is added first (fused on GPU) and the sum returned too."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        kernels = backend_for(x.device)
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)  # (normed, x + residual)

    def project(self, linear: Linear, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(`linear(self(x + residual))`, `x + residual`), the sum just `x` without a `residual`: one op,
        fused on GPU for one row (the decode step at batch 1)."""
        return backend_for(x.device).rms_norm_linear(x, residual, self.weight, self.eps, linear.weight, linear.bias,
                                                     linear.packed)


class Linear(nn.Linear):
    """`nn.Linear` whose float32 CPU weight can be packed once for oneDNN (`pack`, ops/linear.py). The
    pack is a copy: moving or casting the model drops it (`LlamaForCausalLM._apply`)."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        self.packed = ops.pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return backend_for(x.device).linear(x, self.weight, self.bias, self.packed)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `norm(x + residual)` (the layer's input norm; `x` alone in the first layer),
        projected to q/k/v by `qkv_proj` -> (`[T, hidden]`, the stream `x + residual`)."""
        cfg, t = self.cfg, x.shape[0]
        out, residual = paged_attention(self.layer, x, residual, norm, self.qkv_proj, cfg.num_heads, self.scale,
                                        cos, sin)  # [T, H, D]
        return self.o_proj(out.reshape(t, cfg.q_size)), residual


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`gate_up` `[T, 2I]` (gate, then up), the output of `gate_up_proj` (which the layer runs, fused
        with the norm before it) -> `[T, hidden]`."""
        down = self.down_proj  # silu(gate) * up [T, I] -> [T, hidden], one op (fused on GPU at one row)
        return backend_for(gate_up.device).silu_and_mul_linear(gate_up, down.weight, down.packed)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is `x + residual` (just `x` before the first layer): each add is fused
        into the norm that follows it, and each norm into the projection that follows it. Returns the
        new (x, residual)."""
        h, residual = self.self_attn(x, residual, self.input_layernorm, cos, sin)  # [T, hidden]
        gate_up, residual = self.post_attention_layernorm.project(self.mlp.gate_up_proj, h, residual)  # [T, 2I]
        return self.mlp(gate_up), residual


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden [T, hidden]; compute_logits(hidden) -> [N, vocab].

    `inv_freq` (RoPE frequencies `[head_dim // 2]`) is float32 whatever the model's dtype; `cos_sin`
    (`[2, max_position_embeddings, head_dim // 2]`: `ops.rope_cos_sin` of every position, in the
    model's dtype) holds the rotations a step gathers for its positions, in one gather.

    Must run inside `forward_context` (the step's attention metadata and the arena tensors).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", self._rope_inv_freq(torch.device("cpu")), persistent=False)
        self.register_buffer("cos_sin", self._rope_cos_sin(), persistent=False)

    def _rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        cfg = self.cfg
        return ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device, torch.float32)

    def _rope_cos_sin(self) -> torch.Tensor:
        positions = torch.arange(self.cfg.max_position_embeddings, device=self.inv_freq.device)
        return torch.stack(ops.rope_cos_sin(positions, self.inv_freq, self.embed_tokens.weight.dtype))

    def _apply(self, fn, recurse=True):
        """`to`, `cuda`, `half`, `bfloat16`... all come through here. Parameters take the new dtype, but
        `inv_freq` stays float32 (on the new device), re-derived from the config so a trip through a
        low-precision dtype loses nothing: in bf16 the RoPE angle at position 1000 would be off by
        ~1 rad; `cos_sin` is recomputed from it in the new dtype."""
        super()._apply(fn, recurse)
        self.inv_freq = self._rope_inv_freq(self.inv_freq.device)
        self.cos_sin = self._rope_cos_sin()
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = None  # a copy of the old weight
        return self

    def pack_linears(self) -> int:
        """Pack every projection's weight for the CPU's fast path (ops/linear.py), once the weights are
        final; returns how many were packed (0 off the CPU or in another dtype than float32)."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and ops.can_pack(m.weight)]
        for module in linears:
            module.pack()
        return len(linears)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Hidden states after the final norm; with `num_layers`, the residual stream after only the
        first `num_layers` layers (their K/V written as usual), for probes."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.cos_sin.index_select(1, positions)  # [T, D/2] each, contiguous
        residual = None
        for layer in self.layers[:num_layers]:
            x, residual = layer(x, residual, cos, sin)
        if num_layers is not None:
            return x + residual
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits `[N, vocab]` of `hidden` `[N, hidden]`: float32, or in the model's dtype (a CUDA
        graph's output, cast only when a step needs the logits themselves)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up; every parameter must be covered."""
        cfg, w = self.cfg, dict(weights)
        own = {}
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            if cfg.attention_bias:
                own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                    [w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])
        for name in list(w):
            if name.startswith("model."):
                own[name.removeprefix("model.")] = w.pop(name)
        if "lm_head.weight" in w:
            head = w.pop("lm_head.weight")
            if not cfg.tie_word_embeddings:
                own["lm_head.weight"] = head
        if w:
            raise ValueError(f"unexpected weights for {cfg.architecture}: {sorted(w)[:5]}")
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(own) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
        if missing:
            raise ValueError(f"checkpoint lacks weights: {missing[:5]}")
        with torch.no_grad():
            for name, tensor in own.items():
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the config expects {tuple(params[name].shape)}")
                params[name].copy_(tensor)
