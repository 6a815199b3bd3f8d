"""Locks under churn, crashes and bad input (issue 11): no rows left behind, no raw errors."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord import names
from tests.support import CoordFactory, processes, spawn

APP = "locktest"  # the workers' app


def lease_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pgcoord.lock_leases").fetchone()
    assert row is not None
    return int(row[0])


def advisory_locks(dsn: str) -> int:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND d.datname = %s",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def eventually(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.1)


# -- rows per lock and per instance (defect 8, under the lease design) -------------------------


@pytest.mark.slow
async def test_ten_thousand_distinct_keys_taken_and_released_leave_no_rows(
    make_coord: CoordFactory, dsn: str
) -> None:
    first, second = await make_coord(app=APP), await make_coord(app=APP)
    # Short sections (released on their session), ...
    for i in range(10_000):
        lock = await first.lock_manager.acquire(f"short-{i}")
        await lock.release()
    assert lease_rows(dsn) == 0

    # ... sections long enough to be promoted to a lease row, ...
    async def held(manager: pgcoord.LockManager, key: str) -> None:
        async with manager.lock(key):
            await asyncio.sleep(0.1)

    await asyncio.gather(*(held(first.lock_manager, f"long-{i}") for i in range(200)))
    # ... and contended keys, whose waiters mark them wanted.
    await asyncio.gather(
        *(
            held(manager.lock_manager, f"both-{i}")
            for i in range(100)
            for manager in (first, second)
        )
    )
    # try_acquire giving up while the key is held leaves its mark; the release clears it.
    holder = await first.lock_manager.acquire("given-up")
    with pytest.raises(pgcoord.LockAcquireError):
        await second.lock_manager.try_acquire("given-up", timeout=0.3)
    await holder.release()
    assert lease_rows(dsn) == 0


@pytest.mark.slow
async def test_a_killed_holders_lease_rows_do_not_stay(make_coord: CoordFactory, dsn: str) -> None:
    coord = await make_coord(app=APP, lock_sweep_interval=0.5)
    with processes() as procs:
        holder = spawn("tests.workers.locks_worker", "serve", dsn=dsn)
        procs.append(holder)
        holder.expect("ready")
        for key in ("k1", "k2", "k3"):
            holder.send({"op": "acquire", "key": key, "ttl": 300})
            holder.expect("acquired")
        await eventually(lambda: lease_rows(dsn) == 3, "promotion of the three locks")
        with pytest.raises(pgcoord.LockAcquireError):
            await coord.lock_manager.try_acquire("k1")  # a waiter marks it wanted, too
        holder.kill()
        # Nobody takes these keys again: the surviving instance removes the dead holder's rows.
        await eventually(lambda: lease_rows(dsn) == 0, "removal of the dead holder's rows")
        lock = await coord.lock_manager.try_acquire("k2")
        await lock.release()
    assert lease_rows(dsn) == 0


@pytest.mark.slow
async def test_an_expired_lease_row_of_a_frozen_holder_does_not_stay(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(app=APP, lock_sweep_interval=0.5)
    with processes() as procs:
        holder = spawn("tests.workers.locks_worker", "serve", dsn=dsn)
        procs.append(holder)
        holder.expect("ready")
        holder.send({"op": "acquire", "key": "k", "ttl": 1.0})
        holder.expect("acquired")
        await eventually(lambda: lease_rows(dsn) == 1, "promotion")
        holder.stop()  # frozen: it neither releases nor extends
        await eventually(lambda: lease_rows(dsn) == 0, "removal of the expired row")
        lock = await coord.lock_manager.try_acquire("k")
        await lock.release()
        holder.cont()
        holder.send({"op": "release"})  # its release finds nothing, and calls the lock lost
        holder.expect("released")
        holder.send({"op": "lost"})
        assert holder.expect("lost")["lost"] is True
    assert lease_rows(dsn) == 0


async def test_a_live_holders_row_is_never_swept(make_coord: CoordFactory, dsn: str) -> None:
    sweeper = await make_coord(app=APP, lock_sweep_interval=0.2)
    holder = await make_coord(app="other")
    lock = await holder.lock_manager.acquire("k", ttl=None)
    await lock.promote()
    assert lease_rows(dsn) == 1
    await asyncio.sleep(1.0)  # several sweeps
    assert lease_rows(dsn) == 1 and lock.held
    assert [h.key for h in await holder.lock_manager.holders()] == ["k"]
    with pytest.raises(pgcoord.LockAcquireError):
        await holder.lock_manager.try_acquire("k", timeout=0.1)
    await lock.release()
    assert sweeper.running


async def test_a_waiters_mark_stays_while_the_key_is_held_and_goes_once_it_is_free(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(app=APP, lock_sweep_interval=0.2)
    keys = [f"marked-{i}" for i in range(16)]
    # Advisory keys of both signs: pg_locks shows them split in two unsigned halves.
    signs = {names.advisory_key("pgcoord", APP, "locks", key) < 0 for key in keys}
    assert signs == {True, False}
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for key in keys:  # held by another transaction, so the try below marks it wanted
            await coord.lock_manager.xact_lock(key, transaction=conn)
        for key in keys:
            with pytest.raises(pgcoord.LockAcquireError):
                await coord.lock_manager.try_acquire(key, timeout=0.2)
        assert lease_rows(dsn) == len(keys)
        await asyncio.sleep(1.0)  # several sweeps: the keys are held, the marks matter
        assert lease_rows(dsn) == len(keys)
        await conn.commit()  # free now, and nobody left to wake
    await eventually(lambda: lease_rows(dsn) == 0, "removal of the marks on free keys")


# -- infinite and huge durations (issue 11) ----------------------------------------------------


async def test_infinite_timeouts_and_ttls_work_in_every_path(make_coord: CoordFactory) -> None:
    coord, other = await make_coord(), await make_coord()
    locks = coord.lock_manager
    inf = math.inf
    lock = await locks.try_acquire("a", timeout=inf)  # free
    await lock.release()
    lock = await locks.try_acquire("a", timeout=inf, ttl=inf)
    assert lock.ttl is None and lock.remaining is None
    await lock.extend(inf)
    await lock.extend(5.0)
    assert lock.ttl == 5.0
    await lock.extend(inf)
    assert lock.ttl is None
    assert await lock.run_exclusive(lambda: 1, ttl=inf) == 1
    assert await locks.run_exclusive("a", lambda: 2, ttl=inf) == 2
    async with locks.lock("a", ttl=inf) as held:
        assert held.ttl is None
    lock = await locks.acquire("a", ttl=inf)
    # Contended within this process (the key's local queue) and by another instance.
    local = asyncio.create_task(locks.try_acquire("a", timeout=inf))
    remote = asyncio.create_task(other.lock_manager.try_acquire("a", timeout=inf))
    await asyncio.sleep(0.3)
    assert not local.done() and not remote.done()
    await lock.release()
    # Both get it in turn: whichever has it releases, and the other one follows.
    pending = {local, remote}
    while pending:
        done, pending = await asyncio.wait(pending, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert done, "neither waiter got the released lock"
        for task in done:
            await task.result().release()


@pytest.mark.parametrize("value", [10**400, 1e300, 2e9, -math.inf, math.nan])
async def test_huge_or_bad_durations_are_refused_before_anything_is_written(
    coord: pgcoord.Coordinator, dsn: str, value: float
) -> None:
    locks = coord.lock_manager
    lock = await locks.acquire("held", ttl=None)
    calls = [
        lambda: locks.acquire("k", ttl=value),
        lambda: locks.try_acquire("k", timeout=value),
        lambda: locks.try_acquire("k", ttl=value),
        lambda: locks.run_exclusive("k", lambda: None, ttl=value),
        lambda: lock.extend(value),
        lambda: lock.run_exclusive(lambda: None, ttl=value),
    ]
    for call in calls:
        with pytest.raises(pgcoord.InvalidInputError):
            await call()
    with pytest.raises(pgcoord.InvalidInputError):
        locks.lock("k", ttl=value)
    assert lock.held and lock.ttl is None
    await lock.release()
    assert lease_rows(dsn) == 0 and advisory_locks(dsn) == 0


# -- keys Postgres text cannot hold (issue 11, defect 6) ---------------------------------------


@pytest.mark.parametrize("key", ["a\x00b", "\x00", "a\ud800", "\udfff", "x\ud83d\ude00"])
async def test_keys_with_nul_or_surrogates_are_refused_by_every_method(
    coord: pgcoord.Coordinator, dsn: str, key: str
) -> None:
    locks = coord.lock_manager
    with pytest.raises(pgcoord.InvalidInputError):
        await locks.acquire(key)
    with pytest.raises(pgcoord.InvalidInputError):
        await locks.try_acquire(key, timeout=1.0)
    with pytest.raises(pgcoord.InvalidInputError):
        await locks.run_exclusive(key, lambda: None)
    with pytest.raises(pgcoord.InvalidInputError):
        locks.lock(key)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        with pytest.raises(pgcoord.InvalidInputError):
            await locks.xact_lock(key, transaction=conn)
        await conn.rollback()
    with psycopg.connect(dsn) as sync_conn, pytest.raises(pgcoord.InvalidInputError):
        await asyncio.to_thread(locks.xact_lock_sync, key, transaction=sync_conn)
    assert lease_rows(dsn) == 0 and advisory_locks(dsn) == 0
    assert locks.connection_stats()["held"] == 0
