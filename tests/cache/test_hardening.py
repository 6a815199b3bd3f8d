"""Issue 11's cache defects: near caches see every write to their prefix, ``ttl=inf`` means no
expiry, unstorable keys are refused before any write, and malformed or forged notifications do
no harm beyond a cache miss."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psycopg
import pytest

import pgcoord
from pgcoord.cache import Cache
from pgcoord.errors import InvalidInputError
from tests.support import CoordFactory

# -- helpers --------------------------------------------------------------------------------


def _table(dsn: str) -> list[tuple[Any, ...]]:
    """Every row of the cache table, ordered (to compare before and after)."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT ns, key, value, expires_at FROM pgcoord.cache_entries ORDER BY ns, key"
        ).fetchall()


def _user_rows(dsn: str) -> list[tuple[Any, ...]]:
    """The rows of user namespaces ("<app>:<prefix>"), without pgcoord's own bookkeeping."""
    return [row for row in _table(dsn) if ":" in row[0] and ";" not in row[0].split(":")[0]]


def _silently_set(dsn: str, ns: str, key: str, value: Any) -> None:
    """Change a row with no NOTIFY: afterwards a near cache serving the old value is caching."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "UPDATE pgcoord.cache_entries SET value = %s WHERE ns = %s AND key = %s",
            (orjson.dumps(value).decode(), ns, key),
        )
        assert cur.rowcount == 1


def _channel(coord: pgcoord.Coordinator) -> str:
    return coord._rt.channel("cache", "invalidate")


async def _eventually(get: Callable[[], Awaitable[Any]], expected: Any) -> None:
    # A generous deadline for an event, not a speed assertion: local_ttl is 600 s, so only an
    # invalidation can make the near cache give up its copy within it.
    deadline = time.monotonic() + 20
    while (value := await get()) != expected:
        assert time.monotonic() < deadline, f"still served {value!r}, expected {expected!r}"
        await asyncio.sleep(0.02)


async def _cached(near: Cache, dsn: str, key: str, value: Any) -> None:
    """Make ``near`` hold ``key`` = ``value`` in process memory, and prove that it does."""
    assert await near.get(key) == value
    _silently_set(dsn, near.ns, key, "behind the cache's back")
    assert await near.get(key) == value  # served from memory, not from the changed row
    _silently_set(dsn, near.ns, key, value)


# Each write through a plain cache, and what the near cache must then return for each key.
Write = Callable[[Cache], Awaitable[Any]]
WRITES: dict[str, tuple[Write, dict[str, Any]]] = {
    "set": (lambda c: c.set("a", "new"), {"a": "new", "b": 2}),
    "set ttl=inf": (lambda c: c.set("a", "new", ttl=math.inf), {"a": "new", "b": 2}),
    "mset": (lambda c: c.mset({"a": "x", "b": "y"}), {"a": "x", "b": "y"}),
    "delete": (lambda c: c.delete("a"), {"a": None, "b": 2}),
    "mdel": (lambda c: c.mdel("a", "b"), {"a": None, "b": None}),
    "incr": (lambda c: c.incr("b", 5), {"a": 1, "b": 7}),
    "reset": (lambda c: c.reset(), {"a": None, "b": None}),
    "wrap_with_condition": (
        lambda c: c.wrap_with_condition("z", lambda: "computed"),
        {"a": 1, "b": 2, "z": "computed"},
    ),
}


async def _prime(near: Cache, dsn: str) -> None:
    await near.mset({"a": 1, "b": 2, "z": 0})
    await _cached(near, dsn, "a", 1)
    await _cached(near, dsn, "b", 2)
    await _cached(near, dsn, "z", 0)  # falsy: wrap_with_condition counts it as a miss


# -- defect 4: a near cache sees every write to its prefix ----------------------------------


@pytest.mark.parametrize("write", list(WRITES))
async def test_a_plain_cache_write_invalidates_a_near_cache_of_the_same_prefix_in_process(
    coord: pgcoord.Coordinator, dsn: str, write: str
) -> None:
    near = coord.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
    plain = coord.cache_manager.create_cache("plain", prefix="shared")
    await _prime(near, dsn)
    action, expected = WRITES[write]
    await action(plain)
    # In one process the write drops the local copies before it returns: no waiting.
    assert {key: await near.get(key) for key in expected} == expected


@pytest.mark.parametrize("write", list(WRITES))
async def test_a_plain_cache_write_invalidates_near_caches_of_other_instances(
    make_coord: CoordFactory, dsn: str, write: str
) -> None:
    reader = await make_coord(app="shop")
    writer = await make_coord(app="shop")
    near = reader.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
    plain = writer.cache_manager.create_cache("plain", prefix="shared")
    await _prime(near, dsn)
    action, expected = WRITES[write]
    await action(plain)
    for key, value in expected.items():
        await _eventually(lambda k=key: near.get(k), value)  # type: ignore[misc]


async def test_a_near_cache_created_after_start_sees_writes_of_other_instances(
    make_coord: CoordFactory, dsn: str
) -> None:
    writer = await make_coord(app="shop")
    plain = writer.cache_manager.create_cache("plain", prefix="shared")
    await plain.set("k", "v1")  # written before any instance near-caches the prefix
    reader = await make_coord(app="shop")
    near = reader.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
    await _eventually(lambda: near.get("k"), "v1")
    await _cached(near, dsn, "k", "v1")
    await plain.set("k", "v2")
    await _eventually(lambda: near.get("k"), "v2")


async def _notifications_until_flush(
    listen: psycopg.AsyncConnection[Any], coord: pgcoord.Coordinator
) -> list[list[Any]]:
    """Every op NOTIFYed on the cache channel up to a ``flush_all`` sent now (which always
    NOTIFYs, after every earlier write's NOTIFY had committed)."""
    await coord.cache_manager.flush_all()
    ops: list[list[Any]] = []
    async for notify in listen.notifies(timeout=20):
        message = orjson.loads(notify.payload)
        if ["a"] in message["o"]:
            return ops
        ops += message["o"]
    raise AssertionError(f"no flush_all notification arrived; got {ops}")


async def test_plain_caches_send_no_notify_while_no_instance_near_caches_their_prefix(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(app="shop")
    other = await make_coord(app="shop")
    other.cache_manager.create_cache("elsewhere", prefix="other", local_ttl=600)
    plain = coord.cache_manager.create_cache("plain", prefix="shared")
    await _eventually(lambda: other.cache_manager.get_cache("elsewhere").get("x"), None)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listen:
        await listen.execute(f'LISTEN "{_channel(coord)}"')
        await plain.set("a", 1)
        await plain.mset({"b": 2})
        await plain.incr("c")
        await plain.mdel("a")
        await plain.reset()
        assert await _notifications_until_flush(listen, coord) == []
        # Once an instance near-caches the prefix, the same writes are announced.
        near = other.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
        await _eventually(lambda: near.get("a"), None)
        await plain.set("a", 1)
        assert ["k", plain.ns, "a"] in await _notifications_until_flush(listen, coord)


def _registered(coord: pgcoord.Coordinator, cache: Cache) -> bool:
    """May ``cache``'s near cache serve now (its registration confirmed, LISTEN up)?"""
    return coord.cache_manager._near_usable(cache.ns)


async def _until_registered(coord: pgcoord.Coordinator, cache: Cache, key: str) -> None:
    """Read ``key`` (each read may start the registration) until the near cache may serve."""
    deadline = time.monotonic() + 20
    while True:
        await cache.get(key)
        if _registered(coord, cache):
            return
        assert time.monotonic() < deadline, "the near cache never registered"
        await asyncio.sleep(0.02)


def _age_registration(dsn: str, marker: str, seconds: float) -> None:
    """Make the registration rows of ``marker`` look last renewed ``seconds`` ago."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "UPDATE pgcoord.cache_entries SET written_at = now() - make_interval(secs => %s)"
            " WHERE ns = %s",
            (seconds, marker),
        )
        assert cur.rowcount == 1


def _registration_age(dsn: str, marker: str) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM now() - written_at)::float8 FROM pgcoord.cache_entries"
            " WHERE ns = %s",
            (marker,),
        ).fetchone()
    assert row is not None, "no registration row"
    return float(row[0])


async def test_a_registration_neither_waits_for_vacuum_nor_makes_cache_writes_wait(
    make_coord: CoordFactory, dsn: str
) -> None:
    """VACUUM and ANALYZE hold SHARE UPDATE EXCLUSIVE on the table for as long as they run:
    a near cache must still register meanwhile, and no cache write of any instance may be
    made to queue for a lock on the table because an instance registers."""
    reader = await make_coord(app="shop")
    writer = await make_coord(app="shop")
    near = reader.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
    plain = writer.cache_manager.create_cache("plain", prefix="shared")
    await plain.set("k", "v1")
    async with (
        await psycopg.AsyncConnection.connect(dsn) as vacuum,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as monitor,
    ):
        await vacuum.execute("LOCK TABLE pgcoord.cache_entries IN SHARE UPDATE EXCLUSIVE MODE")
        done = asyncio.Event()
        waited: list[tuple[Any, ...]] = []
        writes = 0

        async def watch() -> None:
            # Every lock on the cache table a client session (not autovacuum) waits for.
            while not done.is_set():
                cur = await monitor.execute(
                    "SELECT l.mode, a.query FROM pg_locks l"
                    " JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.relation = 'pgcoord.cache_entries'::regclass AND NOT l.granted"
                    "   AND a.backend_type = 'client backend'"
                )
                waited.extend(await cur.fetchall())
                await asyncio.sleep(0.005)

        async def write() -> None:
            nonlocal writes
            while not done.is_set():
                await plain.set("other", writes)
                writes += 1

        tasks = [asyncio.create_task(watch()), asyncio.create_task(write())]
        registered = False
        deadline = time.monotonic() + 20
        try:
            while not registered and time.monotonic() < deadline:
                await near.get("k")
                registered = _registered(reader, near)
                await asyncio.sleep(0.02)
            for _ in range(20):  # and writes keep going once it has registered
                await plain.set("other", -1)
        finally:
            done.set()
            await asyncio.gather(*tasks)
        assert not waited, f"sessions waited for a lock on the cache table: {waited[:3]}"
        assert registered, "the near cache did not register while vacuum held its lock"
        assert writes > 0
        await _cached(near, dsn, "k", "v1")
        await vacuum.rollback()
    await plain.set("k", "v2")
    await _eventually(lambda: near.get("k"), "v2")


async def test_a_write_in_flight_across_a_registration_delays_serving_until_it_commits(
    make_coord: CoordFactory, dsn: str
) -> None:
    """The race a registration must close: a write whose statement ran before the registration
    committed did not see it and sends no NOTIFY, so the registering instance must not serve
    anything it read before that write committed."""
    from pgcoord.cache import queries
    from pgcoord.cache.registration import LEASE

    q = queries.build("pgcoord")
    reader = await make_coord(app="shop")
    near = reader.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
    await near.set("k", "old")  # a write does not register; the first read does
    marker = reader.cache_manager._near_marker_ns(near.ns)
    async with await psycopg.AsyncConnection.connect(dsn) as writer:
        # The cache's own write statement, in a transaction left open: its probe finds no
        # registration, so this write will send no NOTIFY.
        cur = await writer.execute(
            q.set,
            {
                "ns": near.ns,
                "key": "k",
                "value": orjson.dumps("new").decode(),
                "ttl": None,
                "near": marker,
                "me": "another instance",
                "lease": LEASE,
            },
        )
        assert await cur.fetchone() == (False,)
        # The reader registers meanwhile: its row commits (later writes see it and NOTIFY)...
        deadline = time.monotonic() + 20
        while not any(row[0] == marker for row in _table(dsn)):
            assert await near.get("k") == "old"
            assert time.monotonic() < deadline, "the registration did not commit"
            await asyncio.sleep(0.02)
        # ...but it does not serve while the write that missed it is still open.
        for _ in range(20):
            assert await near.get("k") == "old"
            assert not _registered(reader, near)
            await asyncio.sleep(0.01)
        await writer.commit()
    # No NOTIFY was sent; the registration's wait alone keeps "old" out of the near cache.
    assert await near.get("k") == "new"
    await _until_registered(reader, near, "k")
    assert await near.get("k") == "new"
    await _cached(near, dsn, "k", "new")


async def test_a_registration_older_than_lease_minus_margin_starts_afresh(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    """A renewal of a row near its lease's end races writers judging it lapsed (who then skip
    their NOTIFY): such a row is registered afresh, dropping the prefix's near entries."""
    from pgcoord.cache.registration import LEASE, MARGIN

    near = coord.cache_manager.create_cache("near", local_ttl=600)
    await near.set("k", "v1")
    await _until_registered(coord, near, "k")
    await _cached(near, dsn, "k", "v1")
    marker = coord.cache_manager._near_marker_ns(near.ns)
    _age_registration(dsn, marker, LEASE - MARGIN + 1)
    # What a writer that found the row lapsed did: change the value and tell nobody.
    _silently_set(dsn, near.ns, "k", "v2")
    assert await coord.cache_manager._registrations.refresh()
    assert await near.get("k") == "v2"
    assert _registration_age(dsn, marker) < MARGIN
    await _until_registered(coord, near, "k")
    await _cached(near, dsn, "k", "v2")


async def test_a_timely_renewal_keeps_the_near_cache_entries(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    from pgcoord.cache.registration import LEASE, MARGIN

    near = coord.cache_manager.create_cache("near", local_ttl=600)
    await near.set("k", "v1")
    await _until_registered(coord, near, "k")
    await _cached(near, dsn, "k", "v1")
    marker = coord.cache_manager._near_marker_ns(near.ns)
    _age_registration(dsn, marker, LEASE - MARGIN - 5)
    assert await coord.cache_manager._registrations.refresh()
    assert _registration_age(dsn, marker) < MARGIN
    assert _registered(coord, near)
    await _cached(near, dsn, "k", "v1")  # still held: renewed in place, nothing dropped


async def test_a_stopped_instance_removes_its_near_cache_registration(
    make_coord: CoordFactory, dsn: str
) -> None:
    reader = await make_coord(app="shop")
    near = reader.cache_manager.create_cache("near", prefix="shared", local_ttl=600)
    await _until_registered(reader, near, "x")
    assert len(_table(dsn)) == 1  # the registration row
    await reader.stop()
    assert _table(dsn) == []


# -- defect 10: ttl=inf is "no expiry" ------------------------------------------------------


@pytest.fixture(params=["postgres", "memory", "near"])
async def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _make(coord: pgcoord.Coordinator, kind: str, name: str, **options: Any) -> Cache:
    if kind == "near":
        options.setdefault("local_ttl", 600)
        return coord.cache_manager.create_cache(name, **options)
    return coord.cache_manager.create_cache(name, store=kind, **options)


async def test_create_cache_ttl_inf_means_no_expiry(coord: pgcoord.Coordinator, kind: str) -> None:
    cache = _make(coord, kind, "forever", ttl=math.inf)
    assert cache.default_ttl is None
    await cache.set("k", "v")
    assert await cache.get("k") == "v"
    assert await cache.ttl("k") is None


async def test_every_ttl_argument_takes_inf_as_no_expiry(
    coord: pgcoord.Coordinator, kind: str
) -> None:
    cache = _make(coord, kind, "short", ttl=60)  # a finite default that inf must override
    inf = math.inf
    await cache.set("set", 1, ttl=inf)
    await cache.mset({"mset": 1}, ttl=inf)
    assert await cache.incr("incr", ttl=inf) == 1
    assert await cache.wrap("wrap", lambda: 1, ttl=inf) == 1
    assert await cache.wrap_with_condition("cond", lambda: 1, ttl=inf) == 1
    for key in ("set", "mset", "incr", "wrap", "cond"):
        assert await cache.get(key) == 1, key
        assert await cache.ttl(key) is None, key
    await cache.set("finite", 1)
    left = await cache.ttl("finite")
    assert left is not None and 0 < left <= 60


async def test_local_ttl_inf_is_a_near_cache_whose_entries_never_expire_on_their_own(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    near = coord.cache_manager.create_cache("near", local_ttl=math.inf)
    assert near.local_ttl == math.inf
    await near.set("k", "v")
    await _cached(near, dsn, "k", "v")
    await near.set("k", "w")
    assert await near.get("k") == "w"


@pytest.mark.parametrize("ttl", [1e300, 10**400, -math.inf, math.nan])
async def test_huge_or_meaningless_ttls_are_refused(
    coord: pgcoord.Coordinator, dsn: str, ttl: Any
) -> None:
    with pytest.raises(ValueError):
        coord.cache_manager.create_cache("c", ttl=ttl)
    with pytest.raises(ValueError):
        coord.cache_manager.create_cache("c", local_ttl=ttl)
    with pytest.raises(ValueError):
        await coord.cache.set("k", 1, ttl=ttl)
    assert _table(dsn) == []


async def test_incr_refuses_an_amount_beyond_64_bits_on_every_store(
    coord: pgcoord.Coordinator, dsn: str, kind: str
) -> None:
    cache = _make(coord, kind, "counters")
    for amount in (2**63, -(2**63) - 1, 10**400):
        with pytest.raises(InvalidInputError):
            await cache.incr("n", amount)
    assert await cache.get("n") is None
    assert await cache.incr("n", 2**63 - 1) == 2**63 - 1
    assert _user_rows(dsn) == ([] if kind == "memory" else [(cache.ns, "n", str(2**63 - 1), None)])


# -- defect 6 (cache part): unstorable keys are refused before anything is written ---------

BAD_KEYS = ["a\x00b", "\x00", "\ud800", "x\udfff", "\udbff\udfff"]


def _calls(cache: Cache, key: str) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "get": lambda: cache.get(key),
        "set": lambda: cache.set(key, 1),
        "delete": lambda: cache.delete(key),
        "mget": lambda: cache.mget("ok", key),
        "mset": lambda: cache.mset([("ok", "changed"), (key, 1)]),
        "mset mapping": lambda: cache.mset({"ok": "changed", key: 1}),
        "mdel": lambda: cache.mdel("ok", key),
        "ttl": lambda: cache.ttl(key),
        "incr": lambda: cache.incr(key),
        "wrap": lambda: cache.wrap(key, lambda: 1),
        "wrap_with_condition": lambda: cache.wrap_with_condition(key, lambda: 1),
        "keys": lambda: cache.keys(key),
    }


@pytest.mark.parametrize("key", BAD_KEYS, ids=ascii)
async def test_unstorable_keys_are_refused_before_any_write(
    coord: pgcoord.Coordinator, dsn: str, kind: str, key: str
) -> None:
    cache = _make(coord, kind, "c")
    await cache.set("ok", "kept")
    before_rows, before_keys = _user_rows(dsn), await cache.keys()
    for what, call in _calls(cache, key).items():
        with pytest.raises(InvalidInputError):
            await call()
        assert _user_rows(dsn) == before_rows, what
        assert await cache.keys() == before_keys, what
        assert await cache.get("ok") == "kept", what


@pytest.mark.parametrize("key", BAD_KEYS, ids=ascii)
async def test_unstorable_prefixes_and_names_are_refused(
    coord: pgcoord.Coordinator, key: str
) -> None:
    for store in ("postgres", "memory"):
        with pytest.raises(InvalidInputError):
            coord.cache_manager.create_cache("c", prefix=key, store=store)
        with pytest.raises(InvalidInputError):
            coord.cache_manager.create_cache(key, store=store)
    assert coord.cache_manager.caches == {}


class _PlainText:
    """A custom serializer storing str values as they are (no escaping at all)."""

    def dumps(self, value: Any) -> str:
        return str(value)

    def loads(self, text: str) -> Any:
        return text


class _UnescapedJson:
    """A custom serializer: JSON that keeps non-ASCII text as is (``ensure_ascii=False``)."""

    def dumps(self, value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    def loads(self, text: str) -> Any:
        return json.loads(text)


UNSTORABLE_OUTPUT = [
    pytest.param(_PlainText, "a\x00b", id="NUL"),
    pytest.param(_PlainText, "\udfff", id="lone-low-surrogate"),
    pytest.param(_UnescapedJson, "x\ud800", id="json-lone-surrogate"),
    pytest.param(_UnescapedJson, {"k": ["\udbff\udfff"]}, id="json-split-pair"),
]


@pytest.mark.parametrize(("serializer", "value"), UNSTORABLE_OUTPUT)
async def test_serializer_output_postgres_cannot_store_is_refused_before_any_write(
    coord: pgcoord.Coordinator, dsn: str, kind: str, serializer: type[Any], value: Any
) -> None:
    cache = _make(coord, kind, "custom", serializer=serializer())
    await cache.set("ok", "kept")
    before = _user_rows(dsn)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "set": lambda: cache.set("k", value),
        "mset": lambda: cache.mset({"ok": "changed", "k": value}),
        "wrap": lambda: cache.wrap("k", lambda: value),
        "wrap_with_condition": lambda: cache.wrap_with_condition("k", lambda: value),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidInputError, match="serializer"):
            await call()
        assert _user_rows(dsn) == before, what
        assert await cache.get("ok") == "kept", what
        assert await cache.get("k") is None, what
    await cache.set("k", "fine")  # the cache still works
    assert await cache.get("k") == "fine"


# -- malformed and forged notifications -----------------------------------------------------

MALFORMED = [
    "",
    "not json",
    '{"i":',
    "null",
    '"a string"',
    "[1, 2, 3]",
    "{}",
    '{"i": "x"}',
    '{"o": []}',
    '{"i": 7, "o": []}',
    '{"i": "x", "o": 5}',
    '{"i": "x", "o": [5]}',
    '{"i": "x", "o": [[]]}',
    '{"i": "x", "o": [["k"]]}',
    '{"i": "x", "o": [["k", 1, 2]]}',
    '{"i": "x", "o": [["k", "a", "b", "c"]]}',
    '{"i": "x", "o": [["q", "what"]]}',
    '{"i": "x", "o": [["w"]]}',
    '{"i": "x", "o": [[null]]}',
    '{"i": "x", "o": {"k": 1}}',
    '{"i": {"nested": true}, "o": [["a"]]}',
    "[" * 5000,
    '{"i": "x", "o": [' + ",".join(f'["k", "n", "{i}"]' for i in range(400)) + "]}",
    "x" * 7990,
    "\u00ff\u0101\U0001f600 junk \x01\x7f",
]


async def test_malformed_notifications_are_logged_and_later_invalidations_still_arrive(
    make_coord: CoordFactory, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader = await make_coord(app="shop")
    writer = await make_coord(app="shop")
    near = reader.cache_manager.create_cache("near", local_ttl=600)
    waiter = reader.cache_manager.create_cache("waits")
    plain = writer.cache_manager.create_cache("plain", prefix="near")
    await plain.set("k", "v1")
    await _eventually(lambda: near.get("k"), "v1")
    await _cached(near, dsn, "k", "v1")
    caplog.set_level(logging.WARNING, logger="pgcoord")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as forger:
        for payload in MALFORMED:
            await forger.execute("SELECT pg_notify(%s, %s)", (_channel(reader), payload))
    await plain.set("k", "v2")
    await _eventually(lambda: near.get("k"), "v2")
    assert "malformed" in caplog.text
    # wrap still works (its wake-up messages travel on the same channel).
    assert await waiter.wrap("w", lambda: "computed") == "computed"
    await plain.set("k", "v3")
    await _eventually(lambda: near.get("k"), "v3")


async def test_a_forged_invalidation_causes_at_most_a_cache_miss(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    near = coord.cache_manager.create_cache("near", local_ttl=600)
    await near.set("k", "v1")
    await _cached(near, dsn, "k", "v1")
    _silently_set(dsn, near.ns, "k", "true value")
    forged = [
        {"i": "forger", "o": [["k", near.ns, "k"]]},
        {"i": "forger", "o": [["n", near.ns]]},
        {"i": "forger", "o": [["a"]]},
        {"i": "forger", "o": [["w", near.ns, "k"]]},
    ]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as forger:
        for message in forged:
            await forger.execute(
                "SELECT pg_notify(%s, %s)", (_channel(coord), orjson.dumps(message).decode())
            )
    # The near cache dropped its copy and read the row again: what is stored, never the forgery.
    await _eventually(lambda: near.get("k"), "true value")
    assert await near.get("missing") is None
    assert _user_rows(dsn) == [(near.ns, "k", '"true value"', None)]
