"""Block hashes: a canonical byte encoding under sha256, stable across processes, sensitive to every key."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from kvforge.cache import extra_keys, hash_block

# sha256(32 zero bytes | uint32le 4 | 1, 2, 3, 4 as uint32le): written down once, must never change.
FIRST_BLOCK_1234 = "9e06c154a73385c822297c663f56926cfb4c339cf3e78949b2db9524c2662bf7"


def test_a_first_block_hashes_to_a_fixed_sha256_of_its_canonical_bytes():
    assert hash_block(None, [1, 2, 3, 4]).hex() == FIRST_BLOCK_1234
    by_hand = hashlib.sha256(bytes(32) + struct.pack("<I", 4) + struct.pack("<4I", 1, 2, 3, 4) + b"salt").digest()
    assert hash_block(None, (1, 2, 3, 4), b"salt") == by_hand


def test_the_hash_is_the_same_in_another_process_with_another_hash_seed():
    code = "from kvforge.cache import hash_block; print(hash_block(None, [1, 2, 3, 4]).hex())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == FIRST_BLOCK_1234


def test_the_chain_parent_tokens_and_extra_keys_all_change_the_hash():
    root = hash_block(None, [1, 2, 3, 4])
    child = hash_block(root, [5, 6, 7, 8])
    assert len(root) == len(child) == 32
    assert hash_block(root, [5, 6, 7, 8]) == child  # deterministic
    assert hash_block(None, [5, 6, 7, 8]) != child  # same tokens, no parent
    assert hash_block(hash_block(None, [1, 2, 3, 5]), [5, 6, 7, 8]) != child  # a different prefix
    assert hash_block(root, [5, 6, 8, 7]) != child  # order matters
    assert hash_block(root, [5, 6, 7, 8], extra_keys("salt")) != child


def test_the_token_count_is_encoded_so_tokens_and_extra_cannot_trade_bytes():
    # Without the count, [1] + extra b"\x02\x00\x00\x00" would be the same bytes as [1, 2] + b"".
    assert hash_block(None, [1], struct.pack("<I", 2)) != hash_block(None, [1, 2])


def test_extra_keys_are_tagged_and_length_prefixed():
    assert extra_keys(None) != extra_keys("") != extra_keys(b"")
    assert extra_keys(None) != extra_keys()
    assert extra_keys("ab", "c") != extra_keys("a", "bc") != extra_keys("abc")
    assert extra_keys("model", "bf16", None) != extra_keys("model", "bf16", "tenant-a")
    assert extra_keys("é") == b"\x01" + struct.pack("<I", 2) + "é".encode()
    assert extra_keys(b"\x00") == b"\x02\x01\x00\x00\x00\x00"


@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_a_token_id_outside_uint32_is_refused(bad):
    with pytest.raises(ValueError, match=rf"token id {bad} cannot be hashed: token ids must be in \[0, 2\*\*32\)"):
        hash_block(None, [1, bad])


def test_a_parent_that_is_not_a_digest_is_refused():
    with pytest.raises(ValueError, match="parent must be a 32-byte block hash or None, got 3 bytes"):
        hash_block(b"abc", [1])


def test_extra_key_parts_of_other_types_are_refused():
    with pytest.raises(ValueError, match="extra key parts must be str, bytes or None, got int"):
        extra_keys("model", 3)
