"""The KV arena: every layer's K and V tensors, allocated once and never resized.

Layout per layer, fixed because GPU kernels rely on it:

    k[layer], v[layer]: [num_blocks, block_size, num_kv_heads, data_dim]   (contiguous)
    k_scale[layer], v_scale[layer]: [num_blocks, ...] float16, or None   (quantized formats)

A flat slot is `block_id * block_size + offset`; viewing a layer as `[num_blocks * block_size,
num_kv_heads, data_dim]` makes slot `s` row `s`. With a quantized `kv_format` ("int8", "int4",
"fp8_e4m3", "fp8_e5m2"; see `kvforge.ops.quant`) the pages hold codes and the scale tensors, indexed
by the same block ids, hold their scales: block tables, ref counts, prefix caching and block copies
work on them unchanged. The arena holds numbers only: which blocks belong to which sequence is the
manager's business (`manager.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvforge import ops


class KVCache:
    """Per-layer K and V pages of shape `[num_blocks, block_size, num_kv_heads, data_dim]` (and
    their scales in a quantized `kv_format`), zero-initialised at construction (the only allocation
    this class ever makes). `dtype` is the model's: what "auto" pages hold and what attention
    computes in."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", kv_format: str = "auto"):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"KVCache {name} must be positive, got {value}")
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.layout = ops.kv_layout(kv_format, block_size, num_kv_heads, head_dim, dtype)
        self.kv_format = kv_format
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.k_scale: list[torch.Tensor | None] = []
        self.v_scale: list[torch.Tensor | None] = []
        for _ in range(num_layers):
            k, v, k_scale, v_scale = self.layout.allocate(num_blocks, block_size, num_kv_heads, self.device)
            self.k.append(k)
            self.v.append(v)
            self.k_scale.append(k_scale)
            self.v_scale.append(v_scale)

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    kv_format: str = "auto") -> int:
        """Bytes of one block's K and V (scales included) over all layers, so a pool can be sized
        from a memory budget before anything is allocated."""
        layout = ops.kv_layout(kv_format, block_size, num_kv_heads, head_dim, dtype)
        return num_layers * layout.bytes_per_block(block_size, num_kv_heads)

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block over all layers, scales included."""
        return self.num_layers * self.layout.bytes_per_block(self.block_size, self.num_kv_heads)

    @property
    def bytes_per_token(self) -> float:
        """K and V of one token slot over all layers (a block's scales shared out over its slots)."""
        return self.bytes_per_block / self.block_size

    @property
    def nbytes(self) -> int:
        """The whole arena."""
        return self.num_blocks * self.bytes_per_block

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor | Sequence[int]) -> None:
        """Write new `k`, `v` `[T, num_kv_heads, head_dim]` of `layer` into flat slots
        `slot_mapping` `[T]` (in place; moved to the arena's device and dtype).

        Slots come from `KVCacheManager.append`/`slot_mapping`; each must be in
        `[0, num_blocks * block_size)` (torch raises on one that is not). Slots must be distinct.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range for a cache of {self.num_layers} layers")
        slots = torch.as_tensor(slot_mapping, dtype=torch.long, device=self.device)
        expected = (slots.shape[0], self.num_kv_heads, self.head_dim) if slots.dim() == 1 else None
        if expected is None or tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"store needs slot_mapping [T] and k, v [T, {self.num_kv_heads}, {self.head_dim}]; "
                             f"got slot_mapping {list(slots.shape)}, k {list(k.shape)}, v {list(v.shape)}")
        ops.store_kv(k.to(self.device), v.to(self.device), self.k[layer], self.v[layer], slots,
                     self.k_scale[layer], self.v_scale[layer])


    def _parts(self) -> list[torch.Tensor]:
        """Every tensor indexed by block id, in the order a block's bytes are laid out: per layer K, V,
        then their scales (if any)."""
        return [t for parts in zip(self.k, self.v, self.k_scale, self.v_scale) for t in parts if t is not None]

    def export_blocks(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the blocks' bytes out of the arena: a uint8 tensor `[len(block_ids), bytes_per_block]`
        on the CPU (`out` if given, e.g. pinned memory), row i holding block `block_ids[i]` laid out as
        per layer K, V and their scales. The arena is not changed; on a GPU the copy is queued on the
        current stream (synchronize before reading `out` from another thread)."""
        n = len(block_ids)
        if out is None:
            out = torch.empty((n, self.bytes_per_block), dtype=torch.uint8)
        if tuple(out.shape) != (n, self.bytes_per_block) or out.dtype != torch.uint8:
            raise ValueError(f"export_blocks needs out [{n}, {self.bytes_per_block}] uint8, got "
                             f"{list(out.shape)} {out.dtype}")
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        at = 0
        for part in self._parts():
            rows = part.index_select(0, ids).view(n, -1).view(torch.uint8)
            out[:, at:at + rows.shape[1]].copy_(rows, non_blocking=True)
            at += rows.shape[1]
        assert at == self.bytes_per_block, (at, self.bytes_per_block)
        return out

    def import_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Write blocks' bytes (uint8 `[len(block_ids), bytes_per_block]`, as `export_blocks` lays them
        out; any device) into the arena at `block_ids` (distinct), every layer."""
        n = len(block_ids)
        if tuple(data.shape) != (n, self.bytes_per_block) or data.dtype != torch.uint8:
            raise ValueError(f"import_blocks needs data [{n}, {self.bytes_per_block}] uint8, got "
                             f"{list(data.shape)} {data.dtype}")
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        data = data.to(self.device, non_blocking=True)
        at = 0
        for part in self._parts():
            raw = part.view(torch.uint8)  # bytes, whatever the dtype (index_copy_ has no float8 kernel)
            size = raw[0].numel()
            raw.index_copy_(0, ids, data[:, at:at + size].reshape(n, *raw.shape[1:]))
            at += size

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s K/V into block `dst`, every layer (a fork's partial last block)."""
        if not (0 <= src < self.num_blocks and 0 <= dst < self.num_blocks):
            raise ValueError(f"blocks {src} -> {dst}: ids must be in [0, {self.num_blocks})")
        for cache in (*self.k, *self.v, *self.k_scale, *self.v_scale):
            if cache is not None:
                cache[dst].copy_(cache[src])

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, kv_format={self.kv_format}, "
                f"device={self.device}, nbytes={self.nbytes})")
