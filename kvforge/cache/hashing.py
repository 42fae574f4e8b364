"""Chained block hashes over bytes: stable across processes and restarts (sha256, never `hash()`).

A full block is named by the hash of its parent's hash, its token ids and the extra keys (model
fingerprint, KV dtype, cache salt...), so equal digests mean "the same tokens after the same prefix
under the same model and salt". The byte encoding is canonical and self-delimiting:

    | bytes       | content                                               |
    | [0, 32)     | parent digest, or 32 zero bytes for the first block   |
    | [32, 36)    | number of token ids n, uint32 little-endian           |
    | [36, 36+4n) | token ids, uint32 little-endian                       |
    | [36+4n, ..) | extra (use `extra_keys` to build it)                  |

A digest is a name, not a proof: the prefix index compares the stored token ids on every hit, so a
collision can cost a cache miss but never serve wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

HASH_BYTES = 32  # sha256 digest size
_ROOT_PARENT = bytes(HASH_BYTES)
# The array typecode of a native uint32 ('I' on every mainstream platform): `array(U32, ids)` converts a
# list of ids in one C pass that refuses anything outside [0, 2**32).
U32 = next(code for code in "IL" if array(code).itemsize == 4)
_SWAP = sys.byteorder == "big"
_sha256 = hashlib.sha256
_pack_len = struct.Struct("<I").pack


def pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes. Raises ValueError for an id outside [0, 2**32)."""
    try:
        packed = array(U32, token_ids)
    except OverflowError:
        bad = next(t for t in token_ids if not 0 <= t < 1 << 32)
        raise ValueError(f"token id {bad} cannot be hashed: token ids must be in [0, 2**32)") from None
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """The 32-byte sha256 digest naming a block of `token_ids` after the block hashed `parent`
    (None for the first block of a sequence), under `extra` (see `extra_keys`). Pure.

    Raises ValueError if `parent` is not a 32-byte digest or a token id is outside [0, 2**32).
    """
    if parent is None:
        parent = _ROOT_PARENT
    elif len(parent) != HASH_BYTES:
        raise ValueError(f"parent must be a {HASH_BYTES}-byte block hash or None, got {len(parent)} bytes")
    h = _sha256(parent)
    h.update(_pack_len(len(token_ids)))
    h.update(pack_tokens(token_ids))
    h.update(extra)
    return h.digest()


def extra_keys(*parts: str | bytes | None) -> bytes:
    """Canonical bytes for the keys that change the meaning of KV besides the tokens, in order
    (e.g. `extra_keys(model_fingerprint, kv_dtype, cache_salt)`). Each part is tagged and
    length-prefixed, so no two different part lists encode alike: None, "" and b"" all differ.
    Pure. Raises ValueError for a part of another type.
    """
    out = bytearray()
    for part in parts:
        if part is None:
            out += b"\x00"
        elif isinstance(part, str):
            data = part.encode("utf-8")
            out += b"\x01" + _pack_len(len(data)) + data
        elif isinstance(part, (bytes, bytearray, memoryview)):
            data = bytes(part)
            out += b"\x02" + _pack_len(len(data)) + data
        else:
            raise ValueError(f"extra key parts must be str, bytes or None, got {type(part).__name__}: {part!r}")
    return bytes(out)
