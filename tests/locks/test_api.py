"""LockManager in one process: the API, leases, tokens, holders, xact locks, budget, stop."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord.locks import lease
from tests.support import CoordFactory, client_backends, terminate_backend
from tests.support import wait_until as wait_for

APP = "locktest"


async def two(make_coord: CoordFactory, **options: Any) -> tuple[pgcoord.Coordinator, ...]:
    """Two instances of the same app in this process (they share its listener and pool, as
    Coordinators of one process do; tests that need two holder identities use two DSNs)."""
    return (await make_coord(app=APP, **options), await make_coord(app=APP, **options))


async def test_acquire_release_and_try(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    lock = await a.lock_manager.acquire("report")
    assert lock.held and not lock.lost and lock.key == "report" and lock.ttl == 30.0
    with pytest.raises(pgcoord.LockAcquireError):
        await b.lock_manager.try_acquire("report")
    with pytest.raises(pgcoord.LockAcquireError):
        await b.lock_manager.try_acquire("report", timeout=0.2)
    await lock.release()
    assert not lock.held and not lock.lost
    other = await b.lock_manager.try_acquire("report")
    assert other.token > lock.token
    await other.release()


async def test_second_acquirer_waits_for_the_release(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    first = await a.lock_manager.acquire("k")
    waiting = asyncio.create_task(b.lock_manager.acquire("k"))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # still waiting: the first holds it
    await first.release()
    second = await asyncio.wait_for(waiting, 15)
    assert second.token > first.token
    await second.release()


async def test_try_acquire_with_timeout_gets_a_lock_released_in_time(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    first = await a.lock_manager.acquire("k")
    asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(first.release()))
    second = await b.lock_manager.try_acquire("k", timeout=15)
    assert second.token > first.token
    await second.release()


async def test_two_concurrent_try_acquire_exactly_one_wins(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    attempts = [m.try_acquire("race") for m in (a.lock_manager, b.lock_manager) for _ in range(4)]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    winners = [r for r in results if isinstance(r, pgcoord.Lock)]
    assert len(winners) == 1
    assert all(isinstance(r, pgcoord.LockAcquireError) for r in results if r not in winners)
    await winners[0].release()


async def test_ttl_expiry_lets_the_next_holder_in_and_the_old_one_sees_lost(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    first = await a.lock_manager.acquire("k", ttl=0.5)
    second = await b.lock_manager.acquire("k")  # waits until the lease ends
    assert first.lost and not first.held
    assert second.token > first.token
    with pytest.raises(pgcoord.LockLostError):
        await first.extend()
    await first.release()  # a no-op: it must not free the new holder
    with pytest.raises(pgcoord.LockAcquireError):
        await a.lock_manager.try_acquire("k")
    assert [h.pid for h in await a.lock_manager.holders()] == [second.backend_pid]
    await second.release()


async def test_extend_keeps_the_lock_past_its_first_ttl(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    lock = await a.lock_manager.acquire("k", ttl=0.6)
    for _ in range(5):
        await asyncio.sleep(0.3)
        await lock.extend()
    assert lock.held
    with pytest.raises(pgcoord.LockAcquireError):
        await b.lock_manager.try_acquire("k")
    await lock.extend(60)
    assert lock.ttl == 60.0
    assert (await a.lock_manager.holders())[0].ttl == 60.0
    await lock.release()


async def test_lock_without_lease(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    lock = await a.lock_manager.acquire("k", ttl=None)
    assert lock.ttl is None and lock.remaining is None
    await lock.extend()
    with pytest.raises(pgcoord.LockAcquireError):
        await b.lock_manager.try_acquire("k")
    await lock.release()


async def test_terminated_session_frees_the_lock_and_the_holder_sees_lost(
    make_coord: CoordFactory, dsn: str
) -> None:
    a, b = await two(make_coord)
    lock = await a.lock_manager.acquire("k", ttl=300)
    assert lock.backend_pid is not None
    assert terminate_backend(dsn, lock.backend_pid)
    await wait_for(lambda: lock.lost)
    other = await b.lock_manager.try_acquire("k", timeout=2.0)  # the bound
    with pytest.raises(pgcoord.LockLostError):
        await lock.extend()
    await lock.release()  # no-op
    assert (await b.lock_manager.holders())[0].pid == other.backend_pid
    await other.release()


async def test_run_exclusive_returns_sync_and_async_results(make_coord: CoordFactory) -> None:
    (a,) = (await make_coord(app=APP),)

    async def compute() -> int:
        return 2

    assert await a.lock_manager.run_exclusive("k", lambda: 1) == 1
    assert await a.lock_manager.run_exclusive("k", compute) == 2
    with pytest.raises(ZeroDivisionError):
        await a.lock_manager.run_exclusive("k", lambda: 1 / 0)
    assert await a.lock_manager.holders() == []  # released after an error too
    lock = await a.lock_manager.acquire("k")
    assert await lock.run_exclusive(compute, ttl=5) == 2
    assert not lock.held and not lock.lost
    with pytest.raises(pgcoord.LockError):
        await lock.run_exclusive(compute)  # already released


async def test_run_exclusive_raises_lost_when_the_lease_ended_during_fn(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    got_in: list[int] = []

    async def slow() -> str:
        # Meanwhile another instance takes the lock once the lease ended.
        other = await b.lock_manager.acquire("k")
        got_in.append(other.token)
        await other.release()
        return "result nobody should trust"

    with pytest.raises(pgcoord.LockLostError):
        await a.lock_manager.run_exclusive("k", slow, ttl=0.4)
    assert len(got_in) == 1

    with pytest.raises(pgcoord.LockLostError):
        async with a.lock_manager.lock("k", ttl=0.3):
            await asyncio.sleep(0.6)


async def test_tasks_of_one_process_exclude_each_other(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord, lock_max_connections=3)
    inside = 0
    most = 0
    tokens: list[int] = []

    async def critical(manager: pgcoord.LockManager) -> None:
        nonlocal inside, most
        async with manager.lock("shared") as lock:
            tokens.append(lock.token)
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.002)
            inside -= 1

    await asyncio.gather(
        *(critical(m) for m in (a.lock_manager, b.lock_manager) for _ in range(15))
    )
    assert most == 1
    assert tokens == sorted(tokens) and len(set(tokens)) == 30
    # However many tasks queued, each process had at most one session on the key at a time.
    assert a.lock_manager.connection_stats()["open"] <= 1


async def test_try_acquire_while_another_task_holds_it(make_coord: CoordFactory) -> None:
    a = await make_coord(app=APP)
    lock = await a.lock_manager.acquire("k")
    with pytest.raises(pgcoord.LockAcquireError):
        await a.lock_manager.try_acquire("k")
    with pytest.raises(pgcoord.LockAcquireError):
        await a.lock_manager.try_acquire("k", timeout=0.1)
    await lock.release()
    again = await a.lock_manager.try_acquire("k")
    await again.release()


async def test_release_twice_and_stale_release(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    first = await a.lock_manager.acquire("k")
    await first.release()
    await first.release()  # idempotent
    second = await a.lock_manager.acquire("k")  # same process: likely the same connection
    await first.release()  # stale: must not free the second holder
    assert second.held
    with pytest.raises(pgcoord.LockAcquireError):
        await b.lock_manager.try_acquire("k")
    await second.release()


async def test_holders_lists_live_holders_of_this_app(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    elsewhere = await make_coord(app="otherapp")
    assert await a.lock_manager.holders() == []
    before = time.time()
    one = await a.lock_manager.acquire("alpha", ttl=20)
    two_ = await b.lock_manager.acquire("béta ✓", ttl=None)
    theirs = await elsewhere.lock_manager.acquire("alpha")  # another app: its own namespace
    holders = await b.lock_manager.holders()
    assert [(h.key, h.instance_id, h.ttl, h.pid) for h in holders] == [
        ("alpha", a.instance_id, 20.0, one.backend_pid),
        ("béta ✓", b.instance_id, None, two_.backend_pid),
    ]
    assert holders[0].since is not None and before - 5 < holders[0].since < time.time() + 5
    assert holders[0].expires_in is not None and 0 < holders[0].expires_in <= 20
    assert holders[1].expires_in is None  # no lease
    since = holders[0].since
    await asyncio.sleep(0.2)
    await one.extend(40)  # moves the lease, not the start of the holding
    (extended,) = [h for h in await b.lock_manager.holders() if h.key == "alpha"]
    assert extended.ttl == 40.0 and extended.since is not None
    assert abs(extended.since - since) < 0.15
    await one.release()
    assert [h.key for h in await a.lock_manager.holders()] == ["béta ✓"]
    await two_.release()
    await theirs.release()
    assert await a.lock_manager.holders() == []


async def test_xact_lock_holds_until_commit_or_rollback(make_coord: CoordFactory, dsn: str) -> None:
    a, b = await two(make_coord)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await a.lock_manager.xact_lock("k", transaction=conn)
        with pytest.raises(pgcoord.LockAcquireError):
            await b.lock_manager.try_acquire("k")  # session locks and xact locks exclude
        await conn.commit()
        lock = await b.lock_manager.try_acquire("k")
        waiting = asyncio.create_task(a.lock_manager.xact_lock("k", transaction=conn))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # waits for the session lock
        await lock.release()
        await asyncio.wait_for(waiting, 15)
        await conn.rollback()
        again = await b.lock_manager.try_acquire("k")
        await again.release()


def test_xact_lock_sync_with_a_sqlalchemy_session(dsn: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    async def start() -> pgcoord.Coordinator:
        coord = pgcoord.Coordinator(dsn, app=APP)
        await coord.start()
        return coord

    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), poolclass=sa.pool.NullPool
    )
    loop = asyncio.new_event_loop()
    coord = loop.run_until_complete(start())
    try:
        with Session(engine) as session:
            coord.lock_manager.xact_lock_sync("k", transaction=session)
            with pytest.raises(pgcoord.LockAcquireError):
                loop.run_until_complete(coord.lock_manager.try_acquire("k"))
            session.rollback()
        lock = loop.run_until_complete(coord.lock_manager.try_acquire("k"))
        loop.run_until_complete(lock.release())
    finally:
        loop.run_until_complete(coord.stop())
        loop.close()
        engine.dispose()


async def test_bad_input_fails_before_any_io(make_coord: CoordFactory, dsn: str) -> None:
    a = await make_coord(app=APP)
    locks = a.lock_manager
    for key in ("", "x" * 256):
        with pytest.raises(ValueError):
            await locks.acquire(key)
    for key in (None, 1, b"k"):
        with pytest.raises(TypeError):
            await locks.try_acquire(key)  # type: ignore[arg-type]
    for ttl in (0, -1):
        with pytest.raises(ValueError):
            await locks.acquire("k", ttl=ttl)
        with pytest.raises(ValueError):
            locks.lock("k", ttl=ttl)
    with pytest.raises(ValueError):
        await locks.try_acquire("k", timeout=-1)
    with pytest.raises(TypeError):
        await locks.run_exclusive("k", "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await locks.xact_lock("k", transaction="not a connection")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(ValueError):  # autocommit outside a transaction: nothing to scope to
            await locks.xact_lock("k", transaction=conn)
    lock = await locks.acquire("k")
    with pytest.raises(ValueError):
        await lock.extend(0)
    with pytest.raises(TypeError):
        await lock.run_exclusive(42)  # type: ignore[arg-type]
    assert lock.held
    await lock.release()
    assert await locks.holders() == []
    with pytest.raises(ValueError):
        pgcoord.Coordinator(dsn, lock_max_connections=0)
    with pytest.raises(ValueError):
        pgcoord.Coordinator(dsn, lock_idle_timeout=0)
    with pytest.raises(ValueError):
        pgcoord.Coordinator(dsn, lock_recheck=0)


async def test_use_after_stop(make_coord: CoordFactory, dsn: str) -> None:
    a, b = await two(make_coord)
    lock = await a.lock_manager.acquire("k")
    await a.stop()
    assert lock.lost  # its lease ended with the Coordinator
    with pytest.raises(pgcoord.NotRunningError):
        await lock.extend()
    with pytest.raises(pgcoord.NotRunningError):
        await lock.run_exclusive(lambda: None)
    await lock.release()  # no-op
    with pytest.raises(pgcoord.NotRunningError):
        await a.lock_manager.acquire("k")
    with pytest.raises(pgcoord.NotRunningError):
        await a.lock_manager.holders()
    again = await b.lock_manager.try_acquire("k", timeout=10)  # freed by the stop
    await again.release()


async def test_stop_ends_waiting_acquirers_and_context_reports_it(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    held = await b.lock_manager.acquire("k")
    waiting = asyncio.create_task(a.lock_manager.acquire("k"))
    await asyncio.sleep(0.2)
    await a.stop()
    with pytest.raises(pgcoord.NotRunningError):
        await waiting
    await held.release()

    c = await make_coord(app=APP)
    with pytest.raises(pgcoord.NotRunningError):
        async with c.lock_manager.lock("k"):
            await c.stop()


async def test_held_locks_cost_no_connections(make_coord: CoordFactory, dsn: str) -> None:
    a = await make_coord(app=APP)
    b = await make_coord(app=APP)
    before = client_backends(dsn)
    held = [await a.lock_manager.acquire(f"key-{i}") for i in range(50)]
    await wait_for(lambda: all(lock.promoted for lock in held))
    assert a.lock_manager.connection_stats()["open"] == 0
    # Fresh locks use at most two work connections at once (older ones are promoted), not 50.
    assert client_backends(dsn) <= before + 2
    # Still exclusive: another instance cannot take any of them.
    for i in (0, 25, 49):
        with pytest.raises(pgcoord.LockAcquireError):
            await b.lock_manager.try_acquire(f"key-{i}")
    for lock in held:
        await lock.release()
    again = await b.lock_manager.try_acquire("key-7")
    await again.release()


async def test_a_fresh_lock_lends_its_connection_back_after_a_moment(
    make_coord: CoordFactory,
) -> None:
    a = await make_coord(app=APP)
    lock = await a.lock_manager.acquire("k")
    assert a.lock_manager.connection_stats()["open"] == 1 and not lock.promoted
    await wait_for(lambda: lock.promoted)
    stats = a.lock_manager.connection_stats()
    assert stats["open"] == 0 and stats["held"] == 1
    await lock.release()
    await a.lock_manager.run_exclusive("k", lambda: None)
    assert a.lock_manager.connection_stats()["open"] == 0


async def test_cancelled_waiter_leaves_nothing_behind(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    held = await b.lock_manager.acquire("k")
    waiting = asyncio.create_task(a.lock_manager.acquire("k"))
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await held.release()
    lock = await a.lock_manager.try_acquire("k", timeout=10)
    assert a.lock_manager.connection_stats()["held"] == 1
    await lock.release()


async def test_apps_do_not_share_locks(make_coord: CoordFactory) -> None:
    mine = await make_coord(app="appone")
    theirs = await make_coord(app="apptwo")
    lock = await mine.lock_manager.acquire("same-key")
    other = await theirs.lock_manager.try_acquire("same-key")
    await lock.release()
    await other.release()


async def test_tokens_increase_across_keys_and_instances(make_coord: CoordFactory) -> None:
    a, b = await two(make_coord)
    seen = []
    for manager in (a.lock_manager, b.lock_manager, a.lock_manager):
        for key in ("x", "y"):
            lock = await manager.acquire(key)
            seen.append(lock.token)
            await lock.release()
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert lease.split_token(seen[0])[0] >= 1


async def test_waiters_hold_no_connection_and_are_woken_by_the_release(
    make_coord: CoordFactory, dsn: str
) -> None:
    a, b = await two(make_coord)
    held = await a.lock_manager.acquire("k")
    waiting = [asyncio.create_task(b.lock_manager.acquire("k")) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in waiting)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert await cur.fetchone() == (0,)  # nobody waits in a statement on the server
    assert b.lock_manager.connection_stats()["open"] == 0
    started = time.monotonic()
    await held.release()
    first = await asyncio.wait_for(asyncio.shield(waiting[0]), 15)
    # Woken by the release's NOTIFY, not by the once-a-second recheck.
    assert time.monotonic() - started < 0.9
    await first.release()
    for task in waiting[1:]:
        await (await asyncio.wait_for(task, 15)).release()


def test_blocking_api(dsn: str) -> None:
    with (
        pgcoord.BlockingCoordinator(dsn, app=APP) as a,
        pgcoord.BlockingCoordinator(dsn, app=APP) as b,
    ):
        with a.lock_manager.lock("k", ttl=30) as lock:
            assert lock.held and lock.token > 0
            with pytest.raises(pgcoord.LockAcquireError):
                b.lock_manager.try_acquire("k")
        assert b.lock_manager.run_exclusive("k", lambda: 7) == 7
        with psycopg.connect(dsn) as conn:
            a.lock_manager.xact_lock("k", transaction=conn)
            with pytest.raises(pgcoord.LockAcquireError):
                b.lock_manager.try_acquire("k")
            conn.rollback()
        again = b.lock_manager.try_acquire("k")
        again.release()


async def test_a_crash_reset_of_the_token_state_starts_a_new_epoch(
    make_coord: CoordFactory, dsn: str
) -> None:
    # What crash recovery does, without a crash: every session ends, the live epoch row
    # vanishes and the UNLOGGED sequence starts again at 1. Tokens must keep increasing, both
    # from the first acquisition on a fresh session and from re-takes on a warm one.
    a = await make_coord(app=APP)
    tokens = []
    for _ in range(3):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            # A crash ends every session: the pool's, the listener's.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            await conn.execute("DELETE FROM pgcoord.lock_epoch_live")
            await conn.execute("ALTER SEQUENCE pgcoord.lock_token_seq RESTART")
        for _ in range(3):
            lock = await a.lock_manager.acquire("k")  # first: a dead session, retried on a new one
            tokens.append(lock.token)
            await lock.release()
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    epochs = [lease.split_token(t)[0] for t in tokens]
    assert len(set(epochs)) == 3


async def test_stress_tasks_of_two_instances_on_few_keys(
    make_coord: CoordFactory, dsn: str
) -> None:
    # Many tasks, few keys, a tight connection budget, tries with and without timeouts, and
    # cancellations: nobody ever shares a key, and nothing (connections, gates, locks) leaks.
    # (A lock_timeout that fires just as the lock is granted leaves the lock held by the
    # session; a pooled session must never keep it.)
    # Idle connections live long here: one that kept a lock would stall the others for good.
    a, b = await two(make_coord, lock_max_connections=4, lock_idle_timeout=600)
    rng = random.Random(7)
    inside: dict[str, int] = {}
    overlaps = 0
    done = 0

    async def worker(manager: pgcoord.LockManager, seed: int) -> None:
        nonlocal overlaps, done
        local = random.Random(seed)
        for _ in range(25):
            key = f"k{local.randrange(3)}"
            try:
                if local.random() < 0.3:
                    lock = await manager.try_acquire(key, timeout=local.choice([0.0, 0.01, 0.2]))
                else:
                    lock = await manager.acquire(key)
            except pgcoord.LockAcquireError:
                continue
            inside[key] = inside.get(key, 0) + 1
            overlaps += inside[key] > 1
            try:
                await asyncio.sleep(local.random() * 0.002)
            finally:  # also when cancelled here
                inside[key] -= 1
                await lock.release()
            done += 1

    tasks = [
        asyncio.create_task(worker(m, rng.randrange(10**6)))
        for m in (a.lock_manager, b.lock_manager)
        for _ in range(8)
    ]
    await asyncio.sleep(0.05)
    tasks[0].cancel()
    tasks[9].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    assert overlaps == 0 and done > 0
    for manager in (a.lock_manager, b.lock_manager):
        stats = manager.connection_stats()
        assert stats["held"] == 0 and stats["open"] <= 4
        assert len(manager._gates) == 0
    assert await a.lock_manager.holders() == []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND a.datname = current_database()"
        )
        assert await cur.fetchone() == (0,)
        cur = await conn.execute("SELECT count(*) FROM pgcoord.lock_leases WHERE token IS NOT NULL")
        assert await cur.fetchone() == (0,)


async def test_the_lease_counts_from_the_grant_not_from_the_request(
    make_coord: CoordFactory,
) -> None:
    a, b = await two(make_coord)
    first = await a.lock_manager.acquire("k", ttl=None)
    waiting = asyncio.create_task(b.lock_manager.acquire("k", ttl=1.0))
    await asyncio.sleep(1.5)  # longer than the waiter's ttl
    await first.release()
    second = await asyncio.wait_for(waiting, 15)
    assert second.held and not second.lost  # its lease starts when it got the lock
    await second.extend()
    await second.release()


async def test_promotion_never_leaves_the_key_free_in_between(
    make_coord: CoordFactory, dsn: str
) -> None:
    # A blocked xact_lock is granted the instant the session lets go of the advisory lock:
    # if the lease row were not committed by then, it would get in beside the holder.
    a, b = await two(make_coord)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for i in range(10):
            lock = await b.lock_manager.acquire(f"p{i}")
            waiting = asyncio.create_task(a.lock_manager.xact_lock(f"p{i}", transaction=conn))
            await wait_for(lambda lock=lock: lock.promoted)  # type: ignore[misc]
            await asyncio.sleep(0.05)
            assert not waiting.done(), f"round {i}: xact_lock got in during the promotion"
            await lock.release()
            await asyncio.wait_for(waiting, 15)
            await conn.rollback()
