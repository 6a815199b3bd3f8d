"""A stalled network path (a proxy that stops forwarding without closing): every call is
bounded, the listener notices within its heartbeat, nothing hangs.

The bounds asserted are the ones pgcoord documents (``command_timeout``, a call's own
``timeout=``, ``heartbeat + PING_TIMEOUT``), plus a fixed allowance for a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import pytest

import pgcoord
from pgcoord.listener import PING_TIMEOUT
from tests.faults.proxy import StallProxy, stall_proxy
from tests.support import wait_until

# Scheduling and teardown allowance on top of a documented bound (not a speed goal).
SLACK = 1.0
COMMAND_TIMEOUT = 1.5


@pytest.fixture
def proxied(dsn: str) -> Iterator[tuple[StallProxy, str]]:
    with stall_proxy(dsn) as pair:
        yield pair


@pytest.fixture
async def stalled_coord(
    proxied: tuple[StallProxy, str],
) -> AsyncIterator[tuple[pgcoord.Coordinator, StallProxy]]:
    """A started Coordinator behind the proxy, warmed up (connections open) and then stalled."""
    proxy, proxied_dsn = proxied
    coord = pgcoord.Coordinator(
        proxied_dsn, app="stall", command_timeout=COMMAND_TIMEOUT, queue_grace=0.5
    )
    await coord.start()
    cache = coord.cache_manager.create_cache(name="c")
    await cache.set("k", 1)
    await coord.pubsub_manager.publish("ch", "warm")
    await coord.event_queue.publish("jobs", {"n": 0})
    proxy.stall()
    try:
        yield coord, proxy
    finally:
        proxy.resume()
        await asyncio.wait_for(coord.stop(), 30)


@contextlib.asynccontextmanager
async def behind(
    proxied: tuple[StallProxy, str], **options: Any
) -> AsyncIterator[tuple[pgcoord.Coordinator, StallProxy]]:
    """A started Coordinator behind the proxy; at the end the path flows again and it stops."""
    proxy, proxied_dsn = proxied
    coord = pgcoord.Coordinator(proxied_dsn, app="stall", **options)
    await coord.start()
    try:
        yield coord, proxy
    finally:
        proxy.resume()
        await asyncio.wait_for(coord.stop(), 40)


async def timed(call: Awaitable[Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


@pytest.mark.parametrize(
    "name",
    ["cache get", "cache set", "publish", "sync publish", "queue publish"],
)
async def test_a_call_on_a_stalled_path_fails_within_command_timeout(
    stalled_coord: tuple[pgcoord.Coordinator, StallProxy], name: str
) -> None:
    coord, _ = stalled_coord
    cache = coord.cache_manager.get_cache("c")
    calls = {
        "cache get": lambda: cache.get("k"),
        "cache set": lambda: cache.set("k", 2),
        "publish": lambda: coord.pubsub_manager.publish("ch", "x"),
        "sync publish": lambda: coord.sync_message_manager.publish("ch", "x"),
        "queue publish": lambda: coord.event_queue.publish("jobs", {"n": 1}),
    }
    # Twice: the first meets an open connection (severed at the deadline), the second must
    # wait for a new one that the stalled path never delivers.
    for _ in range(2):
        elapsed, exc = await timed(calls[name]())
        assert isinstance(exc, pgcoord.CommandTimeoutError), exc
        assert elapsed < COMMAND_TIMEOUT + SLACK
        assert "did not finish within" in str(exc) and name.split()[0] in str(exc).lower()


async def test_try_acquire_timeout_bounds_the_server_round_trip_too(
    proxied: tuple[StallProxy, str],
) -> None:
    # command_timeout longer than the try: the try's own timeout must be what ends it.
    async with behind(proxied, command_timeout=30.0) as (coord, proxy):
        async with coord.lock_manager.lock("warm"):
            pass
        proxy.stall()
        elapsed, exc = await timed(coord.lock_manager.try_acquire("k", timeout=2.0))
        assert isinstance(exc, pgcoord.LockAcquireError), exc
        # The documented bound: timeout, plus LAST_TRY for a try sent just before it.
        assert elapsed < 2.0 + 0.5 + SLACK


@pytest.mark.parametrize("promoted", [False, True], ids=["on its session", "as a lease row"])
@pytest.mark.parametrize("op", ["extend", "release"])
async def test_extend_and_release_on_a_stalled_path_end_within_their_bounds(
    proxied: tuple[StallProxy, str], promoted: bool, op: str
) -> None:
    async with behind(proxied, command_timeout=COMMAND_TIMEOUT) as (coord, proxy):
        lock = await coord.lock_manager.acquire("k", ttl=30.0)
        if promoted:
            await wait_until(lambda: lock.promoted, timeout=5)
        # No await between the stall and the call: a lock still on its session gets the
        # call before its promotion timer (the call holds the lock's turn until it ends).
        proxy.stall()
        assert lock.promoted is promoted
        elapsed, exc = await timed(lock.extend(30.0) if op == "extend" else lock.release())
        if op == "extend":
            assert isinstance(exc, pgcoord.LockLostError), exc
        else:
            # release returns (the server's lease or session end frees the lock anyway).
            assert exc is None
        assert elapsed < COMMAND_TIMEOUT + SLACK
        assert not lock.held


async def test_a_single_try_on_a_stalled_path_fails_within_a_round_trip(
    proxied: tuple[StallProxy, str],
) -> None:
    async with behind(proxied, command_timeout=30.0) as (coord, proxy):
        async with coord.lock_manager.lock("warm"):
            pass
        proxy.stall()
        elapsed, exc = await timed(coord.lock_manager.try_acquire("k"))  # timeout=0
        assert isinstance(exc, pgcoord.LockAcquireError), exc
        assert elapsed < 0.5 + SLACK  # LAST_TRY


async def test_try_acquire_of_a_held_key_ends_in_time_when_only_the_listener_stalls(
    proxied: tuple[StallProxy, str], dsn: str
) -> None:
    from psycopg_pool import AsyncConnectionPool

    holder = pgcoord.Coordinator(dsn, app="stall")
    await holder.start()
    # Work connections direct, the listener through the proxy: LISTEN for the key's release
    # is what stalls.
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=3, open=False, kwargs={"autocommit": True})
    await pool.open()
    try:
        held = await holder.lock_manager.acquire("k", ttl=30.0)
        async with behind(proxied, pool=pool, command_timeout=30.0) as (coord, proxy):
            proxy.stall()
            elapsed, exc = await timed(coord.lock_manager.try_acquire("k", timeout=2.0))
            assert isinstance(exc, pgcoord.LockAcquireError), exc
            assert elapsed < 2.0 + 0.5 + SLACK
        await held.release()
    finally:
        await holder.stop()
        await pool.close()


async def test_extend_ends_by_the_lease_end_when_that_comes_first(
    proxied: tuple[StallProxy, str],
) -> None:
    async with behind(proxied, command_timeout=30.0) as (coord, proxy):
        lock = await coord.lock_manager.acquire("short", ttl=2.0)
        await wait_until(lambda: lock.promoted, timeout=5)
        proxy.stall()
        elapsed, exc = await timed(lock.extend(30.0))
        assert isinstance(exc, pgcoord.LockLostError), exc
        assert elapsed < 2.0 + SLACK


async def test_stop_on_a_stalled_path_ends_within_grace_plus_command_timeout(
    proxied: tuple[StallProxy, str],
) -> None:
    proxy, proxied_dsn = proxied
    coord = pgcoord.Coordinator(
        proxied_dsn, app="stall", command_timeout=COMMAND_TIMEOUT, queue_grace=0.5
    )

    async def process(message: Any, ctx: Any) -> None:
        return None

    await coord.event_queue.subscribe("jobs", process=process)
    await coord.start()
    try:
        # A lease row and a queue waiter: stop() has database work left to do.
        lock = await coord.lock_manager.acquire("held", ttl=30.0)
        await wait_until(lambda: lock.promoted, timeout=5)
        proxy.stall()
        elapsed, exc = await timed(coord.stop())
        assert exc is None
        # The documented bound: queue_grace + command_timeout + about a second to close.
        assert elapsed < 0.5 + COMMAND_TIMEOUT + 1.0 + SLACK
        assert not coord.running
    finally:
        proxy.resume()
        await asyncio.wait_for(coord.stop(), 30)


async def test_a_cancelled_start_on_a_stalled_path_returns_promptly(
    proxied: tuple[StallProxy, str],
) -> None:
    proxy, proxied_dsn = proxied
    proxy.stall()
    coord = pgcoord.Coordinator(proxied_dsn, app="stall", connect_timeout=30.0)
    task = asyncio.create_task(coord.start())
    await asyncio.sleep(1.0)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < SLACK
    assert not coord.running


async def test_start_on_a_stalled_path_fails_within_connect_timeout(
    proxied: tuple[StallProxy, str],
) -> None:
    proxy, proxied_dsn = proxied
    proxy.stall()
    coord = pgcoord.Coordinator(proxied_dsn, app="stall", connect_timeout=2.0)
    elapsed, exc = await timed(coord.start())
    assert isinstance(exc, pgcoord.ConnectionFailedError), exc
    assert elapsed < 2.0 + SLACK
    assert "127.0.0.1" in str(exc)


async def test_a_stall_met_by_a_listen_is_noticed_as_fast_as_by_the_heartbeat(
    proxied: tuple[StallProxy, str],
) -> None:
    heartbeat = 1.0
    async with behind(proxied, heartbeat=heartbeat) as (coord, proxy):
        proxy.stall()
        stalled_at = time.monotonic()
        # A subscription made during the stall: its LISTEN must not hold the detection up.
        subscribing = asyncio.create_task(coord.pubsub_manager.subscribe("news", print))
        await wait_until(lambda: not coord.listener.connected, timeout=30)
        assert time.monotonic() - stalled_at < heartbeat + PING_TIMEOUT + SLACK
        proxy.resume()
        await asyncio.wait_for(subscribing, 30)


async def test_a_stalled_listener_is_declared_lost_within_the_heartbeat_and_catches_up(
    proxied: tuple[StallProxy, str], dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, proxied_dsn = proxied
    heartbeat = 1.0
    behind = pgcoord.Coordinator(proxied_dsn, app="stall", heartbeat=heartbeat)
    direct = pgcoord.Coordinator(dsn, app="stall")
    got: list[Any] = []
    await behind.sync_message_manager.subscribe("sync", got.append)
    await behind.start()
    await direct.start()
    try:
        caplog.set_level(logging.WARNING, logger="pgcoord.listener")
        proxy.stall()
        stalled_at = time.monotonic()
        await wait_until(lambda: not behind.listener.connected, timeout=30)
        assert time.monotonic() - stalled_at < heartbeat + PING_TIMEOUT + SLACK
        lost = [r.getMessage() for r in caplog.records if "lost its connection" in r.getMessage()]
        assert lost and "heartbeat ping" in lost[0] and "127.0.0.1" in lost[0]
        # Sent while the listener is cut off: delivered once it is back, exactly once.
        await direct.sync_message_manager.publish("sync", {"n": 1}, skip_self=False)
        assert not behind.listener.connected
        proxy.resume()
        await wait_until(lambda: behind.listener.connected and got, timeout=30)
        await asyncio.sleep(1.0)  # a duplicate would have arrived by now
        assert got == [{"n": 1}]
    finally:
        proxy.resume()
        await asyncio.wait_for(direct.stop(), 30)
        await asyncio.wait_for(behind.stop(), 30)
