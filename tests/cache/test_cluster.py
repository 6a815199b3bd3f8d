"""Cluster behaviour with real processes: single-flight wrap, atomic incr, near-cache invalidation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from tests import support
from tests.support import CoordFactory

pytestmark = pytest.mark.slow


def _start(mode: str, *args: str, dsn: str, count: int, procs: list[support.Proc]) -> None:
    for _ in range(count):
        procs.append(support.spawn("tests.workers.cache_worker", mode, *args, dsn=dsn))
    for proc in procs:
        proc.expect("ready", timeout=60)


async def test_wrap_is_single_flight_across_three_processes(
    dsn: str, make_coord: CoordFactory
) -> None:
    coord = await make_coord(app="clu")
    with support.processes() as procs:
        _start("wrap", "cold", "17", dsn=dsn, count=3, procs=procs)  # 51 concurrent calls
        for proc in procs:
            proc.send("go")
        results: list[str] = []
        for proc in procs:
            results += (await asyncio.to_thread(proc.expect, "results", 60))["results"]
    assert len(results) == 51
    assert len(set(results)) == 1, results
    assert results[0].startswith("computed by ")
    assert await coord.cache.get("calls") == 1  # fn ran exactly once in the whole cluster
    assert await coord.cache.get("cold") == results[0]


async def test_wrap_waiters_do_not_hang_on_a_frozen_leader(
    dsn: str, make_coord: CoordFactory
) -> None:
    coord = await make_coord(app="clu", cache_wrap_timeout=1.0)
    with support.processes() as procs:
        _start("freeze", "stuck", dsn=dsn, count=1, procs=procs)
        await asyncio.to_thread(procs[0].expect, "computing", 60)
        procs[0].stop()  # SIGSTOP: its connection, and so its lock, stays alive
        assert await coord.cache.wrap("stuck", lambda: "computed here") == "computed here"
        assert await coord.cache.get("stuck") == "computed here"


async def test_incr_is_atomic_across_three_processes(dsn: str, make_coord: CoordFactory) -> None:
    coord = await make_coord(app="clu")
    with support.processes() as procs:
        _start("incr", "hits", "34", dsn=dsn, count=2, procs=procs)
        procs.append(support.spawn("tests.workers.cache_worker", "incr", "hits", "32", dsn=dsn))
        procs[-1].expect("ready", timeout=60)
        for proc in procs:
            proc.send("go")
        for proc in procs:
            await asyncio.to_thread(proc.expect, "done", 60)
    assert await coord.cache.get("hits") == 100


def _ask(proc: support.Proc, cmd: dict[str, Any], key: str) -> Any:
    proc.send(cmd)
    return proc.expect(key, timeout=30)[key]


async def _eventually_sees(proc: support.Proc, key: str, expected: Any) -> None:
    # Generous deadline for an event, not a speed assertion: local_ttl is 60 s, so only an
    # invalidation (or a flush) can make the new value appear within it.
    deadline = time.monotonic() + 20
    while True:
        value = await asyncio.to_thread(_ask, proc, {"get": key}, "value")
        if value == expected:
            return
        assert time.monotonic() < deadline, f"still served {value!r}, expected {expected!r}"
        await asyncio.sleep(0.05)


def _write_behind_the_caches_back(dsn: str, key: str, value: str) -> None:
    """Change a row without any NOTIFY: what a missed invalidation looks like to an instance."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE pgcoord.cache_entries SET value = %s WHERE ns = 'clu:near' AND key = %s",
            (f'"{value}"', key),
        )


async def test_near_cache_invalidation_across_processes(dsn: str, make_coord: CoordFactory) -> None:
    coord = await make_coord(app="clu")
    here = coord.cache_manager.create_cache("near", local_ttl=60)
    with support.processes() as procs:
        _start("near", dsn=dsn, count=1, procs=procs)
        other = procs[0]
        await here.set("k", "v1")
        assert await asyncio.to_thread(_ask, other, {"get": "k"}, "value") == "v1"
        # The other instance now serves k from memory: a silent change is not seen...
        _write_behind_the_caches_back(dsn, "k", "silent")
        assert await asyncio.to_thread(_ask, other, {"get": "k"}, "value") == "v1"
        # ...but a set through the cache invalidates it across processes.
        await here.set("k", "v2")
        await _eventually_sees(other, "k", "v2")
        await here.delete("k")
        await _eventually_sees(other, "k", None)
        # And the other direction: its write invalidates this instance's near cache.
        await here.set("j", "mine")
        assert await here.get("j") == "mine"
        assert await asyncio.to_thread(_ask, other, {"set": ["j", "theirs"]}, "ok")
        deadline = time.monotonic() + 20
        while await here.get("j") != "theirs":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # reset() reaches the other instance too
        assert await asyncio.to_thread(_ask, other, {"get": "j"}, "value") == "theirs"
        await here.reset()
        await _eventually_sees(other, "j", None)


async def test_near_cache_is_flushed_after_a_listener_reconnect(
    dsn: str, make_coord: CoordFactory
) -> None:
    coord = await make_coord(app="clu")
    here = coord.cache_manager.create_cache("near", local_ttl=60)
    with support.processes() as procs:
        _start("near", dsn=dsn, count=1, procs=procs)
        other = procs[0]
        await here.set("k", "v1")
        assert await asyncio.to_thread(_ask, other, {"get": "k"}, "value") == "v1"
        before = await asyncio.to_thread(_ask, other, {"listener": True}, "pid")
        assert before is not None
        assert support.terminate_backend(dsn, before)
        # Its invalidation would be lost while the listener is down: simulate it with a write
        # that sends none at all.
        _write_behind_the_caches_back(dsn, "k", "changed while away")
        deadline = time.monotonic() + 30
        while True:
            other.send({"listener": True})
            state = await asyncio.to_thread(other.expect, "pid", 30)
            if state["reconnects"] >= 1 and state["connected"]:
                break
            assert time.monotonic() < deadline, "the listener never reconnected"
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(_ask, other, {"get": "k"}, "value") == "changed while away"


async def test_wrap_stays_within_the_connection_budget(make_coord: CoordFactory, dsn: str) -> None:
    coord = await make_coord(app="budget", max_connections=3)
    cache = coord.cache
    peak = 0

    async def slow(i: int) -> int:
        await cache.set(f"side-{i}", i)  # fn itself uses the cache while its key is locked
        await asyncio.sleep(0.3)
        return i

    async def sample() -> None:
        nonlocal peak
        for _ in range(10):
            peak = max(peak, await asyncio.to_thread(support.client_backends, dsn))
            await asyncio.sleep(0.05)

    results, _ = await asyncio.gather(
        asyncio.gather(*(cache.wrap(f"key-{i}", lambda i=i: slow(i)) for i in range(6))),
        sample(),
    )
    assert results == list(range(6))
    # The wrap locks' connection is one of the work pool's: listener + 2, never a 4th.
    assert 0 < peak <= 3
