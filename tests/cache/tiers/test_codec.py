"""The stored block record: a round trip, and every mismatch refused with its reason."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from kvforge.cache.tiers.codec import FORMAT_VERSION, BlockFormat, BlockRejected, decode_block, encode_block

FMT = BlockFormat("model-a", "float32", 4, 2, 96)
TOKENS = (5, 6, 7, 8)
PAYLOAD = os.urandom(96)


def reason(record: bytes, fmt: BlockFormat = FMT, tokens=TOKENS) -> str:
    with pytest.raises(BlockRejected) as e:
        decode_block(fmt, record, tokens)
    return e.value.reason


def test_a_record_round_trips_its_tokens_and_payload():
    block = decode_block(FMT, encode_block(FMT, TOKENS, PAYLOAD), TOKENS)
    assert block.token_ids == TOKENS and bytes(block.payload) == PAYLOAD
    partial = decode_block(FMT, encode_block(FMT, (9,), PAYLOAD))  # a chunk's last block may be partial
    assert partial.token_ids == (9,)


@pytest.mark.parametrize("field, value, expected", [
    ("fingerprint", "model-b", "fingerprint"), ("kv_format", "int8/float32", "format"),
    ("block_size", 8, "shape"), ("num_layers", 3, "shape")])
def test_a_record_of_another_model_format_or_shape_is_rejected(field, value, expected):
    other = dataclasses.replace(FMT, **{field: value})
    assert reason(encode_block(other, TOKENS, PAYLOAD)) == expected


def test_other_tokens_a_flipped_byte_a_truncation_and_foreign_bytes_are_rejected():
    record = encode_block(FMT, TOKENS, PAYLOAD)
    assert reason(record, tokens=(5, 6, 7, 9)) == "tokens"
    flipped = bytearray(record)
    flipped[len(record) // 2] ^= 1
    assert reason(bytes(flipped)) == "checksum"
    assert reason(record[:-10]) == "checksum"  # a cut record no longer matches its checksum
    assert reason(record[:5]) == "truncated"
    assert reason(b"PNG\x00" + record[4:]) == "magic"
    newer = record[:4] + struct.pack("<H", FORMAT_VERSION + 1) + record[6:]
    assert reason(newer) == "version"


def test_encoding_validates_its_inputs():
    with pytest.raises(ValueError, match="payload"):
        encode_block(FMT, TOKENS, PAYLOAD[:-1])
    with pytest.raises(ValueError, match="tokens"):
        encode_block(FMT, tuple(range(5)), PAYLOAD)


def test_an_in_process_reader_may_skip_only_the_checksum():
    record = encode_block(FMT, TOKENS, PAYLOAD)
    assert bytes(decode_block(FMT, record, TOKENS, verify_checksum=False).payload) == PAYLOAD
    with pytest.raises(BlockRejected, match="tokens"):
        decode_block(FMT, record, (1, 2, 3, 4), verify_checksum=False)
    with pytest.raises(BlockRejected, match="fingerprint"):
        decode_block(dataclasses.replace(FMT, fingerprint="model-b"), record, TOKENS, verify_checksum=False)
