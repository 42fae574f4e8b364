"""Tiered KV storage through the engine: blocks evicted to a tier and loaded back, two processes
sharing a prefix through disk and through Redis, chunks found by another engine, saved caches, and
faults (Redis killed, disk full, permission denied, corrupted and truncated files): the engine keeps
serving and its greedy output always equals recompute."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvforge import SamplingParams
from kvforge.cache.tiers import DiskTier
from kvforge.metrics import ServerMetrics
from tests.conftest import DEVICE, MODEL, make_llm
from tests.redis_server import start_redis

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a screw press adapted from wine making. Within "
          "fifty years presses were running in more than two hundred cities across Europe, and the price "
          "of books fell so far that")
OTHERS = [f"Question {i}: describe in detail the climate, rivers and mountains of region number {i}, then "
          f"list its largest towns, their populations and the industries each one is known for." for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def tokens(llm, prompt: str = PROMPT) -> list[int]:
    return list(llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    with make_llm(enable_prefix_caching=False) as llm:
        return tokens(llm)


@pytest.fixture
def redis(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


def faults(llm) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in llm.stats().tiers.tiers:
        for kind, n in t.faults_by_kind.items():
            out[kind] = out.get(kind, 0) + n
    return out


def drop_from_arena(llm) -> None:
    """Write every cached block to the tiers (as close() does) and empty the arena."""
    llm.engine.cache.flush_to_tiers()
    llm.reset_prefix_cache()


# ---------------------------------------------------------------- one engine
def test_blocks_evicted_to_the_host_tier_are_loaded_back_instead_of_recomputed(reference):
    with make_llm(kv_cache_memory=None, num_blocks=14, kv_tiers=["host:256MiB"]) as llm:
        assert tokens(llm) == reference
        for prompt in OTHERS:  # fill the small arena: the prompt's cached blocks are evicted, written back
            tokens(llm, prompt)
        assert llm.stats().cache.num_evictions > 0
        llm.engine.cache.store.flush()
        computed = llm.stats().prompt_tokens
        assert tokens(llm) == reference
        stats = llm.stats()
        assert stats.restored_tokens > 0 and stats.tiers.blocks_loaded == stats.restored_tokens // 16
        assert stats.prompt_tokens - computed <= len(llm.get_tokenizer().encode(PROMPT)) - stats.restored_tokens
        llm.engine.check_integrity()


def test_quantized_blocks_are_stored_in_their_own_format_and_loaded_back():
    with make_llm(kv_cache_dtype="int8", kv_tiers=["host:64MiB"]) as llm:
        expected = tokens(llm)
        drop_from_arena(llm)
        assert tokens(llm) == expected and llm.stats().restored_tokens > 0
        assert llm.engine.block_format.kv_format == "int8/float32"


def test_tier_metrics_are_rendered_with_the_engine_metrics(reference):
    with make_llm(kv_tiers=["host:64MiB"]) as llm:
        tokens(llm)
        drop_from_arena(llm)
        assert tokens(llm) == reference
        metrics = ServerMetrics()
        metrics.update(llm.stats(), 0)
        text = metrics.render().decode()
    assert 'kvforge_kv_tier_hits_total{tier="host:64MiB"}' in text
    assert "kvforge_kv_tier_restored_tokens_total" in text and "kvforge_kv_tier_get_seconds_bucket" in text


def test_a_bad_tier_configuration_is_refused_before_anything_is_built(tmp_path):
    for bad in (["host:lots"], ["tape:/dev/st0"], "host:1GiB"):
        with pytest.raises(ValueError, match="kv_tiers|tier"):
            make_llm(kv_tiers=bad)
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        make_llm(kv_tiers=["host:1GiB"], enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_tier_policy"):
        make_llm(kv_tiers=["host:1GiB"], kv_tier_policy="sometimes")
    with pytest.raises(ValueError, match="no saved cache"):
        make_llm(load_cache=str(tmp_path / "nothing"))


# ---------------------------------------------------------------- two processes
SCRIPT = textwrap.dedent("""
    import json, sys
    from kvforge import LLM, SamplingParams
    tier, policy, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    with LLM({model!r}, device={device!r}, dtype="float32", kv_cache_memory=64 << 20, kv_tiers=[tier],
             kv_tier_policy=policy) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        s = llm.stats()
    hits = sum(t.hits for t in s.tiers.tiers)
    print(json.dumps({{"tokens": list(out[0].outputs[0].token_ids), "restored": s.restored_tokens, "hits": hits}}))
""").format(model=MODEL, device=DEVICE)


def in_process(tier: str, policy: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, tier, policy, PROMPT], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_first_ones_prefix_through_disk(tmp_path, reference):
    tier = f"disk:{tmp_path / 'kv'}:1GiB"
    first = in_process(tier, "write_back")  # its blocks are on the disk by the time it exits
    assert first["tokens"] == reference and first["restored"] == 0
    second = in_process(tier, "write_through")  # a restart: a new process finds the blocks by their keys
    assert second["tokens"] == reference and second["restored"] > 0 and second["hits"] > 0


def test_a_second_process_reuses_the_first_ones_prefix_through_redis(redis, reference):
    first = in_process(redis.url, "write_through")
    assert first["tokens"] == reference and first["restored"] == 0
    second = in_process(redis.url, "write_back")
    assert second["tokens"] == reference and second["restored"] > 0 and second["hits"] > 0


def test_a_chunk_registered_by_one_engine_is_loaded_by_another_through_disk(tmp_path):
    tier = f"disk:{tmp_path / 'kv'}:1GiB"
    doc = "Lisbon is the capital and largest city of Portugal, on the estuary of the river Tagus. " * 4
    with make_llm(kv_tiers=[tier]) as first:
        chunk = first.register_chunk(doc)
        expected = first.generate_from_chunks([chunk.chunk_id], " The capital of Portugal is", GREEDY)
    with make_llm(kv_tiers=[tier]) as second:
        computed = second.stats().prompt_tokens
        again = second.register_chunk(doc)
        assert second.stats().prompt_tokens == computed  # loaded, not prefilled
        out = second.generate_from_chunks([again.chunk_id], " The capital of Portugal is", GREEDY)
        assert out.outputs[0].token_ids == expected.outputs[0].token_ids
        second.engine.check_integrity()


# ---------------------------------------------------------------- saved caches
def test_a_saved_cache_restores_prefixes_pins_and_chunks_in_a_new_engine(tmp_path, reference):
    doc = "Porto is the second city of Portugal, known for its bridges and its wine. " * 3
    with make_llm() as llm:
        assert tokens(llm) == reference
        pin = llm.pin_prefix(PROMPT)
        chunk = llm.register_chunk(doc, chunk_id="porto")
        expected = llm.generate_from_chunks(["porto"], " Porto is known for", GREEDY).outputs[0].token_ids
        saved = llm.save_cache(str(tmp_path / "saved"))
        assert saved.blocks_written == saved.num_blocks > 0 and saved.num_pins == 1 and saved.num_chunks == 1
        assert llm.save_cache(str(tmp_path / "saved")).blocks_written == 0  # incremental
    with make_llm(load_cache=str(tmp_path / "saved")) as llm:
        restored = llm.engine.loaded_cache
        assert restored.blocks_loaded == saved.num_blocks - len(chunk.page_indices) and restored.pins_restored == 1
        assert [p.num_tokens for p in llm.engine.cache.pins()] == [pin.num_tokens]
        computed = llm.stats().prompt_tokens
        assert tokens(llm) == reference
        assert llm.stats().prompt_tokens - computed < 16  # only the last, partial block is computed
        assert [c.chunk_id for c in llm.list_chunks()] == ["porto"]
        assert llm.generate_from_chunks(["porto"], " Porto is known for", GREEDY).outputs[0].token_ids == expected
        llm.engine.check_integrity()


def test_a_saved_cache_with_a_damaged_chunk_recomputes_that_chunk(tmp_path):
    doc = "Faro lies on the southern coast of Portugal, in the Algarve. " * 3
    with make_llm() as llm:
        llm.register_chunk(doc, chunk_id="faro")
        expected = llm.generate_from_chunks(["faro"], " Faro lies in", GREEDY).outputs[0].token_ids
        llm.save_cache(str(tmp_path / "saved"))
    for path in (tmp_path / "saved" / "blocks").rglob("*.kvb"):
        path.write_bytes(path.read_bytes()[:-7])  # every record truncated
    with make_llm(load_cache=str(tmp_path / "saved")) as llm:
        assert llm.stats().prompt_tokens > 0  # the chunk was recomputed
        assert llm.generate_from_chunks(["faro"], " Faro lies in", GREEDY).outputs[0].token_ids == expected


# ---------------------------------------------------------------- faults
def test_redis_killed_mid_run_costs_recompute_only_and_is_used_again_once_back(redis, reference):
    with make_llm(kv_tiers=[redis.url + "?ttl=600"], kv_tier_policy="write_through") as llm:
        assert tokens(llm) == reference
        llm.engine.cache.store.flush()
        redis.stop()
        llm.reset_prefix_cache()
        assert tokens(llm) == reference  # recomputed: the tier reads as misses
        assert faults(llm).get("connection", 0) > 0 and llm.stats().restored_tokens == 0
        redis.restart()
        time.sleep(1.2)  # the tier's cool-down after a connection fault
        llm.reset_prefix_cache()
        assert tokens(llm) == reference  # written again (write-through) once the server is back
        llm.engine.cache.store.flush()
        llm.reset_prefix_cache()
        assert tokens(llm) == reference and llm.stats().restored_tokens > 0
        llm.engine.check_integrity()


@pytest.mark.parametrize("error, kind", [(errno.ENOSPC, "full"), (errno.EACCES, "permission")])
def test_a_disk_that_refuses_writes_costs_recompute_only(tmp_path, monkeypatch, reference, error, kind):
    def refuse(self, key, value):
        raise (PermissionError if error == errno.EACCES else OSError)(error, "refused by the test")

    monkeypatch.setattr(DiskTier, "put", refuse)
    monkeypatch.setattr(DiskTier, "put_many", lambda self, items: refuse(self, None, None))
    with make_llm(kv_tiers=[f"disk:{tmp_path / 'kv'}:1GiB"]) as llm:
        assert tokens(llm) == reference
        drop_from_arena(llm)
        assert tokens(llm) == reference
        assert faults(llm).get(kind, 0) > 0 and llm.stats().restored_tokens == 0
        llm.engine.check_integrity()


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_file_on_disk_is_rejected_and_recomputed(tmp_path, reference, damage):
    with make_llm(kv_tiers=[f"disk:{tmp_path / 'kv'}:1GiB"], kv_tier_policy="write_through") as llm:
        assert tokens(llm) == reference
        llm.engine.cache.store.flush()
        for path in (tmp_path / "kv").rglob("*.kvb"):
            data = bytearray(path.read_bytes())
            if damage == "corrupt":
                data[len(data) // 2] ^= 0x55
            else:
                del data[len(data) // 3:]
            path.write_bytes(bytes(data))
        llm.reset_prefix_cache()
        assert tokens(llm) == reference
        stats = llm.stats()
        assert stats.restored_tokens == 0 and stats.tiers.rejected > 0
        llm.engine.check_integrity()
