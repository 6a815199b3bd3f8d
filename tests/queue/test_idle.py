"""Idle workers do not poll: what an idle instance costs the server, and what still wakes it.

An idle instance with a queue subscription must hold at most 2 connections (the listener and
one pooled) and send nothing, while delayed jobs, retries and a dead worker's jobs are still
found on time, with the safety poll (`queue_idle_poll`) and `interval` set far beyond the
waits below, so only the wake-ups under test can explain a pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import pgcoord
from tests.support import CoordFactory, processes, spawn
from tests.support import wait_until as _until

#: No safety poll, no `interval` poll within any test here.
NEVER = 600.0
#: Other services' periodic sweeps pushed out of the observation window too, so that the
#: silence test measures the queue alone.
QUIET_SERVICES = {
    "cache_sweep_interval": NEVER,
    "pubsub_spill_retention": NEVER,
    "sync_log_retention": NEVER,
    "lock_sweep_interval": NEVER,
}


def _backends(dsn: str) -> list[tuple[int, Any]]:
    """(pid, state_change) of every client backend on the test database but this query's."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, state_change FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() ORDER BY pid"
        ).fetchall()


@pytest.fixture
async def small_pool(dsn: str) -> AsyncIterator[AsyncConnectionPool]:
    """A shared pool (``Coordinator(pool=...)``) whose extra connections close after 1 s idle,
    so the test sees an instance settle without waiting for the default ``max_idle``."""
    pool = AsyncConnectionPool(
        dsn, min_size=1, max_size=10, max_idle=1.0, kwargs={"autocommit": True}, open=False
    )
    await pool.open(wait=True)
    yield pool
    await pool.close()


async def test_an_idle_subscribed_instance_holds_two_connections_and_sends_nothing(
    make_coord: CoordFactory, dsn: str, small_pool: AsyncConnectionPool
) -> None:
    coord = await make_coord(
        pool=small_pool, queue_lease=NEVER, queue_idle_poll=NEVER, **QUIET_SERVICES
    )
    eq = coord.event_queue
    done: list[int] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        await asyncio.sleep(0.01)
        done.append(message)

    # Activity first: a burst run 8 at a time grows the pool well past one connection. The
    # default `interval` (0.25 s) used to be an idle poll period; it must not be one now.
    await eq.subscribe("idle", process=process, concurrency=8)
    await asyncio.gather(*(eq.publish("idle", n) for n in range(200)))
    await _until(lambda: len(done) == 200)
    await eq.flush()
    # Then quiet: within the pool's max_idle of the last activity, the listener and one
    # pooled connection remain. (Polling every `interval` kept a second connection out of
    # the pool for good: 3.)
    await _until(lambda: len(_backends(dsn)) <= 2, timeout=30.0)
    listener = coord.listener.backend_pid
    before = [b for b in _backends(dsn) if b[0] != listener]
    assert len(before) == 1
    # And silent: the pooled backend runs no statement while the instance stays idle.
    await asyncio.sleep(3.0)
    after = [b for b in _backends(dsn) if b[0] != listener]
    assert after == before
    # Still subscribed, and woken by the very next publish.
    await eq.publish("idle", 200)
    await _until(lambda: 200 in done)


async def test_a_delayed_job_runs_at_its_time_without_polling(make_coord: CoordFactory) -> None:
    coord = await make_coord(queue_idle_poll=NEVER)
    eq = coord.event_queue
    started: list[float] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        started.append(time.monotonic())

    await eq.subscribe("later", process=process, interval=NEVER)
    await asyncio.sleep(0.2)  # the worker's first claim found nothing: it sleeps
    published = time.monotonic()
    await eq.publish("later", "x", delay=1.5)
    await _until(lambda: started, timeout=10.0)
    # Not before its time, and at its time rather than at a poll (none within NEVER).
    assert started[0] - published >= 1.5
    assert started[0] - published < 1.5 + 5.0


async def test_a_retry_runs_after_its_backoff_without_polling(make_coord: CoordFactory) -> None:
    coord = await make_coord(queue_idle_poll=NEVER)
    eq = coord.event_queue
    tries: list[tuple[int, float]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        tries.append((ctx.retried, time.monotonic()))
        if ctx.retried == 0:
            raise RuntimeError("first try fails")

    await eq.subscribe("again", process=process, interval=NEVER)
    await eq.publish("again", "x", max_retries=1)
    await _until(lambda: len(tries) == 2, timeout=10.0)
    # The first retry waits 0.5 s +-20%.
    assert [r for r, _ in tries] == [0, 1]
    assert tries[1][1] - tries[0][1] >= 0.4


async def test_a_publish_begun_after_subscribe_returns_wakes_the_new_worker(
    make_coord: CoordFactory, dsn: str
) -> None:
    # subscribe() returns once its worker is registered as a possible sleeper, so a publish
    # begun after it sends the NOTIFY even when it commits only after the worker's first claim
    # found nothing. Here the publish waits inside its statement for another transaction that
    # holds the same idempotency key; once that one rolls back, the job commits.
    coord = await make_coord(queue_idle_poll=NEVER)
    eq = coord.event_queue
    runs: list[Any] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        runs.append(message)

    def publish() -> asyncio.Task[int]:
        return asyncio.create_task(eq.publish("fresh", "x", idempotency_key="k"))

    async with (
        await psycopg.AsyncConnection.connect(dsn) as holder,
        await psycopg.AsyncConnection.connect(dsn) as locker,
    ):
        await eq.publish("fresh", "held", idempotency_key="k", transaction=holder)
        # The worker's registration is held back as long as the test can: had subscribe()
        # returned without it, the publish would begin before it and see no sleeper.
        await locker.execute("LOCK TABLE pgcoord.queue_waiters IN SHARE MODE")
        subscribing = asyncio.create_task(eq.subscribe("fresh", process=process, interval=NEVER))
        await asyncio.sleep(0.5)
        publishing = publish() if subscribing.done() else None
        await asyncio.sleep(0.3)
        await locker.commit()
        await subscribing
        publishing = publishing or publish()
        await asyncio.sleep(1.0)  # the worker claimed, found nothing, and sleeps
        assert not publishing.done()
        await holder.rollback()
    await publishing
    await _until(lambda: runs, timeout=10.0)
    assert runs == ["x"]


async def test_a_retry_written_late_still_runs_soon_after_it_is_written(
    make_coord: CoordFactory, dsn: str
) -> None:
    # Under load the outcome writer may commit the retry after its backoff has passed; a wake-up
    # counted from the failure alone would then find the job still leased and sleep until the
    # lease ends (15 s here). The row lock below holds the writer back for 2 s.
    coord = await make_coord(queue_idle_poll=NEVER)
    eq = coord.event_queue
    tries: list[float] = []
    failing = asyncio.Event()
    go_on = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        tries.append(time.monotonic())
        if ctx.retried == 0:
            failing.set()
            await go_on.wait()
            raise RuntimeError("first try fails")

    await eq.subscribe("late", process=process, interval=NEVER)
    job = await eq.publish("late", "x", max_retries=1, timeout=15.0)
    await asyncio.wait_for(failing.wait(), 10)
    async with await psycopg.AsyncConnection.connect(dsn) as blocker:
        await blocker.execute("SELECT 1 FROM pgcoord.queue_jobs WHERE id = %s FOR UPDATE", (job,))
        go_on.set()
        await asyncio.sleep(2.0)  # past the 0.5 s backoff, the retry still unwritten
        written = time.monotonic()
        await blocker.commit()
    await _until(lambda: len(tries) == 2, timeout=10.0)
    assert tries[1] - written < 5.0, "the retry waited for the lease instead of its backoff"


async def test_a_killed_workers_job_is_rescued_after_its_lease_by_an_idle_worker(
    make_coord: CoordFactory, dsn: str
) -> None:
    lease = 2.0
    rescuer = await make_coord(queue_lease=lease, queue_idle_poll=NEVER)
    rescued: list[tuple[Any, int, float]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        rescued.append((message, ctx.attempt, time.monotonic()))

    with processes() as procs:
        victim = spawn(
            "tests.workers.queue_worker", "rescue", "--mode", "hold", "--lease", str(lease), dsn=dsn
        )
        procs.append(victim)
        victim.expect("ready")
        job = await rescuer.event_queue.publish("rescue", "m")
        assert victim.expect("holding")["holding"] == job
        # Subscribed while the victim holds the job: its first claim finds nothing claimable
        # and learns when the victim's lease ends; it sleeps until then (and again after
        # each of the victim's renewals), polling never.
        await rescuer.event_queue.subscribe("rescue", process=process, interval=NEVER)
        await asyncio.sleep(lease)  # a renewal or two of the victim's lease go by
        assert rescued == []
        victim.kill()
        killed = time.monotonic()
        await _until(lambda: rescued, timeout=lease * 2 + 10.0)
    message, attempt, at = rescued[0]
    assert (message, attempt) == ("m", 2)
    # Within the lease after the victim's last renewal, not at some later poll.
    assert at - killed < lease + 5.0
