"""The manager over tiers (no model): write-back on eviction, write-through, read-through into cached
blocks with the same bytes, rejected records, chunk pages, and saved caches (incremental, pins)."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge.cache import KVCache, KVCacheManager, extra_keys
from kvforge.cache.snapshot import SnapshotChunk
from kvforge.cache.tiered import chain
from kvforge.cache.tiers import DiskTier, HostTier
from kvforge.cache.tiers.codec import BlockFormat
from kvforge.cache.tiers.store import TieredStore

BS, BLOCKS = 4, 8
EXTRA = extra_keys("model", "float32", None)


def arena() -> KVCache:
    return KVCache(2, BLOCKS, BS, 2, 4)


def fmt_of(kv: KVCache) -> BlockFormat:
    return BlockFormat("model", "float32", BS, kv.num_layers, kv.bytes_per_block)


def make(tiers=None, policy="write_back"):
    kv = arena()
    store = None if tiers is None else TieredStore(kv, tiers, fmt_of(kv))
    return kv, KVCacheManager(BLOCKS, BS, store=store, write_policy=policy, max_chunk_fraction=0.5)


def run(kv: KVCache, m: KVCacheManager, seq_id: int, tokens: list[int]) -> None:
    """Register, append, write recognisable K/V (the token ids) into every slot, commit."""
    m.add_sequence(seq_id, len(tokens) + 1, extra=EXTRA)
    slots = m.append(seq_id, len(tokens))
    values = torch.tensor(tokens, dtype=torch.float32)[:, None, None].expand(-1, 2, 4)
    for layer in range(kv.num_layers):
        kv.store(layer, values, -values, slots)
    m.commit(seq_id, tokens)


def only_in_tier(tier, prompt: list[int]):
    """A write-through manager over `tier` that ran `prompt`; its blocks are now in the tier only."""
    kv, m = make([tier], policy="write_through")
    run(kv, m, 0, prompt)
    m.store.flush()
    m.free(0)
    m.reset_prefix_cache()
    return kv, m


def block_bytes(kv: KVCache, block_id: int) -> torch.Tensor:
    return kv.export_blocks([block_id])[0]


def test_evicted_blocks_are_written_back_and_read_through_with_the_same_bytes():
    tier = HostTier(1 << 20)
    kv, m = make([tier])
    prompt = list(range(1, 13))  # 3 full blocks
    run(kv, m, 0, prompt)
    saved = [block_bytes(kv, b) for b in m.block_table(0)]
    m.free(0)
    keys = [b.key for b in chain(None, prompt, 0, 12, BS, EXTRA)]
    assert not any(tier.contains(k) for k in keys)  # write-back: nothing is written before eviction
    run(kv, m, 1, list(range(100, 132)))  # 8 blocks: evicts the 3 cached ones
    m.store.flush()
    assert all(tier.contains(k) for k in keys)
    m.free(1)
    m.reset_prefix_cache()
    assert m.read_through([*prompt, 99], EXTRA) == 3
    match = m.match_prefix([*prompt, 99], EXTRA)
    assert match.num_tokens == 12 and match.block_hashes == tuple(keys)
    assert all(torch.equal(block_bytes(kv, b), s) for b, s in zip(match.block_ids, saved))
    assert m.restored_tokens == 12 and m.store.stats().blocks_loaded == 3
    m.check_integrity()
    m.store.close()


def test_read_through_never_loads_the_block_of_the_last_token_and_keeps_the_cached_prefix():
    tier = HostTier(1 << 20)
    prompt = list(range(1, 13))
    kv, m = only_in_tier(tier, prompt)
    assert all(tier.contains(b.key) for b in chain(None, prompt, 0, 12, BS, EXTRA))  # written at commit
    assert m.read_through(prompt, EXTRA) == 2  # the block holding the last token is computed
    assert m.read_through(prompt, EXTRA) == 0  # cached now: nothing to load
    assert m.match_prefix(prompt, EXTRA).num_tokens == 8
    m.check_integrity()
    m.store.close()


def test_a_corrupted_record_is_rejected_counted_deleted_and_ends_the_run(tmp_path):
    tier = DiskTier(str(tmp_path), 1 << 20)
    prompt = list(range(1, 13))
    kv, m = only_in_tier(tier, prompt)
    second = chain(None, prompt, 0, 12, BS, EXTRA)[1].key
    record = bytearray(tier.get(second))
    record[-20] ^= 0xFF
    tier.put(second, bytes(record))
    assert m.read_through([*prompt, 0], EXTRA) == 1  # the first block only
    stats = m.store.stats()
    assert stats.rejected == 1 and stats.rejected_by_reason["checksum"] == 1
    assert not tier.contains(second)
    m.check_integrity()
    m.store.close()


def test_records_of_another_model_are_never_loaded():
    tier = HostTier(1 << 20)
    prompt = list(range(1, 13))
    kv, m = only_in_tier(tier, prompt)
    m.store.close()
    other = arena()
    store = TieredStore(other, [tier], BlockFormat("another-model", "float32", BS, 2, other.bytes_per_block))
    m2 = KVCacheManager(BLOCKS, BS, store=store)
    assert m2.read_through([*prompt, 0], EXTRA) == 0
    assert store.stats().rejected_by_reason["fingerprint"] == 1
    m2.check_integrity()
    store.close()


def test_chunk_pages_are_stored_and_restored_under_their_content():
    tier = HostTier(1 << 20)
    kv, m = make([tier])
    tokens = list(range(40, 50))  # 2 full blocks and a partial one
    pages = m.allocate_chunk("doc", len(tokens))
    slots = m.chunk_slot_mapping("doc", 0, len(tokens))
    values = torch.tensor(tokens, dtype=torch.float32)[:, None, None].expand(-1, 2, 4)
    for layer in range(2):
        kv.store(layer, values, values, slots)
    saved = kv.export_blocks(pages.block_ids)
    chunk_extra = extra_keys("model", "float32", "chunk", "context")
    m.store_chunk("doc", tokens, chunk_extra)
    m.store.flush()
    kv2, m2 = make([tier])
    assert m2.restore_chunk("other-id", tokens[:-1], chunk_extra) is None  # other content: not found
    restored = m2.restore_chunk("other-id", tokens, chunk_extra)
    assert restored is not None and restored.num_tokens == 10
    assert torch.equal(kv2.export_blocks(restored.block_ids), saved)
    m2.check_integrity()
    m.store.close()
    m2.store.close()


def test_a_saved_cache_restores_prefixes_pins_and_chunks_and_saves_incrementally(tmp_path):
    kv, m = make()
    fmt = fmt_of(kv)
    first, second = list(range(1, 9)), list(range(1, 5)) + list(range(50, 58))
    run(kv, m, 0, first)
    run(kv, m, 1, second)
    pin = m.pin(m.match_prefix([*first, 0], EXTRA))
    m.free(0)
    m.free(1)
    saved = m.save_snapshot(kv, fmt, tmp_path)
    assert (saved.num_blocks, saved.blocks_written, saved.num_pins) == (4, 4, 1)  # the shared block once
    again = m.save_snapshot(kv, fmt, tmp_path)
    assert again.blocks_written == 0 and again.bytes_written == 0
    expected = {b: block_bytes(kv, m.match_prefix([*second, 0], EXTRA).block_ids[i])
                for i, b in enumerate(range(3))}

    kv2, m2 = make()
    loaded = m2.load_snapshot(kv2, fmt, tmp_path)
    assert (loaded.blocks_loaded, loaded.blocks_skipped, loaded.pins_restored) == (4, 0, 1)
    match = m2.match_prefix([*second, 0], EXTRA)
    assert match.num_tokens == 12
    assert all(torch.equal(block_bytes(kv2, match.block_ids[i]), expected[i]) for i in range(3))
    assert m2.stats().num_pinned_blocks == 2 and m2.pins()[0].num_tokens == 8
    m2.check_integrity()
    del pin


def test_a_damaged_saved_cache_loads_what_is_sound_and_counts_the_rest(tmp_path):
    kv, m = make()
    fmt = fmt_of(kv)
    prompt = list(range(1, 13))
    run(kv, m, 0, prompt)
    m.free(0)
    m.save_snapshot(kv, fmt, tmp_path, [])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    middle = manifest["nodes"][1][0]
    [path] = list((tmp_path / "blocks").rglob(f"{middle}*"))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    kv2, m2 = make()
    loaded = m2.load_snapshot(kv2, fmt, tmp_path)
    assert loaded.blocks_loaded == 1 and loaded.blocks_skipped == 2  # the block below it is skipped too
    assert sum(loaded.rejected_by_reason.values()) == 1
    assert m2.match_prefix([*prompt, 0], EXTRA).num_tokens == 4
    m2.check_integrity()
    with pytest.raises(ValueError, match="no saved cache"):
        m2.load_snapshot(kv2, fmt, tmp_path / "missing")
    other = BlockFormat("another-model", "float32", BS, 2, kv.bytes_per_block)
    kv3, m3 = make()
    assert m3.load_snapshot(kv3, other, tmp_path).blocks_loaded == 0


def test_a_disk_tier_shared_by_two_managers_serves_the_second_one(tmp_path):
    kv, m = make([DiskTier(str(tmp_path), 1 << 30)], policy="write_through")
    prompt = list(range(1, 13))
    run(kv, m, 0, prompt)
    m.store.close()
    kv2, m2 = make([DiskTier(str(tmp_path), 1 << 30)])
    assert m2.read_through([*prompt, 0], EXTRA) == 3
    m2.check_integrity()
    m2.store.close()


def test_snapshot_chunks_are_listed_for_the_engine(tmp_path):
    kv, m = make()
    fmt = fmt_of(kv)
    tokens = list(range(40, 46))
    pages = m.allocate_chunk("doc", len(tokens))
    chunk_extra = extra_keys("model", "float32", "chunk", "context")
    m.save_snapshot(kv, fmt, tmp_path, [SnapshotChunk("doc", "context", tuple(tokens), chunk_extra, pages.block_ids)])
    kv2, m2 = make()
    loaded = m2.load_snapshot(kv2, fmt, tmp_path)
    [c] = loaded.chunks
    assert (c.chunk_id, c.kind, c.token_ids, c.extra) == ("doc", "context", tuple(tokens), chunk_extra)
    restored = m2.load_snapshot_chunk(kv2, fmt, tmp_path, c)
    assert torch.equal(kv2.export_blocks(restored.block_ids), kv.export_blocks(pages.block_ids))
    m2.check_integrity()
