"""LockManager at its edges: isolation levels, holder deaths seen by waiters, cancellation at
every await, fairness between instances, and the loss of the process's LISTEN session."""

from __future__ import annotations

import asyncio
import random
import time

import psycopg
import pytest

import pgcoord
from tests.locks.test_api import APP, two
from tests.support import CoordFactory, terminate_backend
from tests.support import wait_until as wait_for


async def test_xact_lock_refuses_a_transaction_that_cannot_see_promoted_leases(
    make_coord: CoordFactory, dsn: str
) -> None:
    # A REPEATABLE READ snapshot taken before a lease was promoted would not see it, and the
    # xact lock would be granted beside the holder: it is refused instead, retryably.
    a, b = await two(make_coord)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.execute("SELECT 1")  # the snapshot is taken
        lock = await b.lock_manager.acquire("k", ttl=30)
        await wait_for(lambda: lock.promoted)
        with pytest.raises(pgcoord.DatabaseError) as raised:
            await a.lock_manager.xact_lock("k", transaction=conn)
        assert raised.value.sqlstate == "40001"
        await conn.rollback()
        assert lock.held
        await lock.release()


async def test_a_waiting_xact_lock_sees_the_lease_holders_death(
    make_coord: CoordFactory, dsn: str
) -> None:
    a = await make_coord(app=APP)
    holder = await make_coord(app=APP, dsn=dsn + " application_name=holder")
    lock = await holder.lock_manager.acquire("k", ttl=300)
    await wait_for(lambda: lock.promoted)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        waiting = asyncio.create_task(a.lock_manager.xact_lock("k", transaction=conn))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        pid = lock.backend_pid  # the holder process's LISTEN session
        assert pid is not None and terminate_backend(dsn, pid)
        await asyncio.wait_for(waiting, 2.0)  # the bound for a holder's death
        await conn.rollback()
    await wait_for(lambda: lock.lost)


async def test_cancelled_acquisitions_at_any_moment_leave_no_lock_behind(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    rng = random.Random(3)
    for round_ in range(20):
        held = await b.lock_manager.acquire(f"c{round_}")
        waiter = asyncio.create_task(a.lock_manager.acquire(f"c{round_}", ttl=None))
        await asyncio.sleep(rng.random() * 0.05)
        releasing = asyncio.create_task(held.release())
        await asyncio.sleep(rng.random() * 0.01)
        waiter.cancel()
        await releasing
        got = await asyncio.gather(waiter, return_exceptions=True)
        if isinstance(got[0], pgcoord.Lock):
            await got[0].release()  # granted before the cancel landed: it is the caller's
        # Whatever happened, the key is free again and nothing is left held.
        again = await b.lock_manager.try_acquire(f"c{round_}", timeout=5)
        await again.release()
    assert a.lock_manager.connection_stats()["held"] == 0
    assert len(a.lock_manager._gates) == 0


async def test_another_instance_gets_a_turn_while_this_one_keeps_handing_over(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    stop = time.monotonic() + 6

    async def local_hog() -> None:
        while time.monotonic() < stop:
            async with a.lock_manager.lock("hot"):
                await asyncio.sleep(0.001)

    hogs = [asyncio.create_task(local_hog()) for _ in range(4)]
    await asyncio.sleep(0.2)
    waits = []
    try:
        for _ in range(5):
            started = time.monotonic()
            lock = await b.lock_manager.try_acquire("hot", timeout=4)
            waits.append(time.monotonic() - started)
            await lock.release()
    finally:
        await asyncio.gather(*hogs)
    # Bounded: at most LOCAL_HANDOFFS short holds of the other instance, then its turn.
    assert max(waits) < 1.0, waits


async def test_losing_the_listener_loses_promoted_locks_and_frees_them(
    make_coord: CoordFactory, dsn: str
) -> None:
    a = await make_coord(app=APP)
    holder = await make_coord(app=APP, dsn=dsn + " application_name=holder")
    locks = [await holder.lock_manager.acquire(f"l{i}", ttl=300) for i in range(3)]
    await wait_for(lambda: all(lock.promoted for lock in locks))
    pid = locks[0].backend_pid
    assert pid is not None and terminate_backend(dsn, pid)
    await wait_for(lambda: all(lock.lost for lock in locks), timeout=1.0)
    for i in range(3):  # free for others at once, long before the 300 s lease
        other = await a.lock_manager.try_acquire(f"l{i}", timeout=2.0)
        await other.release()
    with pytest.raises(pgcoord.LockLostError):
        await locks[0].extend()
