"""Quantized KV pages, torch reference: the formats, their layout in the arena, and quantizing /
dequantizing rows and blocks.

A quantized layer keeps two tensors per K and V, both indexed by block id first, so block tables,
ref counts and block copies work on them unchanged:

    data   [num_blocks, block_size, kv_heads, data_dim]   int8 | uint8 (two int4 per byte) | float8
    scale  [num_blocks, ...]                               float16, the format's scales (below)

Formats (`kv_cache_dtype`):

- "auto": no quantization; the pages hold the model's dtype and there is no scale tensor.
- "int8": symmetric per token and KV head: scale [nb, bs, kv_heads] = absmax / 127; x = q * scale.
- "fp8_e4m3", "fp8_e5m2": torch's float8 values, scaled per token and KV head: scale
  [nb, bs, kv_heads] = absmax / (the format's largest finite value), at least float16's smallest
  normal number, so no value overflows, no small row flushes to zero, and no calibration is needed (uncalibrated static scales are what collapses fp8 accuracy elsewhere).
- "int4": two values per byte, channel 2j in the low nibble of byte j and 2j + 1 in the high one.
  Keys per channel (KIVI): each block keeps, per KV head and channel, a minimum and a step
  (k_scale [nb, 3, kv_heads, head_dim]: row 0 the minimum, row 1 the step; x = min + q * step,
  q in 0..15), because key channels differ in range and offset far more than tokens do (per-token
  int4 keys cost SmolLM2-135M 24% perplexity; per channel, 0.5%). A partly filled block is
  quantized over the tokens it holds; when a later token widens a channel's range, that block's
  earlier codes are re-quantized to the new step (exact when the range does not change, so a
  block filled by one prefill is quantized once, from full-precision values).
  The block's first key is kept whole, in float16, in row 2 of k_scale, and the minimum and step
  cover the block's other keys only: a sequence's first token is its attention sink, whose key
  has outlier channels that would stretch the first block's ranges and whose error every query
  feels (KVQuant keeps it whole too). Every block keeps its first key, so a block's layout never
  depends on where it sits in a sequence (prefix caching, chunk pages).
  Keys are stored *before* RoPE (KVQuant): RoPE turns each channel pair of a key around a circle
  as the position grows, so post-RoPE channels sweep their whole circle within a block, while
  pre-RoPE channels keep their own, narrower range. Every reader rotates a key to its position as
  it dequantizes it, with the cos and sin of a `rope_table` (`rope_keys`; the Triton kernels look
  them up the same way).
  Values per token, of the value rotated by a normalized Hadamard matrix (`hadamard_transform`,
  QuaRot): the rotation spreads a row's outlier channels over all of them, so its channels look
  like samples of one normal distribution. The matrix is symmetric and orthogonal, so attention
  over rotated values is the rotated attention output, and the attention layer rotates that
  output back (model/attention.py). Each rotated row is stored as the nearest of 16 levels times
  v_scale [nb, bs, kv_heads] = the row's absmax: the levels (`INT4_VALUE_LEVELS`) are the
  Lloyd-Max quantizer of a normal variable (Max, 1960), scaled so the outermost is 1, denser near
  0 where most of a normal row's channels lie (on SmolLM2-135M, 22% less KL to the unquantized
  cache than 15 evenly spaced levels from -absmax to absmax).

Every dequantized value is computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvforge.config import KV_CACHE_DTYPES as KV_FORMATS
from kvforge.ops.rope import apply_rope

SCALE_DTYPE = torch.float16
ROTATED_FORMATS = ("int4",)  # keys stored before RoPE, values rotated by `hadamard_transform`
_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_INT8_MAX = 127.0
_INT4_LEVELS = 15.0  # asymmetric int4 (keys): codes 0..15
# int4 values: the positive levels of the 16-level Lloyd-Max quantizer of a standard normal
# variable (0.1284 .. 2.7326) over its outermost one. Code 8 + i is level i, code 7 - i minus level
# i; the nearest level of |y| is the count of INT4_VALUE_BOUNDS (midpoints) below it.
INT4_VALUE_LEVELS = (0.046989, 0.142026, 0.240357, 0.344873, 0.459709, 0.592147, 0.757154, 1.0)
INT4_VALUE_BOUNDS = tuple((a + b) / 2 for a, b in zip(INT4_VALUE_LEVELS, INT4_VALUE_LEVELS[1:]))
_INT4_VALUE_BOUNDS = torch.tensor(INT4_VALUE_BOUNDS)
_INT4_VALUE_CODEBOOK = torch.tensor([-x for x in reversed(INT4_VALUE_LEVELS)] + list(INT4_VALUE_LEVELS))  # by code
_INT4_VALUE_PAIRS = _INT4_VALUE_CODEBOOK[torch.stack((torch.arange(256) & 0x0F, torch.arange(256) >> 4), -1)]  # by byte
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # by bit pattern


@dataclass(frozen=True)
class KVLayout:
    """How one layer's K and V pages of a format are laid out (see the module docstring)."""

    format: str
    data_dtype: torch.dtype
    data_dim: int  # elements per (token, KV head) in the data tensor
    k_scale_shape: tuple[int, ...] | None  # per block (after num_blocks); None: no scale tensor
    v_scale_shape: tuple[int, ...] | None

    @property
    def quantized(self) -> bool:
        return self.format != "auto"

    @property
    def rotated(self) -> bool:
        """Keys stored before RoPE and values rotated by `hadamard_transform` (int4; see the module
        docstring)."""
        return self.format in ROTATED_FORMATS

    @property
    def page_name(self) -> str:
        """What the pages hold, for cache keys and persisted blocks: the format, with its rotations
        ("int4+prerope+firstkey+hadamard+lloydmax"), so blocks stored by a build that laid int4 out
        otherwise never match."""
        return f"{self.format}+prerope+firstkey+hadamard+lloydmax" if self.rotated else self.format

    def bytes_per_block(self, block_size: int, num_kv_heads: int) -> int:
        """K and V of one block of one layer, scales included."""
        data = 2 * block_size * num_kv_heads * self.data_dim * self.data_dtype.itemsize
        scales = sum(_numel(s) for s in (self.k_scale_shape, self.v_scale_shape) if s is not None)
        return data + scales * SCALE_DTYPE.itemsize

    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Zeroed (k, v, k_scale, v_scale) of one layer; the scales are None for "auto"."""
        shape = (num_blocks, block_size, num_kv_heads, self.data_dim)
        k, v = (torch.zeros(shape, dtype=self.data_dtype, device=device) for _ in range(2))
        k_scale = v_scale = None
        if self.k_scale_shape is not None:
            k_scale = torch.zeros((num_blocks, *self.k_scale_shape), dtype=SCALE_DTYPE, device=device)
            v_scale = torch.zeros((num_blocks, *self.v_scale_shape), dtype=SCALE_DTYPE, device=device)
        return k, v, k_scale, v_scale


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_kv_format(kv_format: str) -> str:
    """`kv_format` if it names a format, else ValueError listing the valid ones."""
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_FORMATS)}; got {kv_format!r}")
    return kv_format


def kv_layout(kv_format: str, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> KVLayout:
    """The layout of `kv_format` for one layer (`dtype`: the model's, used by "auto")."""
    check_kv_format(kv_format)
    per_token = (block_size, num_kv_heads)
    if kv_format == "auto":
        return KVLayout(kv_format, dtype, head_dim, None, None)
    if kv_format == "int8":
        return KVLayout(kv_format, torch.int8, head_dim, per_token, per_token)
    if kv_format == "int4":
        if head_dim < 2 or head_dim & (head_dim - 1):
            raise ValueError(f"kv_cache_dtype int4 packs two channels per byte and rotates values by a Hadamard "
                             f"matrix: head_dim must be a power of 2, got {head_dim}")
        return KVLayout(kv_format, torch.uint8, head_dim // 2, (3, num_kv_heads, head_dim), per_token)
    return KVLayout(kv_format, _FP8[kv_format], head_dim, per_token, per_token)


def format_of(data: torch.Tensor, scale: torch.Tensor | None) -> str:
    """The format a page tensor holds, read from its dtype and its scale tensor ("auto" without one)."""
    if scale is None:
        return "auto"
    if data.dtype == torch.int8:
        return "int8"
    if data.dtype == torch.uint8:
        return "int4"
    for name, dt in _FP8.items():
        if data.dtype == dt:
            return name
    raise ValueError(f"no KV format stores pages of {data.dtype} with a scale tensor")


# -------------------------------------------------------------------------------- rows

def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """`[..., D]` integer codes in 0..15 -> `[..., D // 2]` uint8, channel 2j low, 2j + 1 high."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`[..., D // 2]` uint8 -> `[..., D]` float32 codes in 0..15."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2).float()


def quantize_rows(x: torch.Tensor, kv_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of `x` `[T, kv_heads, D]`: (data `[T, kv_heads, data_dim]`,
    scale `[T, kv_heads]` float16). For int8, fp8 and int4 values; int4 keys are per block
    (`store_kv` in ops/kv.py)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    if kv_format == "int8":
        qmax = _INT8_MAX
    elif kv_format == "int4":
        qmax = 1.0  # the outermost codebook level
    else:
        qmax = torch.finfo(_FP8[kv_format]).max
    scale = absmax / qmax
    if kv_format in _FP8:  # keep the scale a normal float16, so it never flushes a small row to 0
        scale = scale.clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    scale = scale.to(SCALE_DTYPE)
    s = scale.float()[..., None]
    y = torch.where(s > 0, xf / s, torch.zeros_like(xf))
    if kv_format == "int8":
        return y.round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale
    if kv_format == "int4":
        return _pack_int4(_int4_value_codes(y)), scale
    return y.clamp_(-qmax, qmax).to(_FP8[kv_format]), scale


def _int4_value_codes(y: torch.Tensor) -> torch.Tensor:
    """The codes (0..15, int64) of the nearest `INT4_VALUE_LEVELS` level to each element of `y`
    (float32, in units of the row's absmax); 0 maps to the smallest negative level."""
    size = torch.bucketize(y.abs(), _INT4_VALUE_BOUNDS.to(y.device))  # how many bounds lie below
    return torch.where(y > 0, 8 + size, 7 - size)


def dequantize_rows(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_rows`: data `[..., kv_heads, data_dim]`, scale `[..., kv_heads]` ->
    float32 `[..., kv_heads, D]`."""
    if data.dtype == torch.uint8:
        values = _INT4_VALUE_PAIRS.to(data.device)[data.long()].flatten(-2)  # both codes of a byte at once
    elif data.dtype == torch.float8_e4m3fn and data.device.type == "cpu":
        # A 256-entry table: torch's CPU float8_e4m3fn -> float32 conversion is ~3x slower.
        values = torch.take(_E4M3_VALUES, data.view(torch.uint8).long())
    else:
        values = data.float()
    return values * scale.float()[..., None]


# -------------------------------------------------------------------------------- int4 key blocks

def quantize_channels(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel asymmetric int4 of whole blocks `x` `[n, block_size, kv_heads, D]` (float32)
    over the positions where `valid` `[n, block_size]` is True: (packed codes
    `[n, block_size, kv_heads, D // 2]`, scale `[n, 3, kv_heads, D]` float16: minimum, step, the
    first key). The first position is kept whole in the scale, outside the minimum and step; it
    and the invalid positions get code 0."""
    ranged = valid.clone()
    ranged[:, 0] = False
    mask = ranged[:, :, None, None]
    lo = torch.where(mask, x, torch.full_like(x, float("inf"))).amin(dim=1)  # [n, H, D]
    hi = torch.where(mask, x, torch.full_like(x, float("-inf"))).amax(dim=1)
    empty = ~ranged.any(dim=1)[:, None, None]
    lo = torch.where(empty, torch.zeros_like(lo), lo).to(SCALE_DTYPE)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    step = ((hi - lo.float()) / _INT4_LEVELS).to(SCALE_DTYPE)
    s = step.float()[:, None]
    y = torch.where(s > 0, (x - lo.float()[:, None]) / s, torch.zeros_like(x))
    codes = torch.where(mask, y.round_().clamp_(0, _INT4_LEVELS), torch.zeros_like(y))
    first = torch.where(valid[:, 0, None, None], x[:, 0], torch.zeros_like(x[:, 0])).to(SCALE_DTYPE)
    return _pack_int4(codes), torch.stack((lo, step, first), dim=1)


def dequantize_channels(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_channels`: data `[n, block_size, kv_heads, D // 2]`, scale
    `[n, 3, kv_heads, D]` -> float32 `[n, block_size, kv_heads, D]`."""
    s = scale.float()
    x = _unpack_int4(data) * s[:, 1:2] + s[:, 0:1]
    x[:, 0] = s[:, 2]
    return x


# -------------------------------------------------------------------------------- int4 rotations

def keys_before_rope(scale: torch.Tensor | None) -> bool:
    """Whether pages with this scale tensor hold keys before RoPE: int4 keys, whose scales are per
    block and channel `[nb, 3, kv_heads, D]`."""
    return scale is not None and scale.dim() == 4


_HADAMARD: dict[tuple[int, torch.device], torch.Tensor] = {}  # (dim, device) -> hadamard_matrix


def hadamard_matrix(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix `[dim, dim]` float32 on `device` (dim a power of 2;
    built once per dim and device, shared: never modify it). Symmetric and orthogonal, so it is its
    own inverse."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard transform needs a power-of-2 last dimension, got {dim}")
    key = (dim, torch.device(device))
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
        _HADAMARD[key] = (h / math.sqrt(dim)).to(key[1])
    return _HADAMARD[key]


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """`x` `[..., D]` (D a power of 2) times `hadamard_matrix(D)`: a new float32 tensor, one matrix
    product (a fast Walsh-Hadamard transform in elementwise operations launched 19 kernels where
    this launches one, 38 per layer and step with the inverse, which cost a CUDA-graph decode step
    on the H200 more than its attention)."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


def rope_keys(k: torch.Tensor, rope_table: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Keys `[..., L, kv_heads, D]` stored before RoPE, rotated to positions start .. start + L - 1
    with the rows of `rope_table` (`kvforge.ops.rope.rope_table`): a new float32 tensor. Positions
    past the table's rows (padding past every sequence) are left unrotated."""
    length, half = k.shape[-3], k.shape[-1] // 2
    rows = rope_table[start:start + length].to(k.device)
    if rows.shape[0] < length:
        identity = torch.cat((torch.ones(length - rows.shape[0], half), torch.zeros(length - rows.shape[0], half)), -1)
        rows = torch.cat((rows, identity.to(rows.device)))
    return apply_rope(k.float(), rows[:, :half], rows[:, half:])


# -------------------------------------------------------------------------------- blocks

def dequantize_blocks(data: torch.Tensor, scale: torch.Tensor | None, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks `block_ids` `[n]` of one layer's K or V pages, dequantized: `[n, block_size, kv_heads, D]`
    float32 (a copy; "auto" pages are returned in their own dtype)."""
    if scale is None:
        return data.index_select(0, block_ids)
    blocks = data.view(torch.uint8).index_select(0, block_ids).view(data.dtype)  # no float8 index_select on CPU
    s = scale.index_select(0, block_ids)
    if keys_before_rope(s):  # int4 keys: per block and channel
        return dequantize_channels(blocks, s)
    return dequantize_rows(blocks, s)
