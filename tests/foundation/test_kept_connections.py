"""Runtime.connection(): warm connections are reused, never hoarded from waiting borrowers."""

from __future__ import annotations

import asyncio

from pgcoord import _kept
from tests.support import CoordFactory


async def _backend_pid(coord: object) -> int:
    async with coord._rt.connection() as conn:  # type: ignore[attr-defined]
        return conn.info.backend_pid


async def test_back_to_back_borrows_reuse_the_last_connection(make_coord: CoordFactory) -> None:
    coord = await make_coord(max_connections=5)

    # Grow the pool to several connections first, so a FIFO pool would rotate among them.
    async def hold() -> None:
        async with coord._rt.connection():
            await asyncio.sleep(0.05)

    await asyncio.gather(*(hold() for _ in range(4)))
    first = await _backend_pid(coord)
    assert [await _backend_pid(coord) for _ in range(10)] == [first] * 10


async def test_borrowers_waiting_on_a_small_pool_are_never_starved(
    make_coord: CoordFactory,
) -> None:
    coord = await make_coord(max_connections=2, connect_timeout=5)

    async def work(i: int) -> int:
        async with coord._rt.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.01)")
        return i

    # Far more concurrent borrowers than connections: each must be handed one in time.
    assert await asyncio.gather(*(work(i) for i in range(40))) == list(range(40))


async def test_kept_connections_go_back_to_the_pool_when_quiet(make_coord: CoordFactory) -> None:
    coord = await make_coord(max_connections=5)
    await _backend_pid(coord)
    assert coord.pool.get_stats()["pool_available"] == 0  # kept out of the pool, warm
    await asyncio.sleep(_kept.HOLD * 2.5)
    assert coord.pool.get_stats()["pool_available"] >= 1


async def test_a_bursts_surplus_goes_back_while_light_traffic_continues(
    make_coord: CoordFactory,
) -> None:
    coord = await make_coord(max_connections=5)

    async def hold() -> None:
        async with coord._rt.connection():
            await asyncio.sleep(0.05)

    await asyncio.gather(*(hold() for _ in range(4)))
    assert coord.pool.get_stats()["pool_available"] == 0  # all four kept warm
    # One borrower at a time, never a second of quiet: only the top connection is reused, so
    # the other three must age out to the pool (where it can close them when idle).
    loop = asyncio.get_running_loop()
    until = loop.time() + _kept.HOLD * 2.5
    while loop.time() < until:
        await _backend_pid(coord)
        await asyncio.sleep(_kept.HOLD / 5)
    assert coord.pool.get_stats()["pool_available"] >= 3
