"""The queue's platform behaviours in one process against a real server.

Timing is only ever waited for (generously), never asserted as a speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcoord
from pgcoord.names import pg_channel
from tests.support import CoordFactory
from tests.support import wait_until as _until


def _rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def _lease_end(dsn: str, job: int) -> Any:
    return _rows(dsn, "SELECT run_at FROM pgcoord.queue_jobs WHERE id = %s", job)[0][0]


def _leased(dsn: str) -> int:
    rows = _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs WHERE worker IS NOT NULL")
    return int(rows[0][0])


async def test_retries_then_dead_letter_with_error_and_traceback(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    tries: list[int] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        tries.append(ctx.retried)
        raise RuntimeError(f"boom {message['n']}")

    await coord.event_queue.subscribe("fail", process=process, interval=0.05)
    job = await coord.event_queue.publish("fail", {"n": 7}, max_retries=2)
    await _until(lambda: len(tries) == 3)
    await asyncio.sleep(0.3)  # a 4th try would show up here (the next backoff is ~2 s anyway)
    await coord.event_queue.flush()
    assert tries == [0, 1, 2]
    failed = await coord.event_queue.failed_jobs("fail")
    assert [f.id for f in failed] == [job]
    assert failed[0].message == {"n": 7}
    assert failed[0].error == "RuntimeError: boom 7"
    assert "Traceback" in failed[0].traceback and "process" in failed[0].traceback
    assert failed[0].retried == 2
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)]


async def test_failed_jobs_retry_and_purge_through_the_api(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    healthy = False
    ran: list[int] = []

    def process(message: Any, ctx: pgcoord.JobContext) -> None:  # sync: runs in a thread
        if not healthy:
            raise ValueError("downstream is down")
        ran.append(ctx.id)

    eq = coord.event_queue
    await eq.subscribe("dl", process=process, concurrency=4, interval=0.05)
    ids = await eq.publish_many("dl", [1, 2, 3])
    deadline = time.monotonic() + 15
    while len(await eq.failed_jobs("dl")) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert sorted(f.id for f in await eq.failed_jobs()) == ids
    assert await eq.failed_jobs("other") == []
    healthy = True
    assert await eq.retry_failed("dl", ids=ids[:2]) == ids[:2]
    await _until(lambda: sorted(ran) == ids[:2])
    assert [f.id for f in await eq.failed_jobs("dl")] == [ids[2]]
    assert await eq.purge_failed("dl", older_than=3600) == 0
    assert await eq.purge_failed("dl") == 1
    assert await eq.failed_jobs("dl") == []


async def test_timeout_sets_the_signal_cancels_and_counts_as_failure(
    make_coord: CoordFactory,
) -> None:
    coord = await make_coord()
    seen: list[tuple[bool, str | None]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append((ctx.signal.is_set(), ctx.signal.reason))
            raise

    await coord.event_queue.subscribe("slow", process=process, interval=0.05)
    job = await coord.event_queue.publish("slow", None, timeout=0.2)
    deadline = time.monotonic() + 15
    while not await coord.event_queue.failed_jobs("slow"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    failed = await coord.event_queue.failed_jobs("slow")
    assert failed[0].id == job and failed[0].error.startswith("TimeoutError")
    assert seen == [(True, "timeout")]


async def test_concurrency_runs_in_waves(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    active = 0
    peak = 0
    finished = 0

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        nonlocal active, peak, finished
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.15)
        active -= 1
        finished += 1

    await coord.event_queue.publish_many("waves", list(range(6)))
    await coord.event_queue.subscribe("waves", process=process, concurrency=2, interval=0.05)
    await _until(lambda: finished == 6)
    assert peak == 2


async def test_unlimited_concurrency_runs_everything_at_once(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    started = 0
    all_in = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        nonlocal started
        started += 1
        if started == 30:
            all_in.set()
        # Only finishes once all 30 run together: impossible under any concurrency limit.
        await asyncio.wait_for(all_in.wait(), 20)

    await coord.event_queue.publish_many("wide", list(range(30)))
    await coord.event_queue.subscribe("wide", process=process, concurrency=0, interval=0.05)
    await asyncio.wait_for(all_in.wait(), 15)


async def test_idle_false_pauses_claiming(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    busy = False
    ran: list[Any] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        ran.append(message)

    await coord.event_queue.subscribe("idle", process=process, idle=lambda: not busy, interval=0.05)
    await coord.event_queue.publish("idle", "first")
    await _until(lambda: ran == ["first"])
    busy = True  # the app is busy now: this instance must not claim
    await coord.event_queue.publish("idle", "second")
    await asyncio.sleep(0.5)
    assert ran == ["first"]
    assert (await coord.event_queue.stats("idle"))["ready"] == 1
    busy = False
    await _until(lambda: ran == ["first", "second"])


async def test_sync_handlers_run_in_threads_up_to_concurrency(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    # Ten sync handlers that can only finish together: more than the default executor's
    # threads on a small machine, and none may block the event loop.
    barrier = threading.Barrier(10, timeout=20)
    finished: list[int] = []

    def process(message: Any, ctx: pgcoord.JobContext) -> None:
        barrier.wait()
        finished.append(message)

    await coord.event_queue.subscribe("sync", process=process, concurrency=10, interval=0.05)
    await coord.event_queue.publish_many("sync", list(range(10)))
    await _until(lambda: len(finished) == 10, timeout=30)
    assert sorted(finished) == list(range(10))


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


async def test_priority_then_age_and_delay_order(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    eq = coord.event_queue
    order: list[str] = []
    await eq.publish("ord", "low-1", priority=-1)
    await eq.publish("ord", "mid-1")
    await eq.publish("ord", "high", priority=10)
    await eq.publish("ord", "mid-2")
    await eq.publish("ord", "delayed-high", priority=100, delay=0.8)
    published = time.monotonic()
    delayed_at = 0.0

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        nonlocal delayed_at
        order.append(message)
        if message == "delayed-high":
            delayed_at = time.monotonic()

    await eq.subscribe("ord", process=process, interval=0.05)
    await _until(lambda: len(order) == 5)
    assert order == ["high", "mid-1", "mid-2", "low-1", "delayed-high"]
    assert delayed_at - published >= 0.7


async def test_publish_without_subscriber_waits_for_a_consumer(
    make_coord: CoordFactory,
) -> None:
    producer = await make_coord()
    job = await producer.event_queue.publish("later", {"k": "v"})
    consumer = await make_coord()
    got: list[tuple[int, Any]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        got.append((ctx.id, message))

    await consumer.event_queue.subscribe("later", process=process)
    await _until(lambda: got == [(job, {"k": "v"})])


async def test_bad_input_is_refused_before_anything_is_written(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    eq = coord.event_queue
    with pytest.raises(TypeError):
        await eq.publish("bad", {"when": object()})
    with pytest.raises(TypeError):
        await eq.publish_many("bad", [1, (2, 3)])
    with pytest.raises(ValueError):
        await eq.publish("bad", 1, timeout=0)
    with pytest.raises(ValueError):
        await eq.publish("bad", 1, max_retries=-1)
    with pytest.raises(ValueError):
        await eq.publish("bad", 1, delay=-1)
    with pytest.raises(ValueError):
        await eq.publish("", 1)
    with pytest.raises(TypeError):
        await eq.publish("bad", 1, transaction="not a connection")
    with pytest.raises(TypeError):
        await eq.subscribe("bad", process=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await eq.subscribe("bad", process=42)  # type: ignore[arg-type]
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)]
    assert eq.subscribed() == []


async def test_graceful_stop_returns_running_jobs_at_once(make_coord: CoordFactory) -> None:
    # A 60 s lease: the job can only come back this fast if stop() released it.
    first = await make_coord(queue_lease=60.0, queue_grace=0.2)
    reasons: list[str | None] = []
    started = asyncio.Event()

    async def stuck(message: Any, ctx: pgcoord.JobContext) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            reasons.append(ctx.signal.reason)

    await first.event_queue.subscribe("grace", process=stuck)
    job = await first.event_queue.publish("grace", "work")
    await asyncio.wait_for(started.wait(), 10)
    await first.stop()
    assert reasons == ["stopping"]

    second = await make_coord()
    got: list[tuple[int, int]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        got.append((ctx.id, ctx.retried))

    await second.event_queue.subscribe("grace", process=process)
    await _until(lambda: got == [(job, 0)], timeout=10)


async def test_graceful_stop_lets_short_jobs_finish(make_coord: CoordFactory, dsn: str) -> None:
    coord = await make_coord(queue_grace=10.0)
    finished: list[int] = []
    started = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(ctx.id)

    await coord.event_queue.subscribe("short", process=process)
    job = await coord.event_queue.publish("short", 1)
    await asyncio.wait_for(started.wait(), 10)
    await coord.stop()
    assert finished == [job]
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)]


async def test_a_late_worker_cannot_complete_a_rescued_job(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_lease=30.0)
    eq = coord.event_queue
    job = await eq.publish("fence", "x")
    [first], _ = await eq._claim("fence", 10)
    # The first worker's lease runs out (as if it froze) and another claims the job.
    _rows(dsn, "UPDATE pgcoord.queue_jobs SET run_at = now() - interval '1 second' RETURNING id")
    [second], _ = await eq._claim("fence", 10)
    assert (first[0], second[0]) == (job, job) and second[1] == first[1] + 1
    eq._outcomes.complete(job, first[1])  # the late worker reports success
    eq._outcomes.fail(job, first[1], "late", "late")
    await eq.flush()
    assert _rows(dsn, "SELECT id, attempt FROM pgcoord.queue_jobs") == [(job, second[1])]
    assert await eq.failed_jobs() == []
    eq._outcomes.complete(job, second[1])  # the owner's completion counts
    await eq.flush()
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs") == [(0,)]


async def test_unsubscribe_stops_consuming(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    got: list[Any] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        got.append(message)

    await coord.event_queue.subscribe("un", process=process, interval=0.05)
    await coord.event_queue.publish("un", 1)
    await _until(lambda: got == [1])
    await coord.event_queue.unsubscribe("un")
    await coord.event_queue.publish("un", 2)
    await asyncio.sleep(0.4)
    assert got == [1]
    assert (await coord.event_queue.stats("un"))["ready"] == 1


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


async def test_publish_many_keeps_order_and_options_reach_ctx(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    eq = coord.event_queue
    ids = await eq.publish_many("many", list(range(3000)), timeout=7.5, max_retries=2, priority=3)
    assert len(ids) == 3000 and ids == sorted(ids) and len(set(ids)) == 3000
    assert await eq.publish_many("many", []) == []
    seen: dict[int, Any] = {}
    options: list[dict[str, Any]] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        seen[ctx.id] = message
        if not options:
            options.append(ctx.options)

    await eq.subscribe("many", process=process, concurrency=50)
    await _until(lambda: len(seen) == 3000)
    assert [seen[i] for i in ids] == list(range(3000))
    assert options == [{"timeout": 7.5, "max_retries": 2, "priority": 3}]


async def test_channels_and_apps_do_not_meet(make_coord: CoordFactory) -> None:
    shop = await make_coord(app="shop")
    blog = await make_coord(app="blog")
    got: list[tuple[str, Any]] = []

    def handler(tag: str) -> Any:
        async def process(message: Any, ctx: pgcoord.JobContext) -> None:
            got.append((tag, message))

        return process

    await shop.event_queue.subscribe("a", process=handler("shop/a"), interval=0.05)
    await shop.event_queue.subscribe("b", process=handler("shop/b"), interval=0.05)
    await blog.event_queue.subscribe("a", process=handler("blog/a"), interval=0.05)
    await shop.event_queue.publish("a", 1)
    await blog.event_queue.publish("a", 2)
    await shop.event_queue.publish("b", 3)
    await _until(lambda: len(got) == 3)
    await asyncio.sleep(0.3)
    assert sorted(got) == [("blog/a", 2), ("shop/a", 1), ("shop/b", 3)]


async def test_workers_vacuum_the_jobs_table_under_churn(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_vacuum_every=100)
    done = 0

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        nonlocal done
        done += 1

    await coord.event_queue.subscribe("churn", process=process, concurrency=0)
    await coord.event_queue.publish_many("churn", list(range(500)))
    await _until(lambda: done == 500)
    await coord.event_queue.flush()
    deadline = time.monotonic() + 20
    query = (
        "SELECT coalesce(vacuum_count, 0) FROM pg_stat_user_tables "
        "WHERE schemaname = 'pgcoord' AND relname = 'queue_jobs'"
    )
    while _rows(dsn, query) != [] and _rows(dsn, query)[0][0] == 0:
        assert time.monotonic() < deadline, "the workers never vacuumed the jobs table"
        await asyncio.sleep(0.2)


async def test_wake_up_notify_only_when_a_worker_may_be_asleep(
    make_coord: CoordFactory, dsn: str
) -> None:
    producer = await make_coord(queue_notify_gap=0.001)
    wake = pg_channel(producer.schema, producer.app, "queue", "wake")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as spy:
        await spy.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(wake)))

        async def notifications(wait: float) -> int:
            count = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    async for _ in spy.notifies():
                        count += 1
            return count

        # Nobody consumes the queue: enqueueing sends no NOTIFY at all.
        for i in range(5):
            await producer.event_queue.publish("wake", i)
        assert await notifications(0.3) == 0

        consumer = await make_coord()
        got: list[Any] = []

        async def process(message: Any, ctx: pgcoord.JobContext) -> None:
            got.append(message)

        await consumer.event_queue.subscribe("wake", process=process, interval=30.0)
        await _until(lambda: len(got) == 5)  # the first claim needs no NOTIFY
        await asyncio.sleep(0.2)
        # The worker now sleeps (30 s poll): only a NOTIFY can bring the next job this fast.
        await producer.event_queue.publish("wake", "ping")
        assert await notifications(2.0) >= 1
        await _until(lambda: got[-1:] == ["ping"], timeout=10)


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


async def test_publish_sync_for_blocking_code_joins_the_callers_transaction(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    got: list[Any] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        got.append(message)

    await coord.event_queue.subscribe("blocking", process=process, interval=0.05)

    def blocking_app_code() -> list[int]:
        with psycopg.connect(dsn) as conn:
            coord.event_queue.publish_sync("blocking", "rolled back", transaction=conn)
            conn.rollback()
            first = coord.event_queue.publish_sync("blocking", "kept", transaction=conn)
            more = coord.event_queue.publish_many_sync("blocking", [1, 2], transaction=conn)
            conn.commit()
        return [first, *more]

    ids = await asyncio.to_thread(blocking_app_code)
    assert len(ids) == 3 and ids == sorted(ids)
    await _until(lambda: len(got) == 3)
    await asyncio.sleep(0.3)
    assert sorted(map(str, got)) == ["1", "2", "kept"]
    with pytest.raises(TypeError):
        coord.event_queue.publish_sync("blocking", object(), transaction=None)  # type: ignore[arg-type]


async def test_a_running_job_keeps_its_lease_past_the_lease_length(
    make_coord: CoordFactory,
) -> None:
    # Two instances, a 1 s lease, a 2.5 s job: without renewal the other instance would
    # take the job over after 1 s and run it a second time.
    first = await make_coord(queue_lease=1.0)
    second = await make_coord(queue_lease=1.0)
    runs: list[tuple[str, int]] = []

    def handler(tag: str) -> Any:
        async def process(message: Any, ctx: pgcoord.JobContext) -> None:
            runs.append((tag, ctx.attempt))
            await asyncio.sleep(2.5)

        return process

    await first.event_queue.subscribe("long", process=handler("first"), interval=0.05)
    await first.event_queue.publish("long", None)
    await _until(lambda: len(runs) == 1)
    await second.event_queue.subscribe("long", process=handler("second"), interval=0.05)
    deadline = time.monotonic() + 15
    while (await first.event_queue.stats("long")) != {"ready": 0, "running": 0, "scheduled": 0}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert runs == [("first", 1)]


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


async def test_a_job_that_keeps_killing_its_workers_is_dead_lettered(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_max_interruptions=3)
    queue = coord.event_queue
    job_id = await queue.publish("poison", {"boom": True})
    # The history a job has after three workers died while running it: three claims, no
    # outcome (the kill -9 rescue tests cover how such claims happen for real).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgcoord.queue_jobs SET attempt = attempt + 3 WHERE id = %s", (job_id,))
    ran: list[Any] = []
    await queue.subscribe("poison", process=lambda message, ctx: ran.append(message))
    await _until(lambda: _rows(dsn, "SELECT id FROM pgcoord.queue_failed") == [(job_id,)])
    assert ran == []
    [failed] = await queue.failed_jobs("poison")
    assert "JobInterrupted" in failed.error and "claimed 3 times" in failed.error


async def test_a_retried_dead_letter_gets_a_fresh_interruption_budget(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_max_interruptions=2)
    eq = coord.event_queue
    job = await eq.publish("crashy", "x")
    # The history a job has after two workers died while running it: two claims, no outcome.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE pgcoord.queue_jobs SET attempt = attempt + 2 WHERE id = %s", (job,))
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
