"""Pure helpers of the cache, without a database: patterns, near cache, messages, memory store."""

from __future__ import annotations

import pytest

from pgcoord.cache import messages
from pgcoord.cache.memory import MemoryStore
from pgcoord.cache.near import MISSING, NearCache
from pgcoord.cache.patterns import glob_to_like, glob_to_regex
from pgcoord.cache.serializer import JsonCacheSerializer, check_size
from pgcoord.errors import PayloadTooLargeError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_glob_to_like_escapes_like_metacharacters() -> None:
    assert glob_to_like("user:*") == "user:%"
    assert glob_to_like("a?c") == "a_c"
    assert glob_to_like("100%_\\x*") == "100\\%\\_\\\\x%"


def test_glob_to_regex_matches_whole_keys_literally() -> None:
    regex = glob_to_regex("a.*[x]?")
    assert regex.fullmatch("a.bc[x]z")
    assert not regex.fullmatch("abc[x]z")  # '.' is literal
    assert not regex.fullmatch("a.bc[x]")  # '?' needs one character


def test_near_cache_expires_after_local_ttl() -> None:
    clock = Clock()
    near = NearCache(1.0, 10, JsonCacheSerializer().loads, clock)
    token = near.begin_read("k")
    near.end_read("k", token, '"v"', "v")
    assert near.get("k") == "v"
    clock.now += 1.0
    assert near.get("k") is MISSING


def test_near_cache_never_outlives_the_database_ttl() -> None:
    clock = Clock()
    near = NearCache(60.0, 10, JsonCacheSerializer().loads, clock)
    near.end_read("k", near.begin_read("k"), "1", 1, ttl_left=0.5)
    clock.now += 0.5
    assert near.get("k") is MISSING


def test_a_read_overlapping_an_invalidation_does_not_populate() -> None:
    near = NearCache(60.0, 10, JsonCacheSerializer().loads)
    token = near.begin_read("k")
    near.invalidate(["k"])  # a write landed while the read was in flight
    near.end_read("k", token, '"old"', "old")
    assert near.get("k") is MISSING
    # the next read, after the invalidation, may populate again
    near.end_read("k", near.begin_read("k"), '"new"', "new")
    assert near.get("k") == "new"


def test_a_read_overlapping_a_clear_does_not_populate() -> None:
    near = NearCache(60.0, 10, JsonCacheSerializer().loads)
    token = near.begin_read("k")
    near.clear()
    near.end_read("k", token, "1", 1)
    assert near.get("k") is MISSING


def test_near_cache_is_bounded_and_hands_out_copies_of_mutable_values() -> None:
    near = NearCache(60.0, 2, JsonCacheSerializer().loads)
    for key in ("a", "b", "c"):
        near.end_read(key, near.begin_read(key), "[1]", [1])
    assert len(near) == 2
    assert near.get("a") is MISSING
    got = near.get("c")
    got.append(2)
    assert near.get("c") == [1]


def test_messages_pack_under_the_notify_limit_and_round_trip() -> None:
    ops = [("k", "app:p", "x" * 200 + str(i)) for i in range(100)]
    payloads = messages.pack("inst", ops, limit=2000)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= 2000 for p in payloads)
    decoded = [op for p in payloads for op in messages.unpack(p).ops]
    assert decoded == ops
    with pytest.raises(ValueError):
        messages.unpack('{"i": 1}')


def test_check_size_names_the_limit() -> None:
    check_size("x" * 10, 10, "k")
    with pytest.raises(PayloadTooLargeError, match="limit is 10 bytes"):
        check_size("é" * 6, 10, "k")


async def test_memory_store_is_lru_bounded_and_expires() -> None:
    clock = Clock()
    store = MemoryStore(2, clock)
    await store.set("a", "1", None)
    await store.set("b", "2", 1.0)
    assert await store.get("a") == "1"  # a is now the most recent
    await store.set("c", "3", None)
    assert await store.get("b") is None  # least recently used went
    assert await store.keys(None) == ["a", "c"]
    await store.set("d", "4", 0.5)
    clock.now += 0.5
    assert await store.get("d") is None
    assert await store.incr("n", 2, None) == 2
    assert await store.incr("n", 3, None) == 5
