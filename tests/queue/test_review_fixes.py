"""Regression tests for lease renewal, waiter rows and fencing found in review.

Each waits for an event (generously), never asserts a speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import pytest
from psycopg import sql

import pgcoord
from tests.conftest import CoordFactory
from tests.queue.test_behaviour import _rows
from tests.support import wait_until as _until


def _lease_end(dsn: str, job: int) -> Any:
    return _rows(dsn, "SELECT run_at FROM pgcoord.queue_jobs WHERE id = %s", job)[0][0]


async def test_leases_are_renewed_during_the_unsubscribe_grace_period(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_lease=1.0, queue_grace=60.0)
    eq = coord.event_queue
    started = asyncio.Event()
    release = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        started.set()
        await release.wait()

    await eq.subscribe("grace", process=process)
    job = await eq.publish("grace", 1)
    await asyncio.wait_for(started.wait(), 10)
    unsubscribing = asyncio.create_task(eq.unsubscribe("grace"))
    await asyncio.sleep(0)
    first = _lease_end(dsn, job)
    try:
        # The job still runs here: its lease must keep moving, or another instance takes it.
        await _until(lambda: _lease_end(dsn, job) > first, timeout=8.0)
    finally:
        release.set()
        await unsubscribing
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)]


async def test_lease_renewal_survives_an_unexpected_error(
    make_coord: CoordFactory, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = await make_coord(queue_lease=1.0)
    eq = coord.event_queue
    refresh = eq._refresh_waiters
    rounds = 0

    async def flaky() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise RuntimeError("not a database error")
        await refresh()

    monkeypatch.setattr(eq, "_refresh_waiters", flaky)
    started = asyncio.Event()
    release = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        started.set()
        await release.wait()

    await eq.subscribe("renew", process=process)
    job = await eq.publish("renew", 1)
    await asyncio.wait_for(started.wait(), 10)
    # The first round's waiter refresh raised; the rounds after it must still renew.
    await _until(lambda: rounds >= 1, timeout=8.0)
    first = _lease_end(dsn, job)
    await _until(lambda: _lease_end(dsn, job) > first, timeout=8.0)
    release.set()
    await eq.flush()


async def test_a_renewal_after_stop_does_not_bring_the_waiter_row_back(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    eq = coord.event_queue

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        pass

    await eq.subscribe("wait", process=process)
    count = "SELECT count(*) FROM pgcoord.queue_waiters WHERE channel = 'wait'"
    await _until(lambda: _rows(dsn, count) == [(1,)])
    await eq._deactivate(eq._workers["wait"])  # what stop() does per worker
    assert _rows(dsn, count) == [(0,)]
    await eq._refresh_waiters()  # a renewer round that comes after the delete
    assert _rows(dsn, count) == [(0,)]


async def test_unsubscribe_does_not_raise_when_the_release_notify_fails(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_grace=0.0)
    eq = coord.event_queue
    started = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        started.set()
        await asyncio.Event().wait()

    await eq.subscribe("note", process=process)
    job = await eq.publish("note", 1)
    await asyncio.wait_for(started.wait(), 10)
    # The wake-up NOTIFY for released jobs fails in the server (as when it is unreachable).
    eq._q = dataclasses.replace(eq._q, notify=sql.SQL("SELECT pg_notify(%s, (1 / 0)::text)"))
    await eq.unsubscribe("note")
    assert eq.subscribed() == []
    # The job was still released: ready again at once for any instance.
    assert _rows(dsn, "SELECT id, worker FROM pgcoord.queue_jobs") == [(job, None)]


def _leased(dsn: str) -> int:
    rows = _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs WHERE worker IS NOT NULL")
    return int(rows[0][0])


async def test_unlimited_sync_handlers_claim_no_more_jobs_than_threads(
    make_coord: CoordFactory, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pgcoord.queue.worker._UNLIMITED_THREADS", 2)
    coord = await make_coord()
    eq = coord.event_queue
    gate = threading.Event()
    lock = threading.Lock()
    started: list[Any] = []

    def process(message: Any, ctx: pgcoord.JobContext) -> None:
        with lock:
            started.append(message)
        gate.wait(30)

    await eq.publish_many("backlog", list(range(6)), timeout=60.0)
    await eq.subscribe("backlog", process=process, concurrency=0)
    await _until(lambda: len(started) == 2)
    await asyncio.sleep(0.3)  # room for a wrong extra claim to happen
    # Only the jobs that have a thread are leased; the rest stay free for other instances.
    assert _leased(dsn) == 2
    gate.set()
    await _until(lambda: len(started) == 6)
    await eq.flush()
    await _until(lambda: _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)])
    assert await eq.failed_jobs() == []


async def test_a_job_waiting_behind_a_timed_out_thread_does_not_time_out(
    make_coord: CoordFactory,
) -> None:
    coord = await make_coord()
    eq = coord.event_queue
    gate = threading.Event()
    ran: list[Any] = []

    def process(message: Any, ctx: pgcoord.JobContext) -> None:
        if message == "stuck":
            gate.wait(30)  # ignores ctx.signal: keeps its thread past its timeout
        ran.append(message)

    stuck = await eq.publish("serial", "stuck", timeout=0.5)
    later = await eq.publish("serial", "later", timeout=1.0)
    await eq.subscribe("serial", process=process, concurrency=1)
    deadline = time.monotonic() + 15.0
    while [f.id for f in await eq.failed_jobs()] != [stuck]:
        assert time.monotonic() < deadline, "the stuck job never timed out"
        await asyncio.sleep(0.05)
    # The stuck handler keeps its thread for longer than the later job's timeout.
    await asyncio.sleep(2.0)
    gate.set()
    await _until(lambda: ran == ["stuck", "later"])
    await eq.flush()
    stats = await eq.stats("serial")
    assert [f.id for f in await eq.failed_jobs()] == [stuck]  # `later` ran and completed
    assert (stats["ready"], stats["running"], stats["scheduled"]) == (0, 0, 0)
    assert later != stuck


async def test_a_retried_dead_letter_never_reuses_a_fencing_token(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_lease=30.0)
    eq = coord.event_queue
    job = await eq.publish("refence", "x")
    expire = "UPDATE pgcoord.queue_jobs SET run_at = now() - interval '1 second'"
    [frozen], _ = await eq._claim("refence", 10)  # this worker freezes past its lease
    _rows(dsn, expire + " RETURNING id")
    [second], _ = await eq._claim("refence", 10)
    eq._outcomes.fail(job, second[1], "boom", "tb")
    await eq.flush()
    assert await eq.retry_failed() == [job]  # an operator puts the job back
    [third], _ = await eq._claim("refence", 10)
    assert third[1] > second[1] > frozen[1]
    eq._outcomes.complete(job, frozen[1])  # the frozen worker wakes up and reports success
    await eq.flush()
    assert _rows(dsn, "SELECT id, attempt FROM pgcoord.queue_jobs") == [(job, third[1])]


async def test_a_retried_dead_letter_gets_a_fresh_interruption_budget(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_lease=30.0, queue_max_interruptions=2)
    eq = coord.event_queue
    job = await eq.publish("crashy", "x")
    expire = "UPDATE pgcoord.queue_jobs SET run_at = now() - interval '1 second' RETURNING id"
    for _ in range(2):  # two workers died while running it
        await eq._claim("crashy", 10)
        _rows(dsn, expire)
    seen: list[tuple[Any, int]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        seen.append((message, ctx.retried))

    await eq.subscribe("crashy", process=process, interval=0.05)
    deadline = time.monotonic() + 15.0
    while [f.id for f in await eq.failed_jobs()] != [job]:
        assert time.monotonic() < deadline, "the interrupted job was not dead-lettered"
        await asyncio.sleep(0.05)
    assert seen == []
    assert await eq.retry_failed() == [job]
    # Its earlier interruptions belong to its previous life: now it runs.
    await _until(lambda: seen == [("x", 0)])
    await eq.flush()
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)]
    assert await eq.failed_jobs() == []
