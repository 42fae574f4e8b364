"""Pure tensor functions with no state: the torch reference of every op (CPU path and test oracle)."""

from kvforge.ops.attention import decode_attention, kv_bias_from_lengths, prefill_attention
from kvforge.ops.kv import gather_kv, store_kv
from kvforge.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = [
    "apply_rope",
    "decode_attention",
    "gather_kv",
    "kv_bias_from_lengths",
    "prefill_attention",
    "rope_cos_sin",
    "rope_inv_freq",
    "store_kv",
]
