"""The queue under hostile input: unstorable error texts, crashed workers, unbounded names.

Each test is a behaviour users rely on (issue 11): a handler's error never stops the outcome
writer, a killed worker's registrations go away, per-entity queue names cost bounded memory,
dead letters can be kept for a bounded time, and bad arguments fail before any write.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord.queue import queries
from pgcoord.queue.outcomes import Outcomes
from pgcoord.queue.throttle import NotifyStates
from tests.support import CoordFactory, processes, spawn, wait_until


def _rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


def _jobs(dsn: str) -> int:
    return int(_rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs")[0][0])


# -- defect 1: error texts Postgres cannot hold --------------------------------------------


async def test_nul_in_a_handler_error_is_dead_lettered_and_flush_returns(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord(queue_lease=2.0)
    tries: list[int] = []

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        tries.append(ctx.id)
        raise ValueError(message["name"])

    eq = coord.event_queue
    await eq.subscribe("nul", process=process, interval=0.05)
    job = await eq.publish("nul", {"name": "bad\x00name"}, max_retries=0)
    await wait_until(lambda: tries)
    # Before the fix the batch was refused by the driver and retried forever.
    await asyncio.wait_for(eq.flush(), 30)
    [failed] = await eq.failed_jobs("nul")
    assert failed.id == job
    assert failed.error == "ValueError: bad\\x00name"
    assert "bad\\x00name" in failed.traceback and "\x00" not in failed.traceback
    assert failed.message == {"name": "bad\x00name"}  # the payload itself round-trips
    assert _jobs(dsn) == 0  # nothing left to run again
    assert tries == [job]


async def test_lone_surrogate_in_a_handler_error_does_not_stop_completions(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    # Type names cannot hold NUL, but a class's module and qualified name (both printed in
    # the traceback) can hold NUL and surrogates.
    bad_type = type("OddError", (Exception,), {})
    bad_type.__qualname__ = "Odd\ud800Error"
    bad_type.__module__ = "mod\x00ule"
    go = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        await go.wait()  # all three finish together: their outcomes share one flush
        if message == "surrogate":
            raise ValueError("lone \udc80 surrogate")
        if message == "type":
            raise bad_type("typed")

    eq = coord.event_queue
    await eq.subscribe("sur", process=process, concurrency=3, interval=0.05)
    await eq.publish_many("sur", ["surrogate", "type", "ok"])
    await wait_until(
        lambda: (
            _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs WHERE worker IS NOT NULL")[0][0]
            == 3
        )
    )
    go.set()
    await asyncio.wait_for(eq.flush(), 30)
    # Before the fix the flusher task died: even the job that succeeded stayed.
    await wait_until(lambda: _jobs(dsn) == 0, 30)
    failed = sorted(await eq.failed_jobs("sur"), key=lambda f: f.error)
    assert [f.error for f in failed] == ["OddError: typed", "ValueError: lone \\udc80 surrogate"]
    assert "mod\\x00ule.Odd\\ud800Error: typed" in failed[0].traceback
    # And the writer is still alive for what comes next.
    await eq.publish("sur", "ok")
    await wait_until(lambda: _jobs(dsn) == 0, 30)


async def test_a_row_the_server_refuses_does_not_block_the_rest_of_the_batch(
    make_coord: CoordFactory, dsn: str
) -> None:
    # A real server-side refusal tied to one row: a trigger that rejects one error text.
    _rows(
        dsn,
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.error LIKE '%poison%' THEN RAISE EXCEPTION 'refused by trigger'; END IF; "
        "RETURN NEW; END $$",
    )
    _rows(
        dsn,
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON pgcoord.queue_failed "
        "FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    coord = await make_coord()
    go = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        await go.wait()
        if message != "ok":
            raise RuntimeError(message)

    eq = coord.event_queue
    await eq.subscribe("mixed", process=process, concurrency=3, interval=0.05)
    poison, plain, _ok = await eq.publish_many("mixed", ["poison", "plain", "ok"])
    await wait_until(
        lambda: (
            _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs WHERE worker IS NOT NULL")[0][0]
            == 3
        )
    )
    go.set()
    # flush() waits for tries that finished; the three handlers may still be waking up.
    await wait_until(lambda: _jobs(dsn) == 0, 30)
    await asyncio.wait_for(eq.flush(), 30)
    failed = {f.id: f for f in await eq.failed_jobs("mixed")}
    assert failed[plain].error == "RuntimeError: plain"
    # The refused row is kept with a replacement text saying why.
    assert "poison" not in failed[poison].error
    assert "could not be stored" in failed[poison].error


async def test_a_transient_server_error_keeps_the_dead_letters_own_text(
    make_coord: CoordFactory, dsn: str
) -> None:
    # Deadlocks (40P01) on the first writes are the server's trouble, not the row's: the dead
    # letter must still carry the handler's own error once the write goes through.
    _rows(dsn, "CREATE SEQUENCE once_seq")
    _rows(
        dsn,
        "CREATE FUNCTION deadlock_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF nextval('once_seq') <= 2 THEN RAISE EXCEPTION 'simulated deadlock' "
        "USING ERRCODE = '40P01'; END IF; RETURN NEW; END $$",
    )
    _rows(
        dsn,
        "CREATE TRIGGER deadlock_once BEFORE INSERT ON pgcoord.queue_failed "
        "FOR EACH ROW EXECUTE FUNCTION deadlock_once()",
    )
    coord = await make_coord()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        raise RuntimeError(message)

    eq = coord.event_queue
    await eq.subscribe("flaky", process=process, interval=0.05)
    job = await eq.publish("flaky", "the real error", max_retries=0)
    await wait_until(lambda: _jobs(dsn) == 0, 30)
    await asyncio.wait_for(eq.flush(), 30)
    failed = {f.id: f for f in await eq.failed_jobs("flaky")}
    assert failed[job].error == "RuntimeError: the real error"
    assert "the real error" in failed[job].traceback


async def test_the_outcome_writer_survives_an_unexpected_error(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    _rows(
        dsn,
        "INSERT INTO pgcoord.queue_jobs (app, channel, timeout, payload) "
        "VALUES ('main', 'x', 1, '1'), ('main', 'x', 1, '2')",
    )
    ids = [r[0] for r in _rows(dsn, "SELECT id FROM pgcoord.queue_jobs ORDER BY id")]
    calls = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

        async def execute(query: Any, params: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the writer")
            await conn.execute(query, params)

        outcomes = Outcomes(execute, queries.build("pgcoord"))
        outcomes.start()
        try:
            with caplog.at_level(logging.ERROR, "pgcoord.queue"):
                outcomes.complete(ids[0], 0)
                await asyncio.wait_for(outcomes.drain(), 30)
                assert _rows(dsn, "SELECT id FROM pgcoord.queue_jobs") == [(ids[1],)]
                # Still running: later outcomes are written too.
                outcomes.complete(ids[1], 0)
                await asyncio.wait_for(outcomes.drain(), 30)
                assert _jobs(dsn) == 0
        finally:
            await outcomes.stop(5)
    assert "a bug in the writer" in caplog.text


async def test_an_exception_whose_str_raises_is_still_dead_lettered(
    make_coord: CoordFactory, dsn: str
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    coord = await make_coord()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        raise Unprintable()

    eq = coord.event_queue
    await eq.subscribe("unprintable", process=process, interval=0.05)
    job = await eq.publish("unprintable", 1)
    await wait_until(lambda: _jobs(dsn) == 0, 30)
    [failed] = await eq.failed_jobs("unprintable")
    assert failed.id == job and failed.error.startswith("Unprintable: ")


# -- defect 7: registrations of killed workers -----------------------------------------------


async def test_expired_registrations_are_swept_for_this_app_only(
    make_coord: CoordFactory, dsn: str
) -> None:
    _rows(
        dsn,
        "INSERT INTO pgcoord.queue_waiters (app, channel, worker, idle, expires_at) VALUES "
        "('main', 'q', 'dead-1', true, now() - interval '1 hour'), "
        "('main', 'q', 'fresh', true, now() + interval '1 hour'), "
        "('other', 'q', 'dead-2', true, now() - interval '1 hour')",
    )
    await make_coord(queue_lease=3.0)  # a live instance of "main", subscribed to nothing
    query = "SELECT worker FROM pgcoord.queue_waiters ORDER BY worker"
    await wait_until(lambda: _rows(dsn, query) == [("dead-2",), ("fresh",)], 60)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_killed_workers_waiter_rows_are_deleted(make_coord: CoordFactory, dsn: str) -> None:
    live = await make_coord(queue_lease=3.0)
    await live.event_queue.subscribe("work", process=lambda m, c: None, interval=0.1)
    with processes() as procs:
        victim = spawn("tests.workers.queue_worker", "work", dsn=dsn)
        procs.append(victim)
        victim.expect("ready")
        pattern = f"%:{victim.pid}:%"
        query = "SELECT count(*) FROM pgcoord.queue_waiters WHERE worker LIKE %s"
        await wait_until(lambda: _rows(dsn, query, pattern)[0][0] == 1)
        victim.kill()
        # Its row expires after three refresh periods (45 s); a live instance deletes it.
        await wait_until(lambda: _rows(dsn, query, pattern)[0][0] == 0, 240)
    mine = _rows(dsn, query, f"%{live.instance_id}%")
    assert mine == [(1,)]  # the live worker's own registration stays


# -- defect 9: per-queue wake-up bookkeeping ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_notify_states_stay_bounded_and_evicted_queues_are_still_woken(
    make_coord: CoordFactory, dsn: str
) -> None:
    # No idle poll to speak of: only a NOTIFY can wake the worker in time.
    coord = await make_coord(queue_idle_poll=3600.0)
    eq = coord.event_queue
    done: list[Any] = []
    await eq.subscribe("entity-0", process=lambda m, c: done.append(m), interval=3600.0)
    await eq.publish("entity-0", "first")
    await wait_until(lambda: done == ["first"], 30)
    # 100k distinct queue names (rolled back: only the bookkeeping is of interest).
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for n in range(1, 100_001):
            await eq.publish(f"entity-{n}", n, transaction=conn)
        await conn.rollback()
    assert len(eq._notify) <= 10_000  # the bound under test
    # entity-0's state was evicted long ago; its worker still hears of new jobs.
    await asyncio.sleep(0.5)  # let the worker settle into its NOTIFY-only sleep
    await eq.publish("entity-0", "second")
    await wait_until(lambda: done == ["first", "second"], 30)


def test_evicting_a_notify_state_never_loses_a_wake_up() -> None:
    states = NotifyStates(gap=1.0, txn_window=0.0, limit=2)
    first = states.get("a")
    assert first.request(now=100.0)  # a sender starts for "a" and holds this state
    first.take()
    first.sent(100.0)
    states.get("b")
    states.get("c")  # "a" is the least recently used: dropped
    assert len(states) == 2
    again = states.get("a")
    assert again is not first
    # A fresh state asks for a sender at once: at worst one NOTIFY more than the gap allows.
    assert again.request(now=100.5)
    assert again.next_send(100.5) == 0.0
    # Recently used states stay.
    assert states.get("a") is again


# -- retention of dead letters -----------------------------------------------------------------


async def _dead_letters(coord: pgcoord.Coordinator, channel: str, n: int) -> list[int]:
    def process(message: Any, ctx: pgcoord.JobContext) -> None:
        raise RuntimeError("no")

    eq = coord.event_queue
    await eq.subscribe(channel, process=process, concurrency=n, interval=0.05)
    ids = await eq.publish_many(channel, list(range(n)))
    deadline = asyncio.get_running_loop().time() + 30
    while len(await eq.failed_jobs(channel)) < n:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await eq.unsubscribe(channel)
    return ids


async def test_dead_letters_older_than_the_retention_are_swept_for_this_app_only(
    make_coord: CoordFactory, dsn: str
) -> None:
    mine = await make_coord(app="mine")
    other = await make_coord(app="other")
    old = await _dead_letters(mine, "d", 2)
    other_old = await _dead_letters(other, "d", 2)
    backdate = "UPDATE pgcoord.queue_failed SET failed_at = now() - interval '2 hours'"
    _rows(dsn, backdate)
    new = await _dead_letters(mine, "e", 2)
    # A live instance of "mine" that keeps dead letters for an hour.
    await make_coord(app="mine", queue_failed_retention=3600.0, queue_lease=3.0)
    query = "SELECT id FROM pgcoord.queue_failed WHERE app = %s ORDER BY id"
    await wait_until(lambda: [r[0] for r in _rows(dsn, query, "mine")] == new, 60)
    assert [r[0] for r in _rows(dsn, query, "other")] == other_old
    assert not set(old) & {r[0] for r in _rows(dsn, "SELECT id FROM pgcoord.queue_failed")}


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "1", 10**400])
def test_queue_failed_retention_is_validated(value: object) -> None:
    with pytest.raises((pgcoord.InvalidInputError, pgcoord.InvalidTypeError)):
        pgcoord.Coordinator(queue_failed_retention=value)


# -- queue inputs ------------------------------------------------------------------------------

_DURATION_OPTIONS = [
    "queue_lease",
    "queue_grace",
    "queue_notify_gap",
    "queue_txn_notify_window",
    "queue_idle_poll",
    "queue_idempotency_window",
    "queue_failed_retention",
]


@pytest.mark.parametrize("option", _DURATION_OPTIONS)
@pytest.mark.parametrize("value", [math.inf, 10**400])
def test_queue_duration_options_refuse_infinite_and_huge(option: str, value: object) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match=option):
        pgcoord.Coordinator(**{option: value})


@pytest.mark.parametrize("value", [10**400, 2**63, 2**31])
def test_queue_batch_refuses_ints_the_server_cannot_take(value: int) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="queue_batch"):
        pgcoord.Coordinator(queue_batch=value)


_BAD_PUBLISH = [
    ({"delay": math.inf}, "delay"),
    ({"delay": 10**400}, "delay"),
    ({"timeout": math.inf}, "timeout"),
    ({"timeout": 10**400}, "timeout"),
    ({"priority": 10**400}, "priority"),
    ({"priority": 2**63}, "priority"),
    ({"priority": -(2**63) - 1}, "priority"),
    ({"max_retries": 10**400}, "max_retries"),
    ({"max_retries": 2**63}, "max_retries"),
]


@pytest.mark.parametrize(("kwargs", "what"), _BAD_PUBLISH)
async def test_bad_publish_options_fail_before_any_write(
    coord: pgcoord.Coordinator, dsn: str, kwargs: dict[str, Any], what: str
) -> None:
    eq = coord.event_queue
    with pytest.raises(pgcoord.InvalidInputError, match=what):
        await eq.publish("ch", 1, **kwargs)
    with pytest.raises(pgcoord.InvalidInputError, match=what):
        await eq.publish_many("ch", [1, 2], **kwargs)
    with pytest.raises(pgcoord.InvalidInputError, match=what):
        await eq.publish("ch", 1, idempotency_key="k", **kwargs)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        with pytest.raises(pgcoord.InvalidInputError, match=what):
            await eq.publish("ch", 1, transaction=conn, **kwargs)
    assert _jobs(dsn) == 0
    assert _rows(dsn, "SELECT count(*) FROM pgcoord.queue_keys") == [(0,)]


@pytest.mark.parametrize("interval", [math.inf, 10**400])
async def test_subscribe_refuses_an_infinite_interval(
    coord: pgcoord.Coordinator, interval: object
) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="interval"):
        await coord.event_queue.subscribe("ch", process=lambda m, c: None, interval=interval)
    assert coord.event_queue.subscribed() == []


@pytest.mark.parametrize(
    "kwargs",
    [{"ids": [2**63]}, {"ids": [10**400]}, {"ids": [-(2**63) - 1]}],
)
async def test_dead_letter_filters_refuse_ids_out_of_range(
    coord: pgcoord.Coordinator, kwargs: dict[str, Any]
) -> None:
    eq = coord.event_queue
    for call in (eq.failed_jobs, eq.retry_failed, eq.purge_failed):
        with pytest.raises(pgcoord.InvalidInputError, match="job id"):
            await call(**kwargs)


@pytest.mark.parametrize("limit", [2**63, 10**400])
async def test_failed_jobs_refuses_a_limit_out_of_range(
    coord: pgcoord.Coordinator, limit: int
) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="limit"):
        await coord.event_queue.failed_jobs(limit=limit)


@pytest.mark.parametrize("older_than", [math.inf, 10**400])
async def test_purge_failed_refuses_an_infinite_age(
    coord: pgcoord.Coordinator, older_than: object
) -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="older_than"):
        await coord.event_queue.purge_failed(older_than=older_than)
