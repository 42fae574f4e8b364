"""The tier protocol, the same for every backend (host, disk, a real Redis), and the byte budgets of
host and disk with exact LRU eviction."""

from __future__ import annotations

import random
import threading

import pytest

from kvforge.cache.tiers import MAX_KEY_BYTES
from tests.cache.tiers.conftest import key

MB = random.Random(0).randbytes(1 << 20)


# ---- conformance: every backend ----------------------------------------------------------------

def test_kind_and_spec_name_the_backend(tier):
    assert tier.kind in ("host", "disk", "redis")
    assert tier.spec.startswith(tier.kind) and repr(tier).endswith(f"({tier.spec!r})")


def test_a_value_put_is_got_back_and_contained(tier):
    tier.put(key(1), b"one")
    assert tier.get(key(1)) == b"one"
    assert tier.contains(key(1))


def test_a_missing_key_is_a_miss_not_an_error(tier):
    assert tier.get(key(1)) is None
    assert not tier.contains(key(1))
    tier.delete(key(1))  # no-op


def test_put_replaces_the_value_of_an_existing_key(tier):
    tier.put(key(1), b"old value")
    tier.put(key(1), b"new")
    assert tier.get(key(1)) == b"new"


def test_delete_removes_only_its_key(tier):
    tier.put(key(1), b"one")
    tier.put(key(2), b"two")
    tier.delete(key(1))
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    assert tier.get(key(2)) == b"two"


def test_binary_values_round_trip_byte_for_byte(tier):
    values = {key(1): bytes(range(256)) * 3, key(2): b"\x00", key(3): b"\r\n$-1\r\n", key(4): MB}
    for k, v in values.items():
        tier.put(k, v)
    for k, v in values.items():
        assert tier.get(k) == v


def test_the_empty_value_is_a_hit_not_a_miss(tier):
    tier.put(key(1), b"")
    assert tier.get(key(1)) == b""
    assert tier.contains(key(1))
    assert tier.get_many([key(1), key(2)]) == [b"", None]


def test_bytearray_and_memoryview_values_are_stored_as_bytes(tier):
    tier.put(key(1), bytearray(b"array"))
    tier.put_many([(key(2), memoryview(b"view"))])
    assert tier.get(key(1)) == b"array" and type(tier.get(key(1))) is bytes
    assert tier.get(key(2)) == b"view"


def test_keys_of_every_allowed_length_round_trip(tier):
    keys = [b"\x00", b"k", key(7), bytes(range(MAX_KEY_BYTES)), b"\xff" * MAX_KEY_BYTES]
    for i, k in enumerate(keys):
        tier.put(k, b"v%d" % i)
    assert [tier.get(k) for k in keys] == [b"v%d" % i for i in range(len(keys))]


def test_batched_forms_answer_in_order_with_misses(tier):
    tier.put_many([(key(1), b"one"), (key(2), b"two"), (key(3), b"")])
    asked = [key(3), key(9), key(1), key(1), key(2)]
    assert tier.get_many(asked) == [b"", None, b"one", b"one", b"two"]
    assert tier.contains_many(asked) == [True, False, True, True, True]
    assert tier.get_many([]) == [] and tier.contains_many([]) == []
    tier.put_many([])


def test_put_many_keeps_the_last_value_of_a_repeated_key(tier):
    tier.put_many([(key(1), b"first"), (key(2), b"two"), (key(1), b"last")])
    assert tier.get_many([key(1), key(2)]) == [b"last", b"two"]


@pytest.mark.parametrize("bad_key", [b"", b"k" * (MAX_KEY_BYTES + 1), "text", 7, bytearray(b"k")])
def test_a_bad_key_is_a_value_error_that_changes_nothing(tier, bad_key):
    for call in (lambda: tier.get(bad_key), lambda: tier.contains(bad_key), lambda: tier.delete(bad_key),
                 lambda: tier.put(bad_key, b"v"), lambda: tier.get_many([key(1), bad_key]),
                 lambda: tier.contains_many([bad_key]), lambda: tier.put_many([(key(1), b"v"), (bad_key, b"v")])):
        with pytest.raises(ValueError, match="tier key"):
            call()
    assert not tier.contains(key(1))  # put_many checked every item before storing any


def test_a_value_that_is_not_bytes_is_a_value_error(tier):
    with pytest.raises(ValueError, match="tier value must be bytes, got str"):
        tier.put(key(1), "text")
    with pytest.raises(ValueError, match="tier value"):
        tier.put_many([(key(1), b"ok"), (key(2), None)])
    assert not tier.contains(key(1))


def test_several_threads_at_once_keep_every_value(tier):
    errors: list[BaseException] = []
    rounds = 40

    def work(t: int) -> None:
        try:
            for i in range(rounds):
                mine = key(1000 * (t + 1) + i)
                tier.put(mine, b"%d:%d" % (t, i) * 50)
                tier.put(key(0), b"shared by %d" % t)  # every thread writes this one
                assert tier.get(mine) == b"%d:%d" % (t, i) * 50
                assert tier.contains_many([mine, key(1)]) == [True, False]
                tier.put_many([(mine, b"last %d" % i), (key(2), b"x")])
                assert tier.get_many([mine])[0] == b"last %d" % i
                assert tier.get(key(0)) in {b"shared by %d" % n for n in range(4)}
                if i % 2:
                    tier.delete(mine)
        except BaseException as e:  # handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in range(4):
        expected = [None if i % 2 else b"last %d" % i for i in range(rounds)]
        assert tier.get_many([key(1000 * (t + 1) + i) for i in range(rounds)]) == expected


# ---- byte budgets: host and disk ---------------------------------------------------------------

def test_the_least_recently_got_value_is_evicted_first(make_budget_tier):
    t = make_budget_tier(100)
    t.put(key(1), b"a" * 40)
    t.put(key(2), b"b" * 40)
    assert t.get(key(1)) == b"a" * 40  # key 1 is now the most recently used
    t.put(key(3), b"c" * 40)  # 120 > 100: key 2 goes
    assert t.contains_many([key(1), key(2), key(3)]) == [True, False, True]
    assert t.used_bytes == 80 and len(t) == 2


def test_contains_does_not_refresh_recency(make_budget_tier):
    t = make_budget_tier(100)
    t.put(key(1), b"a" * 40)
    t.put(key(2), b"b" * 40)
    assert t.contains(key(1))
    t.put(key(3), b"c" * 40)
    assert t.contains_many([key(1), key(2), key(3)]) == [False, True, True]


def test_a_put_evicts_as_many_values_as_it_needs_oldest_first(make_budget_tier):
    t = make_budget_tier(100)
    t.put_many([(key(i), bytes([i]) * 25) for i in range(4)])  # full: 4 x 25
    t.put(key(9), b"z" * 60)  # needs 3 of them gone: 0, 1, 2
    assert t.contains_many([key(0), key(1), key(2), key(3), key(9)]) == [False, False, False, True, True]
    assert t.used_bytes == 85


def test_replacing_a_value_frees_its_old_bytes(make_budget_tier):
    t = make_budget_tier(100)
    t.put(key(1), b"a" * 60)
    t.put(key(1), b"a" * 30)
    t.put(key(2), b"b" * 70)  # 30 + 70 fits exactly
    assert t.contains_many([key(1), key(2)]) == [True, True] and t.used_bytes == 100


def test_a_value_of_exactly_the_budget_evicts_everything_else(make_budget_tier):
    t = make_budget_tier(100)
    t.put(key(1), b"a" * 10)
    t.put(key(2), b"b" * 100)
    assert t.contains_many([key(1), key(2)]) == [False, True] and t.used_bytes == 100


def test_a_value_larger_than_the_budget_is_not_stored_and_drops_the_old_one(make_budget_tier):
    t = make_budget_tier(100)
    t.put(key(1), b"a" * 10)
    t.put(key(2), b"b" * 10)
    t.put(key(1), b"A" * 101)  # no error; the old value must not be served any more
    assert t.get(key(1)) is None
    assert t.get(key(2)) == b"b" * 10 and t.used_bytes == 10


def test_empty_values_take_no_budget(make_budget_tier):
    t = make_budget_tier(10)
    t.put_many([(key(i), b"") for i in range(5)] + [(key(9), b"x" * 10)])
    assert all(t.contains_many([key(i) for i in range(5)] + [key(9)])) and t.used_bytes == 10


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "1GiB"])
def test_a_budget_that_is_not_a_positive_int_is_a_value_error(make_budget_tier, capacity):
    with pytest.raises(ValueError, match="capacity must be a positive number of bytes"):
        make_budget_tier(capacity)
