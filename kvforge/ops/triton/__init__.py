"""Triton GPU kernels, each with a torch reference of the same signature in `kvforge.ops`.

Importing this package imports triton: only the GPU path does, the CPU path never does. On a
machine without a GPU the kernels run on CPU tensors under `TRITON_INTERPRET=1` (set before this
package is first imported), which the tests use.
"""

from kvforge.ops.triton.attention import choose_num_splits, paged_attention, rope_store_kv, store_kv
from kvforge.ops.triton.cascade import chunk_attention, merge_attention_states, segment_attention
from kvforge.ops.triton.gemv import linear, qkv_rope_store_kv, rms_norm_linear, silu_and_mul_linear
from kvforge.ops.triton.norm import add_rms_norm, rms_norm, silu_and_mul
from kvforge.ops.triton.rope import apply_rope
from kvforge.ops.triton.sample import greedy_tokens

__all__ = ["add_rms_norm", "apply_rope", "choose_num_splits", "chunk_attention", "greedy_tokens", "linear",
           "merge_attention_states", "paged_attention", "qkv_rope_store_kv", "rms_norm", "rms_norm_linear",
           "rope_store_kv", "segment_attention", "silu_and_mul", "silu_and_mul_linear", "store_kv"]
