"""Native CPU kernels (`kernels.cpp`): the CPU backend of the ops, each beside its torch reference in
`kvforge.ops` with the same signature.

Fused where the references take several passes or copies: RMSNorm with its residual add, SiLU-and-
mul, RoPE, the KV store (one pass, no host check for padding slots), and decode attention that reads
K/V in place from the paged arena (the reference gathers each sequence's blocks into a copy first).
They take float32; other dtypes and quantized pages go to the torch reference. Prefill attention,
and every other op of the backend, is the reference itself (PyTorch's CPU flash kernel measured
faster than a tiled C++ prefill kernel).

The C++ is compiled once per machine at first use (torch.utils.cpp_extension, cached under
`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions) for the vector ISA torch itself uses
here; `make setup` builds it ahead. `KVFORGE_CPU_KERNELS=0` turns it off (the references run); a
build that fails logs a warning once and the references run.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from kvforge import ops as reference
from kvforge.ops import (  # noqa: F401  (the rest of the backend is the reference)
    chunk_attention,
    gather_kv,
    gather_seq_kv,
    linear,
    merge_attention_states,
    paged_attention,
    prefill_attention,
    qkv_rope_store_kv,
    rope_store_kv,
)

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.cpp")
_ISA_FLAGS = {  # torch's CPU capability -> ATen's vector macros and the compiler's ISA flags
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}
_MAX_GROUP, _LANES = 16, 16  # decode_attention: query heads per KV head, and head_dim a multiple of this


def enabled() -> bool:
    """Whether the native kernels are wanted (`KVFORGE_CPU_KERNELS`, default on)."""
    return os.environ.get("KVFORGE_CPU_KERNELS", "1") not in ("0", "false", "no", "off")


def build() -> None:
    """Compile (or load the cached build of) the kernels into `torch.ops.kvforge_cpu`. Raises what the
    compiler raised."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    flags = _ISA_FLAGS.get(isa, ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"])
    cpp_extension.load(name=f"kvforge_cpu_{isa.lower()}", sources=[str(_SOURCE)],
                       extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)


@functools.cache
def available() -> bool:
    """True once the kernels are built and loaded; False when turned off or the build failed (logged)."""
    if not enabled():
        return False
    try:
        build()
    except Exception as exc:  # a missing compiler or headers: the references still serve, slower
        logger.warning("kvforge: native CPU kernels unavailable (%s); using the torch reference ops", exc)
        return False
    return True


def _native(*tensors: torch.Tensor) -> bool:
    """The kernels take these tensors: float32 on the CPU (checked per call, so cheaply)."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu:
            return False
    return available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`kvforge.ops.rms_norm`."""
    if _native(x, weight) and x.dim() == 2 and x.stride(-1) == 1:
        return torch.ops.kvforge_cpu.rms_norm(x, weight.contiguous(), eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.add_rms_norm`."""
    if _native(x, residual, weight) and x.dim() == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1:
        return torch.ops.kvforge_cpu.add_rms_norm(x, residual, weight.contiguous(), eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`kvforge.ops.silu_and_mul`."""
    if _native(x) and x.dim() == 2 and x.stride(-1) == 1:
        return torch.ops.kvforge_cpu.silu_and_mul(x)
    return reference.silu_and_mul(x)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`kvforge.ops.silu_and_mul_linear`, its activation native."""
    return linear(silu_and_mul(x), weight, None, packed)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None,
                    packed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`kvforge.ops.rms_norm_linear`, its norm native."""
    h, total = (rms_norm(x, norm_weight, eps), x) if residual is None else add_rms_norm(x, residual, norm_weight, eps)
    return linear(h, weight, bias, packed), total


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`kvforge.ops.apply_rope`."""
    if _native(x, cos, sin) and x.dim() == 3 and x.stride(-1) == 1:
        return torch.ops.kvforge_cpu.apply_rope(x, cos.contiguous(), sin.contiguous())
    return reference.apply_rope(x, cos, sin)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """`kvforge.ops.store_kv` (float32 pages in one pass; quantized pages: the reference)."""
    if (k_scale is None and _native(k, v, k_cache, v_cache) and k.dim() == 3 and k.stride(-1) == v.stride(-1) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        torch.ops.kvforge_cpu.store_kv(k, v, k_cache, v_cache, slot_mapping.long().contiguous())
        return
    reference.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     rope_table: torch.Tensor | None = None) -> torch.Tensor:
    """`kvforge.ops.decode_attention`, reading float32 pages in place (quantized pages: the reference)."""
    if (k_scale is None and _native(q, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.shape[1] // k_cache.shape[2] <= _MAX_GROUP and q.shape[2] % _LANES == 0):
        return torch.ops.kvforge_cpu.decode_attention(q, k_cache, v_cache, block_tables.long().contiguous(),
                                                      seq_lens.long().contiguous(), scale)
    return reference.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale, rope_table)

