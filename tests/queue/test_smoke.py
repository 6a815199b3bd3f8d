"""First end-to-end check: publish, consume, complete."""

from __future__ import annotations

import asyncio

import psycopg

from tests.support import CoordFactory


async def test_publish_and_process(make_coord: CoordFactory, dsn: str) -> None:
    coord = await make_coord()
    got: list[tuple[object, int]] = []
    done = asyncio.Event()

    async def process(message: object, ctx: object) -> None:
        got.append((message, ctx.retried))  # type: ignore[attr-defined]
        if len(got) == 3:
            done.set()

    await coord.event_queue.subscribe("q", process=process)
    ids = [await coord.event_queue.publish("q", {"n": i}) for i in range(3)]
    await asyncio.wait_for(done.wait(), 10)
    await coord.event_queue.flush()
    assert [m for m, _ in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
    with psycopg.connect(dsn) as conn:
        left = conn.execute("SELECT count(*) FROM pgcoord.queue_jobs").fetchone()
    assert left == (0,)
    assert ids == sorted(ids)
