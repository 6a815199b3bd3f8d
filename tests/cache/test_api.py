"""The model platform's cache behaviours, on the Postgres store and the memory store."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord.cache import Cache
from tests.support import CoordFactory


@pytest.fixture(params=["postgres", "memory", "near"])
async def cache(request: pytest.FixtureRequest, make_coord: CoordFactory) -> Cache:
    """The same behaviours on each store, and through a near cache in front of Postgres."""
    coord = await make_coord()
    if request.param == "near":
        return coord.cache_manager.create_cache("things", local_ttl=60)
    return coord.cache_manager.create_cache("things", store=request.param)


async def test_set_get_delete(cache: Cache) -> None:
    assert await cache.get("missing") is None
    assert await cache.get("missing", "dflt") == "dflt"
    await cache.set("k", {"a": [1, 2.5, None, True, "ü\u0000"]})
    assert await cache.get("k") == {"a": [1, 2.5, None, True, "ü\u0000"]}
    await cache.set("k", "replaced")
    assert await cache.get("k") == "replaced"
    await cache.set("null", None)
    assert await cache.get("null", "dflt") is None  # a stored null is a value, not a miss
    await cache.delete("k")
    assert await cache.get("k") is None
    await cache.delete("k")  # deleting a missing key is fine


async def test_mset_mget_mdel(cache: Cache) -> None:
    await cache.mset({"a": 1, "b": [2]})
    await cache.mset([("c", "three"), ("a", "one"), ("a", "uno")])  # later duplicate wins
    assert await cache.mget("a", "b", "c", "zz", "a") == ["uno", [2], "three", None, "uno"]
    assert await cache.mget() == []
    await cache.mdel("a", "c", "nope")
    assert await cache.mget("a", "b", "c") == [None, [2], None]


async def test_keys_glob_without_prefix_and_literal_metacharacters(cache: Cache) -> None:
    await cache.mset({"user:1": 1, "user:22": 2, "users": 3, "100%": 4, "1000": 5, "a_b": 6})
    await cache.mset({"axb": 7, "a\\b": 8})
    assert await cache.keys("user:*") == ["user:1", "user:22"]
    assert await cache.keys("user:?") == ["user:1"]
    assert await cache.keys("100%") == ["100%"]  # % is literal, not a wildcard
    assert await cache.keys("a_b") == ["a_b"]  # _ is literal
    assert await cache.keys("a\\b") == ["a\\b"]
    assert sorted(await cache.keys()) == sorted(
        ["user:1", "user:22", "users", "100%", "1000", "a_b", "axb", "a\\b"]
    )


async def test_wrap_with_condition_cases(cache: Cache) -> None:
    calls: list[int] = []

    def fn() -> Any:
        calls.append(1)
        return {"v": len(calls)}

    # use_cache=False: always computes, stores nothing
    assert await cache.wrap_with_condition("k", fn, use_cache=False) == {"v": 1}
    assert await cache.get("k") is None
    # miss -> computes and stores the truthy result
    assert await cache.wrap_with_condition("k", fn) == {"v": 2}
    assert await cache.wrap_with_condition("k", fn) == {"v": 2}
    assert len(calls) == 2

    # falsy results are not stored without a predicate; a falsy cached value is a miss
    async def zero() -> int:
        calls.append(1)
        return 0

    assert await cache.wrap_with_condition("z", zero) == 0
    assert await cache.get("z", "absent") == "absent"
    await cache.set("f", False)
    assert await cache.wrap_with_condition("f", lambda: "computed") == "computed"
    assert await cache.get("f") == "computed"
    # is_cacheable decides (sync or async)
    assert await cache.wrap_with_condition("p", lambda: "no", is_cacheable=lambda r: False) == "no"
    assert await cache.get("p") is None

    async def yes(result: Any) -> bool:
        return True

    assert await cache.wrap_with_condition("q", lambda: [], is_cacheable=yes, ttl=30) == []
    assert await cache.get("q", "absent") == []
    assert 0 < (await cache.ttl("q") or 0) <= 30


async def test_wrap_caches_and_returns_fn_value(cache: Cache) -> None:
    calls: list[int] = []

    async def fn() -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        return "computed"

    results = await asyncio.gather(*(cache.wrap("w", fn, ttl=60) for _ in range(20)))
    assert results == ["computed"] * 20
    assert len(calls) == 1
    assert await cache.wrap("w", fn) == "computed"
    assert len(calls) == 1


async def test_wrap_error_reaches_every_caller_and_caches_nothing(cache: Cache) -> None:
    calls: list[int] = []

    async def boom() -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        raise RuntimeError("backend down")

    results = await asyncio.gather(
        *(cache.wrap("e", boom) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) and str(r) == "backend down" for r in results)
    assert len(calls) == 1
    assert await cache.get("e", "absent") == "absent"
    assert await cache.wrap("e", lambda: "ok") == "ok"


async def test_ttl_expiry(cache: Cache) -> None:
    await cache.set("short", "v", ttl=0.3)
    await cache.set("forever", "v")
    left = await cache.ttl("short")
    assert left is not None and 0 < left <= 0.3
    assert await cache.ttl("forever") is None
    assert await cache.ttl("missing") is None
    await asyncio.sleep(0.6)
    assert await cache.get("short") is None
    assert await cache.ttl("short") is None
    assert await cache.mget("short", "forever") == [None, "v"]
    assert await cache.keys() == ["forever"]


async def test_default_ttl_of_the_cache(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    cache = coord.cache_manager.create_cache("ttl", ttl=0.3)
    await cache.set("a", 1)
    await cache.set("b", 1, ttl=60)
    await asyncio.sleep(0.6)
    assert await cache.mget("a", "b") == [None, 1]


async def test_incr(cache: Cache) -> None:
    assert await cache.incr("n") == 1
    assert await cache.incr("n", 10) == 11
    assert await cache.incr("n", -12) == -1
    assert await cache.get("n") == -1
    await cache.set("text", "abc")
    with pytest.raises(ValueError, match="not an integer"):
        await cache.incr("text")
    await cache.set("big", 2**63 - 1)
    with pytest.raises(ValueError, match="64 bits"):
        await cache.incr("big")
    assert await cache.get("big") == 2**63 - 1
    # ttl applies on creation; a live counter keeps its expiry (fixed window)
    assert await cache.incr("win", ttl=0.3) == 1
    assert await cache.incr("win", ttl=60) == 2
    await asyncio.sleep(0.6)
    assert await cache.incr("win") == 1  # the window expired: counting restarts


async def test_prefixes_isolate_caches_and_reset_clears_only_its_own(
    make_coord: CoordFactory,
) -> None:
    coord = await make_coord()
    manager = coord.cache_manager
    one = manager.create_cache("one", prefix="p1")
    two = manager.create_cache("two", prefix="p2")
    await one.set("k", "from one")
    await two.set("k", "from two")
    await coord.cache.set("k", "default")
    assert await one.get("k") == "from one"
    assert await two.get("k") == "from two"
    await one.reset()
    assert await one.get("k") is None
    assert await one.keys() == []
    assert await two.get("k") == "from two"
    assert await coord.cache.get("k") == "default"


async def test_same_prefix_in_another_app_is_separate(make_coord: CoordFactory) -> None:
    a = await make_coord(app="alpha")
    b = await make_coord(app="beta")
    await a.cache_manager.create_cache("c", prefix="shared").set("k", "a")
    await b.cache_manager.create_cache("c", prefix="shared").set("k", "b")
    await a.cache_manager.flush_all()
    assert await b.cache_manager.get_cache("c").get("k") == "b"
    assert await a.cache_manager.get_cache("c").get("k") is None


async def test_manager_get_cache_default_and_flush_all(make_coord: CoordFactory) -> None:
    coord = await make_coord(app="shop")
    manager = coord.cache_manager
    assert coord.cache is manager.get_cache("shop")
    assert coord.cache.name == "shop"
    mem = manager.create_cache("mem", store="memory")
    pg = manager.create_cache("pg")
    assert manager.get_cache("pg") is pg
    with pytest.raises(KeyError):
        manager.get_cache("nope")
    with pytest.raises(pgcoord.CacheNotFoundError):
        manager.get_cache("nope")
    with pytest.raises(ValueError, match="exists"):
        manager.create_cache("pg")
    await mem.set("k", 1)
    await pg.set("k", 1)
    await coord.cache.set("k", 1)
    await manager.flush_all()
    assert await mem.get("k") is None
    assert await pg.get("k") is None
    assert await coord.cache.get("k") is None


async def test_expired_rows_are_never_returned_by_the_database_clock(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    cache = coord.cache
    await cache.set("k", "v", ttl=3600)
    # Expire it by the server's clock only: nothing in the app knows.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgcoord.cache_entries SET expires_at = now() - interval '1 ms'")
    assert await cache.get("k") is None
    assert await cache.mget("k") == [None]
    assert await cache.keys() == []
    assert await cache.ttl("k") is None
    assert await cache.incr("k") == 1  # an expired value is replaced, not incremented


async def test_sweep_deletes_expired_rows_in_batches(make_coord: CoordFactory, dsn: str) -> None:
    coord = await make_coord(cache_sweep_batch=7, cache_sweep_interval=3600)
    cache = coord.cache
    await cache.mset({f"k{i}": i for i in range(30)}, ttl=0.2)
    await cache.set("keep", 1)
    await asyncio.sleep(0.4)
    assert await coord.cache_manager.sweep() == 30
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT key FROM pgcoord.cache_entries").fetchall()
    assert rows == [("keep",)]


async def test_background_sweeper_removes_expired_rows(make_coord: CoordFactory, dsn: str) -> None:
    coord = await make_coord(cache_sweep_interval=0.2)
    await coord.cache.set("gone", 1, ttl=0.2)
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM pgcoord.cache_entries").fetchone()
        if row == (0,):
            break
        assert asyncio.get_running_loop().time() < deadline, "the sweeper never ran"
        await asyncio.sleep(0.1)


async def test_max_entries_evicts_the_oldest_written(make_coord: CoordFactory) -> None:
    coord = await make_coord(cache_sweep_interval=3600)
    cache = coord.cache_manager.create_cache("bounded", max_entries=5)
    other = coord.cache_manager.create_cache("other")
    for i in range(10):
        await cache.set(f"k{i}", i)
    await other.set("x", 1)
    await coord.cache_manager.sweep()
    assert await cache.keys() == [f"k{i}" for i in range(5, 10)]
    assert await other.get("x") == 1


async def test_memory_store_is_bounded(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    cache = coord.cache_manager.create_cache("m", store="memory", max_entries=3)
    for i in range(5):
        await cache.set(f"k{i}", i)
    assert await cache.keys() == ["k2", "k3", "k4"]


async def test_custom_serializer_and_value_size_limit(make_coord: CoordFactory) -> None:
    class Upper:
        def dumps(self, value: Any) -> str:
            return str(value).upper()

        def loads(self, text: str) -> Any:
            return text

    coord = await make_coord(cache_max_value_bytes=100)
    cache = coord.cache_manager.create_cache("s", serializer=Upper())
    await cache.set("k", "hello")
    assert await cache.get("k") == "HELLO"
    with pytest.raises(ValueError, match="limit is 100 bytes"):
        await coord.cache.set("big", "x" * 200)
    roomy = coord.cache_manager.create_cache("roomy", max_value_bytes=1000)
    await roomy.set("big", "x" * 200)
    assert await roomy.get("big") == "x" * 200


async def test_schema_table_is_unlogged(coord: pgcoord.Coordinator, dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT relpersistence FROM pg_class WHERE oid = 'pgcoord.cache_entries'::regclass"
        ).fetchone()
    assert row == ("u",)


async def test_near_cache_between_two_instances_and_mutable_values(
    make_coord: CoordFactory,
) -> None:
    a = (await make_coord(app="n")).cache_manager.create_cache("c", local_ttl=60)
    b = (await make_coord(app="n")).cache_manager.create_cache("c", local_ttl=60)
    await a.set("k", {"v": [1]})
    first = await b.get("k")
    first["v"].append(2)  # a caller mutating what it got must not alter the cached value
    assert await b.get("k") == {"v": [1]}
    await a.mset({"k": 2, "j": 3})
    deadline = asyncio.get_running_loop().time() + 20
    while await b.mget("k", "j", "x") != [2, 3, None]:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    await a.mdel("k")
    while await b.get("k") is not None:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert await b.incr("j") == 4
    while await a.get("j") != 4:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_near_cache_does_not_serve_while_the_listener_is_down(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(app="n")
    near = coord.cache_manager.create_cache("c", local_ttl=60)
    await near.set("k", "old")
    assert await near.get("k") == "old"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgcoord.cache_entries SET value = '\"new\"'")
    assert await near.get("k") == "old"  # served from process memory
    await coord.listener.stop()  # invalidations can no longer arrive
    assert not coord.listener.connected
    assert await near.get("k") == "new"
    assert await near.mget("k") == ["new"]


async def test_many_cold_wraps_do_not_exhaust_a_small_pool(make_coord: CoordFactory) -> None:
    coord = await make_coord(pool_size=2, connect_timeout=5)
    cache = coord.cache

    async def fn(i: int) -> int:
        # The computation itself needs the pool: leaders holding pool connections would starve it.
        await cache.get("unrelated")
        await asyncio.sleep(0.2)
        await cache.get("unrelated")
        return i

    results = await asyncio.gather(*(cache.wrap(f"key{i}", lambda i=i: fn(i)) for i in range(30)))
    assert results == list(range(30))
    assert await cache.mget("key0", "key29") == [0, 29]


async def test_writes_commit_on_a_shared_non_autocommit_pool(
    make_coord: CoordFactory, dsn: str
) -> None:
    from psycopg_pool import AsyncConnectionPool

    async with AsyncConnectionPool(dsn, min_size=1, max_size=3, open=False) as pool:
        coord = await make_coord(pool=pool)
        cache = coord.cache
        await cache.set("k", "v")
        await cache.mset({"a": 1})
        assert await cache.incr("n") == 1
        await cache.set("short", 1, ttl=0.1)
        await asyncio.sleep(0.3)
        assert await coord.cache_manager.sweep() == 1
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT key FROM pgcoord.cache_entries ORDER BY key").fetchall()
        assert rows == [("a",), ("k",), ("n",)]
        async with pool.connection() as conn:
            assert not conn.autocommit  # given back as it came
        await coord.stop()


def test_blocking_api_for_sync_applications(dsn: str) -> None:
    with pgcoord.BlockingCoordinator(dsn, app="blk") as coord:
        cache = coord.cache
        cache.set("k", {"a": 1}, ttl=60)
        assert cache.get("k") == {"a": 1}
        assert cache.incr("n", 2) == 2
        assert cache.wrap("w", lambda: "computed") == "computed"
        assert cache.keys() == ["k", "n", "w"]
        named = coord.cache_manager.create_cache("named", local_ttl=5)
        named.mset({"x": 1})
        assert named.mget("x", "y") == [1, None]
        coord.cache_manager.flush_all()
        assert cache.keys() == []


async def test_an_idle_cache_gives_its_connection_back_to_the_pool(
    coord: pgcoord.Coordinator,
) -> None:
    for _ in range(20):
        await coord.cache.set("k", 1)
        await coord.cache.get("k")
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        stats = coord.pool.get_stats()
        if stats.get("pool_available", 0) == stats["pool_size"]:
            break
        assert asyncio.get_running_loop().time() < deadline, stats
        await asyncio.sleep(0.1)
