"""How one KV block is stored in a tier: a self-checking record, kept apart from transport.

    | bytes             | content                                                          |
    | [0, 4)            | magic b"KVFB"                                                    |
    | [4, 6)            | format version, uint16 little-endian                             |
    | [6, 10)           | header length h, uint32 little-endian                            |
    | [10, 10+h)        | header, UTF-8 JSON: fingerprint, kv_format, block_size,          |
    |                   | num_layers, block_bytes, num_tokens                              |
    | then 4 x tokens   | the block's token ids, uint32 little-endian                      |
    | then block_bytes  | the block's K/V bytes as `KVCache.export_blocks` lays them out   |
    | last 4            | zlib.crc32 of everything before it                               |

A record is loaded only when everything matches the reader's `BlockFormat` and the token ids it
expects: any difference (version, model fingerprint, KV format, block size, layer count, tokens,
checksum, a truncated or foreign record) is a `BlockRejected` naming the reason, never data. The
key a record is stored under (the chained block hash, `hashing.py`) is the transport's business.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kvforge.cache.hashing import pack_tokens

MAGIC = b"KVFB"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
REJECT_REASONS = ("truncated", "magic", "version", "checksum", "header", "fingerprint", "format", "shape", "tokens")


@dataclass(frozen=True)
class BlockFormat:
    """What a stored block must match to be loaded into an arena: the weights that computed it
    (`fingerprint`), what its pages hold (`kv_format`, as `LLMEngine.kv_format_name`: "float32",
    "int8/bfloat16", ...), and the arena's `block_size`, `num_layers` and `block_bytes` (bytes of
    one block over all layers, `KVCache.bytes_per_block`)."""

    fingerprint: str
    kv_format: str
    block_size: int
    num_layers: int
    block_bytes: int

    def __post_init__(self) -> None:
        for name in ("block_size", "num_layers", "block_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockFormat.{name} must be positive, got {getattr(self, name)}")


class BlockRejected(ValueError):
    """A stored record that must not be loaded; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"stored KV block rejected ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DecodedBlock:
    token_ids: tuple[int, ...]
    payload: memoryview  # block_bytes bytes, a view into the record


def encode_block(fmt: BlockFormat, token_ids: Sequence[int], payload) -> bytes:
    """One record for a block of `token_ids` (1..block_size of them) whose K/V bytes are `payload`
    (any buffer of `fmt.block_bytes` bytes). Pure."""
    payload = memoryview(payload).cast("B")
    if len(payload) != fmt.block_bytes:
        raise ValueError(f"a block's payload is {fmt.block_bytes} bytes, got {len(payload)}")
    if not 0 < len(token_ids) <= fmt.block_size:
        raise ValueError(f"a block holds 1 to {fmt.block_size} tokens, got {len(token_ids)}")
    header = json.dumps({**asdict(fmt), "num_tokens": len(token_ids)}, sort_keys=True).encode()
    tokens = pack_tokens(token_ids)
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + tokens
    out = bytearray(len(head) + len(payload) + _CRC.size)
    out[:len(head)] = head
    out[len(head):len(head) + len(payload)] = payload
    end = len(out) - _CRC.size
    out[end:] = _CRC.pack(zlib.crc32(memoryview(out)[:end]))
    return bytes(out)


def decode_block(fmt: BlockFormat, record, token_ids: Sequence[int] | None = None,
                 verify_checksum: bool = True) -> DecodedBlock:
    """The block in `record` (bytes-like), checked against `fmt` and, when given, the `token_ids` the
    reader expects. Raises BlockRejected naming the first mismatch. Pure; the payload is a view.
    `verify_checksum=False` skips the crc32 (a third of the cost), for records that never left this
    process's memory (`Tier.in_process`); every other check still applies."""
    data = memoryview(record).cast("B")
    if len(data) < _PREFIX.size + _CRC.size:
        raise BlockRejected("truncated", f"{len(data)} bytes is shorter than any record")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BlockRejected("magic", f"not a kvforge block record (starts {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise BlockRejected("version", f"record format version {version}, this kvforge reads {FORMAT_VERSION}")
    end = len(data) - _CRC.size
    if _PREFIX.size + header_len > end:
        raise BlockRejected("truncated", f"the header of {header_len} bytes runs past the record's end")
    if verify_checksum and _CRC.unpack_from(data, end)[0] != zlib.crc32(data[:end]):
        raise BlockRejected("checksum", "the crc32 does not match the record's bytes (damaged or truncated)")
    try:
        header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + header_len]))
        num_tokens = int(header["num_tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise BlockRejected("header", f"unreadable header ({e})") from None
    body = _PREFIX.size + header_len + 4 * num_tokens
    if body + fmt.block_bytes != end:
        reason = "truncated" if body + int(header.get("block_bytes", 0)) > end else "shape"
        raise BlockRejected(reason, f"{len(data)} bytes do not hold {num_tokens} tokens and "
                                    f"{fmt.block_bytes} payload bytes")
    for name, reason in (("fingerprint", "fingerprint"), ("kv_format", "format"), ("block_size", "shape"),
                         ("num_layers", "shape"), ("block_bytes", "shape")):
        if header.get(name) != getattr(fmt, name):
            raise BlockRejected(reason, f"{name} {header.get(name)!r}, expected {getattr(fmt, name)!r}")
    tokens = tuple(struct.unpack_from(f"<{num_tokens}I", data, _PREFIX.size + header_len))
    if token_ids is not None and tokens != tuple(token_ids):
        raise BlockRejected("tokens", "the stored token ids differ from the ones looked up")
    return DecodedBlock(tokens, data[body:end])


def stack_payloads(payloads: Sequence, block_bytes: int, pin_memory: bool = False) -> torch.Tensor:
    """Decoded payloads as the uint8 rows `[len(payloads), block_bytes]` that `KVCache.import_blocks`
    takes (one copy; in pinned memory when asked, for an asynchronous copy to a GPU)."""
    staging = torch.empty((len(payloads), block_bytes), dtype=torch.uint8, pin_memory=pin_memory)
    rows = staging.numpy()
    for i, payload in enumerate(payloads):
        rows[i] = memoryview(payload)
    return staging
