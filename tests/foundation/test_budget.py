"""One connection budget per process and server: max_connections, sharing, refused connections."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord import _kept
from tests.support import CoordFactory, client_backends, limited_role, wait_until

wait_for = functools.partial(wait_until, timeout=10.0)


@pytest.mark.parametrize("budget", [1, 0, -3])
def test_a_budget_below_the_minimum_is_refused_naming_it(budget: int) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="at least 2") as info:
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", max_connections=budget)
    assert isinstance(info.value, ValueError)


def test_pool_size_is_a_deprecated_alias_for_the_pool_part() -> None:
    with pytest.warns(DeprecationWarning, match="max_connections"):
        coord = pgcoord.Coordinator("postgresql://127.0.0.1:1/none", pool_size=3)
    assert coord.max_connections == 4
    with pytest.raises(ValueError, match="pool_size"), pytest.warns(DeprecationWarning):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", pool_size=0)


def test_the_default_budget_is_four() -> None:
    assert pgcoord.Coordinator("postgresql://127.0.0.1:1/none").max_connections == 4


async def test_a_burst_queues_within_the_budget_and_every_caller_is_served(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    async def work(i: int) -> int:
        async with coord._rt.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.05)")
        return i

    burst = asyncio.gather(*(work(i) for i in range(30)))
    peak = 0
    while not burst.done():
        peak = max(peak, await asyncio.to_thread(client_backends, dsn))
        await asyncio.sleep(0.02)
    assert await burst == list(range(30))
    assert 2 <= peak <= coord.max_connections


async def test_fifty_apps_in_one_process_hold_at_most_three_connections_idle(
    make_coord: CoordFactory, dsn: str
) -> None:
    apps = [await make_coord(app=f"app{i}") for i in range(50)]
    got: dict[str, list[Any]] = {c.app: [] for c in apps}
    for coord in apps:
        await coord.pubsub_manager.subscribe("news", got[coord.app].append)
        await coord.cache.set("k", coord.app)
    await apps[7].pubsub_manager.publish("news", "for app7")
    await wait_for(lambda: got["app7"] == ["for app7"])
    assert [await c.cache.get("k") for c in apps] == [c.app for c in apps]
    await asyncio.sleep(_kept.HOLD * 2)  # kept-warm connections go back to the pool
    idle = client_backends(dsn)
    assert idle <= 3, idle
    # Apps stay isolated although they share one LISTEN connection.
    assert [app for app, messages in got.items() if messages] == ["app7"]
    assert len({c.listener.backend_pid for c in apps}) == 1


async def test_stopping_one_coordinator_leaves_the_others_working(
    make_coord: CoordFactory,
) -> None:
    first = await make_coord(app="first")
    second = await make_coord(app="second")
    twin = await make_coord(app="second")  # a second instance of one app in this process
    got: dict[str, list[Any]] = {"first": [], "second": [], "twin": []}
    await first.pubsub_manager.subscribe("ch", got["first"].append)
    await second.pubsub_manager.subscribe("ch", got["second"].append)
    await twin.pubsub_manager.subscribe("ch", got["twin"].append)
    shared = second.listener.shared
    assert first.listener.shared is shared
    before = shared.channels

    await first.stop()
    assert shared.connected and second.running and twin.running
    after_first = shared.channels
    assert after_first < before  # the first app's channels were UNLISTENed
    await second.pubsub_manager.publish("ch", "hello")
    await wait_for(lambda: got["twin"] == ["hello"])
    assert got["first"] == []

    await twin.stop()
    # The twin's channels are the second's too: they stay LISTENed.
    assert shared.channels == after_first
    await second.pubsub_manager.publish("ch", "again")
    await wait_for(lambda: got["second"] == ["hello", "again"])


async def test_coordinators_on_different_loops_never_share_a_connection(dsn: str) -> None:
    blocking = pgcoord.BlockingCoordinator(dsn, app="threaded")
    try:
        blocking.start()
        async with pgcoord.Coordinator(dsn, app="looped") as coord:
            other = blocking.coordinator.listener.backend_pid
            assert other is not None
            assert coord.listener.backend_pid != other
    finally:
        blocking.close()


async def test_the_last_stop_closes_the_shared_connections(
    make_coord: CoordFactory, dsn: str
) -> None:
    coords = [await make_coord(app=f"a{i}") for i in range(3)]
    for coord in coords:
        await coord.stop()
    await wait_for(lambda: client_backends(dsn) == 0)


async def test_start_waits_for_a_connection_slot_instead_of_failing(dsn: str) -> None:
    with limited_role(dsn, 2) as role_dsn:
        holders = [psycopg.connect(role_dsn) for _ in range(2)]  # the role's limit is reached

        async def release_later() -> None:
            await asyncio.sleep(1.0)
            for holder in holders:
                holder.close()

        releaser = asyncio.create_task(release_later())
        coord = pgcoord.Coordinator(role_dsn, app="patient", connect_timeout=10)
        started = time.monotonic()
        try:
            await coord.start()
            assert coord.running
            assert time.monotonic() - started >= 1.0  # it waited for the slots, then got them
            await coord.cache.set("k", 1)
            assert await coord.cache.get("k") == 1
        finally:
            await coord.stop()
            await releaser
            for holder in holders:
                holder.close()


async def test_start_against_a_server_that_stays_full_fails_naming_the_host(dsn: str) -> None:
    with limited_role(dsn, 1) as role_dsn, psycopg.connect(role_dsn):
        coord = pgcoord.Coordinator(role_dsn, app="refused", connect_timeout=2)
        with pytest.raises(pgcoord.ConnectionFailedError, match="too many connections"):
            await coord.start()
        assert not coord.running


async def test_a_refused_growth_keeps_serving_callers_on_the_connections_it_has(
    dsn: str,
) -> None:
    # The role may hold 2 connections: the listener and one pooled. The budget allows 4, so
    # the pool tries to grow under load and is refused; callers must still all be served.
    with limited_role(dsn, 2) as role_dsn:
        async with pgcoord.Coordinator(role_dsn, app="grow", connect_timeout=10) as coord:

            async def work(i: int) -> int:
                async with coord._rt.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.02)")
                return i

            assert await asyncio.gather(*(work(i) for i in range(40))) == list(range(40))
            assert (
                client_backends(dsn, user=psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]) <= 2
            )
