"""Pure tensor functions with no state: the torch reference of every op (CPU path and test oracle)."""

from kvforge.ops.attention import decode_attention, kv_bias_from_lengths, paged_attention, prefill_attention
from kvforge.ops.cascade import (
    attention_with_lse,
    attention_with_lse_reference,
    chunk_attention,
    chunk_keys,
    merge_attention_states,
    rerotate_keys,
)
from kvforge.ops.kv import gather_kv, gather_seq_kv, rope_store_kv, store_kv
from kvforge.ops.linear import can_pack, linear, pack_weight, silu_and_mul_linear
from kvforge.ops.quant import (
    INT4_VALUE_LEVELS,
    KV_FORMATS,
    ROTATED_FORMATS,
    KVLayout,
    check_kv_format,
    dequantize_blocks,
    dequantize_channels,
    dequantize_rows,
    format_of,
    hadamard_transform,
    kv_layout,
    quantize_channels,
    quantize_rows,
    rope_keys,
)
from kvforge.ops.norm import add_rms_norm, rms_norm, silu_and_mul
from kvforge.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq, rope_table

__all__ = [
    "can_pack",
    "linear",
    "pack_weight",
    "INT4_VALUE_LEVELS",
    "KV_FORMATS",
    "ROTATED_FORMATS",
    "KVLayout",
    "check_kv_format",
    "dequantize_blocks",
    "dequantize_channels",
    "dequantize_rows",
    "format_of",
    "hadamard_transform",
    "kv_layout",
    "quantize_channels",
    "quantize_rows",
    "rope_keys",
    "add_rms_norm",
    "apply_rope",
    "attention_with_lse",
    "attention_with_lse_reference",
    "chunk_attention",
    "chunk_keys",
    "decode_attention",
    "gather_kv",
    "gather_seq_kv",
    "kv_bias_from_lengths",
    "merge_attention_states",
    "paged_attention",
    "prefill_attention",
    "rerotate_keys",
    "rms_norm",
    "rope_store_kv",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_table",
    "silu_and_mul",
    "silu_and_mul_linear",
    "store_kv",
]
