"""publish(idempotency_key=...): a retry after an ambiguous failure cannot enqueue twice."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgcoord
from tests.faults.proxy import stall_proxy
from tests.support import CoordFactory


def job_count(dsn: str, channel: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pgcoord.queue_jobs WHERE channel = %s", (channel,)
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_key_used_twice_enqueues_once_and_returns_the_first_id(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    first = await coord.event_queue.publish("jobs", {"n": 1}, idempotency_key="order-17")
    again = await coord.event_queue.publish("jobs", {"n": 2}, idempotency_key="order-17")
    other = await coord.event_queue.publish("jobs", {"n": 3}, idempotency_key="order-18")
    assert again == first != other
    assert job_count(dsn, "jobs") == 2
    # Keys are per channel: the same key on another queue is another job.
    elsewhere = await coord.event_queue.publish("mail", {"n": 1}, idempotency_key="order-17")
    assert elsewhere not in (first, other)


async def test_racing_publishes_of_one_key_from_two_instances_make_one_job(
    make_coord: CoordFactory, dsn: str
) -> None:
    a = await make_coord(app="shop")
    b = await make_coord(app="shop")
    ids = await asyncio.gather(
        *[
            (a if i % 2 else b).event_queue.publish("jobs", {"i": i}, idempotency_key="k")
            for i in range(20)
        ]
    )
    assert len(set(ids)) == 1
    assert job_count(dsn, "jobs") == 1


async def test_the_job_of_a_key_runs_once(make_coord: CoordFactory) -> None:
    coord = await make_coord()
    ran: list[Any] = []
    done = asyncio.Event()

    async def process(message: Any, ctx: Any) -> None:
        ran.append(message)
        done.set()

    await coord.event_queue.subscribe("jobs", process=process)
    for n in range(3):
        await coord.event_queue.publish("jobs", {"n": n}, idempotency_key="once")
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.5)
    assert ran == [{"n": 0}]


async def test_a_key_from_a_rolled_back_transaction_is_free_again(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await coord.event_queue.publish("jobs", {"n": 1}, idempotency_key="k", transaction=conn)
        await conn.rollback()
    assert job_count(dsn, "jobs") == 0
    await coord.event_queue.publish("jobs", {"n": 2}, idempotency_key="k")
    assert job_count(dsn, "jobs") == 1


async def test_a_retry_after_an_ambiguous_failure_does_not_enqueue_twice(dsn: str) -> None:
    with stall_proxy(dsn) as (proxy, proxied_dsn):
        coord = pgcoord.Coordinator(proxied_dsn, app="shop", command_timeout=1.0)
        await coord.start()
        try:
            await coord.event_queue.publish("warm", {})
            for key, expected in (("order-1", 1), (None, 2)):
                # The INSERT reaches the server and commits; its answer never comes back.
                proxy.stall(up=False)
                with pytest.raises(pgcoord.ConnectionFailedError):
                    await coord.event_queue.publish("jobs", {"key": key}, idempotency_key=key)
                proxy.resume()
                # The application retries, as it must after "may have committed".
                await coord.event_queue.publish("jobs", {"key": key}, idempotency_key=key)
                with psycopg.connect(dsn) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pgcoord.queue_jobs WHERE payload::jsonb = %s",
                        (psycopg.types.json.Jsonb({"key": key}),),
                    ).fetchone()
                # With the key: one job. Without it: the retry enqueued a second one.
                assert row is not None and row[0] == expected
        finally:
            proxy.resume()
            await coord.stop()


async def test_keys_older_than_the_window_are_swept_and_free_again(
    make_coord: CoordFactory, dsn: str
) -> None:
    from pgcoord.queue import keys

    coord = await make_coord(queue_idempotency_window=0.2)
    first = await coord.event_queue.publish("jobs", {}, idempotency_key="old")
    await asyncio.sleep(0.3)
    for i in range(keys.SWEEP_EVERY):
        await coord.event_queue.publish("other", {}, idempotency_key=f"k{i}")
    await asyncio.sleep(0.5)  # the sweep runs in the background
    again = await coord.event_queue.publish("jobs", {}, idempotency_key="old")
    assert again != first


async def test_one_apps_short_window_never_sweeps_another_apps_keys(
    make_coord: CoordFactory, dsn: str
) -> None:
    from pgcoord.queue import keys

    hasty = await make_coord(app="hasty", queue_idempotency_window=0.2)
    patient = await make_coord(app="patient")  # the default window: a day
    first = await patient.event_queue.publish("jobs", {}, idempotency_key="order-1")
    await asyncio.sleep(0.3)
    for i in range(keys.SWEEP_EVERY):  # makes the hasty app sweep
        await hasty.event_queue.publish("jobs", {}, idempotency_key=f"k{i}")
    await asyncio.sleep(0.5)
    assert await patient.event_queue.publish("jobs", {}, idempotency_key="order-1") == first


@pytest.mark.parametrize(
    ("key", "error"),
    [(17, pgcoord.InvalidTypeError), ("", pgcoord.InvalidInputError), ("x" * 300, ValueError)],
)
async def test_a_bad_key_is_refused_before_anything_is_written(
    coord: pgcoord.Coordinator, dsn: str, key: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await coord.event_queue.publish("jobs", {}, idempotency_key=key)
    assert job_count(dsn, "jobs") == 0


def test_the_blocking_api_takes_the_key_too(dsn: str) -> None:
    with pgcoord.BlockingCoordinator(dsn) as coord:
        first = coord.event_queue.publish("jobs", {}, idempotency_key="b")
        assert coord.event_queue.publish("jobs", {}, idempotency_key="b") == first
    with psycopg.connect(dsn) as conn:
        with pgcoord.BlockingCoordinator(dsn) as coord:
            again = coord.event_queue.publish_sync(
                "jobs", {}, transaction=conn, idempotency_key="b"
            )
        conn.commit()
    assert again == first
    assert job_count(dsn, "jobs") == 1
