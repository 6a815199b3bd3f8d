"""Properties of the event queue over generated channels, messages and options.

The property of a publish: a typed error (InvalidInputError / InvalidTypeError) with the jobs and
keys tables unchanged (also when it was called inside the caller's transaction, which then
commits), or a job whose row holds exactly what was published and which a worker receives
exactly (message with the same types all the way down, ``ctx.options`` as given).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import pgcoord
from pgcoord import codec
from pgcoord.validation import storable
from tests.properties import strategies as gen
from tests.properties.strategies import BOUND, assert_same, outcome, table

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

_ids = itertools.count()

#: Publish keywords as a user may pass them: absent (the default), plain, or anything.
options = st.fixed_dictionaries(
    {},
    optional={
        "timeout": gen.sometimes(15.0, gen.numbers_or_junk),
        "max_retries": gen.sometimes(0, gen.numbers_or_junk),
        "delay": gen.sometimes(0.0, gen.numbers_or_junk),
        "priority": gen.sometimes(0, gen.numbers_or_junk),
        "idempotency_key": st.one_of(st.none(), gen.names),
    },
)

_DEFAULTS = {"timeout": 15.0, "max_retries": 0, "delay": 0.0, "priority": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def txconn(module_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The caller's own connection, for ``transaction=``."""
    conn = await psycopg.AsyncConnection.connect(module_dsn, autocommit=True)
    yield conn
    await conn.close()


async def _tables(db: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
    """What a refused publish must leave unchanged."""
    jobs = await table(db, "SELECT id, app, channel, payload FROM pgcoord.queue_jobs ORDER BY id")
    keys = await table(db, "SELECT app, channel, key, job_id FROM pgcoord.queue_keys ORDER BY 4")
    return jobs, keys


async def _last_job_id(db: psycopg.AsyncConnection[Any]) -> int:
    [(last,)] = await table(
        db,
        "SELECT greatest((SELECT max(id) FROM pgcoord.queue_jobs),"
        " (SELECT max(id) FROM pgcoord.queue_failed), 0)",
    )
    return int(last)


async def _in_mode(
    coord: pgcoord.Coordinator,
    txconn: psycopg.AsyncConnection[Any],
    in_transaction: bool,
    publish: Any,
) -> tuple[bool, Any]:
    """Call ``publish(**extra)``, inside the caller's committed transaction when asked."""
    if not in_transaction:
        return await outcome(publish())
    async with txconn.transaction():
        result = await outcome(publish(transaction=txconn))
        await txconn.execute(b"SELECT 1")  # raises if the refused publish aborted the transaction
    return result


async def check_publish(
    coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    channel: Any,
    message: Any,
    opts: dict[str, Any],
    in_transaction: bool,
) -> None:
    """publish(channel, message, **opts): refused before writing, or a row holding exactly that."""
    queue = coord.event_queue
    before = await _tables(db)
    done, job_id = await _in_mode(
        coord, txconn, in_transaction, lambda **kw: queue.publish(channel, message, **opts, **kw)
    )
    gen.tally("publish accepted" if done else f"refused: {str(job_id)[:25]}")
    if not done:
        assert await _tables(db) == before, f"a refused publish wrote something ({job_id})"
        return
    try:
        assert isinstance(job_id, int)
        found = await table(
            db,
            "SELECT channel, priority, max_retries, timeout, payload,"
            " extract(epoch FROM run_at - created_at)::float8"
            f" FROM pgcoord.queue_jobs WHERE id = {int(job_id)}",
        )
        assert len(found) == 1, f"publish returned {job_id} but no such job exists"
        [(got_channel, priority, retries, timeout, payload, delay)] = found
        want = {**_DEFAULTS, **{k: v for k, v in opts.items() if k != "idempotency_key"}}
        assert got_channel == channel
        assert priority == want["priority"]
        assert retries == want["max_retries"]
        assert timeout == float(want["timeout"]), (timeout, want["timeout"])
        assert abs(delay - float(want["delay"])) < 1.0, (delay, want["delay"])
        assert_same(codec.decode(payload), message, "stored payload")
        key = opts.get("idempotency_key")
        if key is not None:
            done, again = await _in_mode(
                coord,
                txconn,
                in_transaction,
                lambda **kw: queue.publish(channel, "x", **opts, **kw),
            )
            assert done
            assert again == job_id, "a second publish with the same idempotency_key made a job"
    finally:
        await db.execute(b"DELETE FROM pgcoord.queue_jobs WHERE id = %s", (job_id,))
        await db.execute(b"DELETE FROM pgcoord.queue_keys WHERE job_id = %s", (job_id,))


@pytest.mark.parametrize("in_transaction", [False, True], ids=["plain", "txn"])
@gen.DB_SETTINGS
@given(channel=gen.sometimes("q", gen.names), message=gen.sometimes(1, gen.values), opts=options)
async def test_publish_stores_exactly_or_refuses_before_writing(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    in_transaction: bool,
    channel: Any,
    message: Any,
    opts: dict[str, Any],
) -> None:
    await check_publish(module_coord, db, txconn, channel, message, opts, in_transaction)


_PUBLISH_EXAMPLES = [
    ("true-stays-a-bool", "q", True, {}),
    ("nul-surrogate-message", "q", {"\x00": "\ud800"}, {}),
    ("split-pair-message", "q", "\ud83d\ude00", {}),
    ("nul-channel", "q\x00", 1, {}),
    ("surrogate-channel", "\udc00", 1, {}),
    ("255-channel", "\U0001f600" * 255, 1, {}),
    ("256-channel", "x" * 256, 1, {}),
    ("huge-delay", "q", 1, {"delay": 10**400}),
    ("huge-timeout", "q", 1, {"timeout": 10**400}),
    ("inf-timeout", "q", 1, {"timeout": math.inf}),
    ("1e300-timeout", "q", 1, {"timeout": 1e300}),
    ("inf-delay", "q", 1, {"delay": math.inf}),
    ("nan-delay", "q", 1, {"delay": math.nan}),
    ("negative-zero-delay", "q", 1, {"delay": -0.0}),
    ("bool-priority", "q", 1, {"priority": True}),
    ("float-priority", "q", 1, {"priority": 1.0}),
    ("int4-priority", "q", 1, {"priority": 2**31}),
    ("huge-max-retries", "q", 1, {"max_retries": 10**400}),
    ("bool-max-retries", "q", 1, {"max_retries": False}),
    ("nul-idempotency-key", "q", 1, {"idempotency_key": "k\x00"}),
    ("surrogate-idempotency-key", "q", 1, {"idempotency_key": "\ud800"}),
    ("empty-idempotency-key", "q", 1, {"idempotency_key": ""}),
]


@pytest.mark.parametrize("in_transaction", [False, True], ids=["plain", "txn"])
@pytest.mark.parametrize(
    ("channel", "message", "opts"),
    [pytest.param(*case[1:], id=case[0]) for case in _PUBLISH_EXAMPLES],
)
async def test_publish_examples(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    in_transaction: bool,
    channel: Any,
    message: Any,
    opts: dict[str, Any],
) -> None:
    await check_publish(module_coord, db, txconn, channel, message, opts, in_transaction)


# -- publish_many --------------------------------------------------------------------------------


async def check_publish_many(
    coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    channel: Any,
    messages: Any,
    opts: dict[str, Any],
    in_transaction: bool,
) -> None:
    """publish_many: all or nothing, and the rows hold the messages in order."""
    queue = coord.event_queue
    opts = {k: v for k, v in opts.items() if k != "idempotency_key"}
    before = await _tables(db)
    done, ids = await _in_mode(
        coord,
        txconn,
        in_transaction,
        lambda **kw: queue.publish_many(channel, messages, **opts, **kw),
    )
    if not done:
        assert await _tables(db) == before, f"a refused publish_many wrote something ({ids})"
        return
    try:
        assert len(ids) == len(messages)
        for job_id, message in zip(ids, messages, strict=True):
            [(payload,)] = await table(
                db, f"SELECT payload FROM pgcoord.queue_jobs WHERE id = {int(job_id)}"
            )
            assert_same(codec.decode(payload), message, "stored payload")
    finally:
        await db.execute(b"DELETE FROM pgcoord.queue_jobs WHERE id = ANY(%s)", (list(ids),))


@pytest.mark.parametrize("in_transaction", [False, True], ids=["plain", "txn"])
@gen.DB_SETTINGS
@given(
    channel=gen.sometimes("q", gen.names),
    messages=st.lists(gen.sometimes(1, gen.values), max_size=4),
    opts=options,
)
async def test_publish_many_is_all_or_nothing(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    in_transaction: bool,
    channel: Any,
    messages: list[Any],
    opts: dict[str, Any],
) -> None:
    await check_publish_many(module_coord, db, txconn, channel, messages, opts, in_transaction)


# -- a worker receives exactly what was published --------------------------------------------


class Received:
    """Jobs the module's worker ran: (message, ctx.options), by a tag in the message."""

    def __init__(self) -> None:
        self.arrived: dict[int, asyncio.Future[tuple[Any, dict[str, Any]]]] = {}

    def expect(self, tag: int) -> asyncio.Future[tuple[Any, dict[str, Any]]]:
        future = self.arrived[tag] = asyncio.get_running_loop().create_future()
        return future

    async def process(self, message: Any, ctx: Any) -> None:
        future = self.arrived.pop(message["tag"], None)
        if future is not None and not future.done():
            future.set_result((message["body"], dict(ctx.options)))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(module_coord: pgcoord.Coordinator) -> AsyncIterator[Received]:
    """A worker on the queue ``work`` of the module's Coordinator."""
    received = Received()
    await module_coord.event_queue.subscribe("work", process=received.process, concurrency=8)
    yield received
    await module_coord.event_queue.unsubscribe("work")


@gen.DB_SETTINGS
@given(
    body=gen.values,
    timeout=gen.sometimes(15.0, gen.numbers),
    max_retries=gen.sometimes(0, gen.numbers),
    priority=gen.sometimes(0, gen.numbers),
)
async def test_a_worker_receives_exactly_what_was_published(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    worker: Received,
    body: Any,
    timeout: Any,
    max_retries: Any,
    priority: Any,
) -> None:
    tag = next(_ids)
    arrival = worker.expect(tag)
    # Earlier examples' jobs finish meanwhile: only a new row would show a write.
    last = await _last_job_id(db)
    done, _ = await outcome(
        module_coord.event_queue.publish(
            "work",
            {"tag": tag, "body": body},
            timeout=timeout,
            max_retries=max_retries,
            priority=priority,
        )
    )
    if not done:
        worker.arrived.pop(tag, None)
        assert await _last_job_id(db) <= last, "a refused publish made a job"
        return
    try:
        message, ctx_options = await asyncio.wait_for(arrival, BOUND)
    except TimeoutError:
        raise AssertionError(f"the job was not run within {BOUND} s") from None
    assert_same(message, body, "message handed to process")
    assert ctx_options["priority"] == priority
    assert ctx_options["max_retries"] == max_retries
    assert ctx_options["timeout"] == float(timeout)


# -- subscribe options -------------------------------------------------------------------------


@gen.SLOW_SETTINGS
@given(
    channel=gen.sometimes("sub", gen.names),
    concurrency=gen.sometimes(1, gen.numbers_or_junk),
    interval=gen.sometimes(0.25, gen.numbers_or_junk),
    idle=st.sampled_from([None, "always", 1]),
)
async def test_subscribe_refuses_or_runs_jobs(
    module_coord: pgcoord.Coordinator,
    channel: Any,
    concurrency: Any,
    interval: Any,
    idle: Any,
) -> None:
    """subscribe(...) refuses with a typed error, or subscribes a worker that runs a job."""
    queue = module_coord.event_queue
    ran: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def process(message: Any, ctx: Any) -> None:
        if not ran.done():
            ran.get_loop().call_soon_threadsafe(
                lambda: None if ran.done() else ran.set_result(message)
            )

    idle_fn: Any = (lambda: True) if idle == "always" else idle
    done, _ = await outcome(
        queue.subscribe(
            channel, process=process, idle=idle_fn, concurrency=concurrency, interval=interval
        )
    )
    gen.tally(f"subscribe {'accepted' if done else 'refused'}")
    if not done:
        assert channel not in queue.subscribed()
        return
    try:
        job = await queue.publish(channel, {"\x00": [True]})
        try:
            got = await asyncio.wait_for(ran, BOUND)
        except TimeoutError:
            raise AssertionError(
                f"a subscribed worker did not run a job within {BOUND} s"
            ) from None
        assert_same(got, {"\x00": [True]})
        assert job > 0
    finally:
        await outcome(queue.unsubscribe(channel))
    assert channel not in queue.subscribed()


# -- a handler's error text is stored, whatever it holds -------------------------------------


class Failing:
    """A worker whose ``process`` raises ``ValueError(message["error"])`` (issue 11, defect 1:
    job payloads may hold NUL and lone surrogates, so the error text may too)."""

    async def process(self, message: Any, ctx: Any) -> None:
        raise ValueError(message["error"])


_apps = itertools.count()


@pytest_asyncio.fixture(loop_scope="module")
async def failing(module_dsn: str) -> AsyncIterator[pgcoord.Coordinator]:
    """A Coordinator of its own (a fresh outcome writer, an app of its own so no other test's
    jobs are claimed) with a worker on the queue ``fails`` whose every job fails."""
    coord = pgcoord.Coordinator(module_dsn, app=f"fails{next(_apps)}", heartbeat=1.0)
    await coord.start()
    worker = Failing()
    await coord.event_queue.subscribe("fails", process=worker.process, concurrency=4)
    yield coord
    with contextlib.suppress(TimeoutError):  # a stuck outcome writer may keep stop() waiting
        await asyncio.wait_for(coord.stop(), _DEAD_LETTER_BOUND / 2)


async def check_failing_job(coord: pgcoord.Coordinator, error_text: str) -> None:
    """A job whose handler raises with ``error_text`` becomes one dead letter holding the
    message exactly and the error text made storable; ``flush()`` returns; nothing re-runs."""
    queue = coord.event_queue
    message = {"error": error_text, "tag": next(_ids)}
    done, job_id = await outcome(queue.publish("fails", message, max_retries=0))
    if not done:
        return  # the message itself was refused (a split surrogate pair): nothing to run

    async def dead_letter() -> list[Any]:
        while True:
            await queue.flush()
            found = await queue.failed_jobs("fails", ids=[job_id])
            if found:
                return found
            await asyncio.sleep(0.05)

    try:
        dead = await asyncio.wait_for(dead_letter(), _DEAD_LETTER_BOUND)
    except TimeoutError:
        raise AssertionError(
            f"job {job_id} failed but flush() or its dead letter did not come within "
            f"{_DEAD_LETTER_BOUND} s"
        ) from None
    [letter] = dead
    assert_same(letter.message, message, "dead letter message")
    assert storable(error_text) in letter.error, f"error {letter.error!a} lost {error_text!a}"
    assert letter.retried == 0
    # One outcome per job: the job is gone from the queue, not leased again.
    rows = await queue.stats("fails")
    await queue.purge_failed("fails", ids=[job_id])
    assert rows["ready"] == 0 and rows["scheduled"] == 0, rows


#: Generous for one failed job's dead letter; shorter than BOUND because a stuck outcome writer
#: makes every later example wait this long.
_DEAD_LETTER_BOUND = 20.0


# No shrinking: a stuck writer makes each shrink step wait the bound out, and the explicit
# examples below already are the minimal cases.
@settings(gen.SLOW_SETTINGS, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(error_text=st.one_of(gen.text, st.text(gen.ANY_CHAR, max_size=40)))
async def test_a_handler_error_with_any_text_becomes_one_dead_letter(
    failing: pgcoord.Coordinator, error_text: str
) -> None:
    await check_failing_job(failing, error_text)


@pytest.mark.parametrize(
    "error_text",
    [
        pytest.param("plain", id="plain"),
        pytest.param("nul\x00inside", id="nul"),
        pytest.param("lone\ud800surrogate", id="lone-surrogate"),
        pytest.param("\udfff\x00", id="both"),
        pytest.param("e\u0301\U0001f600", id="combining-and-astral"),
    ],
)
async def test_a_handler_error_examples(failing: pgcoord.Coordinator, error_text: str) -> None:
    await check_failing_job(failing, error_text)
