"""Pub/sub: publish->handler latency and sustained publish rate, pgcoord vs raw NOTIFY vs Redis.

Rows (one run, contenders alternated in short rounds so machine noise hits them evenly):

* publish->handler latency p50/p99 of ``PubSubManager`` (one instance publishes, another in the
  same process receives) beside raw psycopg ``pg_notify`` -> ``LISTEN`` on two connections and
  redis-py ``PUBLISH`` -> ``SUBSCRIBE``. Goal: p50 within +0.3 ms of raw.
* the same latency for a sync message (logged: INSERT + NOTIFY in one transaction).
* sustained messages/s from one publisher: ``PubSubManager.publish`` beside raw ``pg_notify``
  on one connection (goal >= 0.7) and redis-py ``PUBLISH``; ``SyncMessageManager.publish``
  beside the raw INSERT + NOTIFY statement it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import redis.asyncio as aioredis

import pgcoord
from bench._common import BenchContext, interleaved, percentiles, rate

MESSAGE = {"event": "record.updated", "collection": "posts", "id": 4242}
PAYLOAD = pgcoord.codec.encode(MESSAGE)
RAW_CHANNEL = "bench_raw"
# The raw primitive: the same INSERT + NOTIFY into a copy of the log table without pgcoord's
# commit-order trigger (LIKE copies columns, defaults and indexes, not triggers), so the row
# shows what pgcoord adds, trigger included.
RAW_LOG_TABLE = "CREATE TABLE bench_raw_log (LIKE pgcoord.message_log INCLUDING ALL)"
RAW_LOGGED = (
    "WITH r AS (INSERT INTO bench_raw_log (channel, xid, durable, envelope)"
    " VALUES (%s, pg_current_xact_id()::text::bigint, true, %s) RETURNING channel, envelope)"
    " SELECT pg_notify(r.channel, r.envelope) FROM r"
)

Probe = Callable[[], Awaitable[float]]


class _Waiter:
    """Resolves the pending future when a message arrives."""

    def __init__(self) -> None:
        self.future: asyncio.Future[float] | None = None

    def arm(self) -> asyncio.Future[float]:
        self.future = asyncio.get_running_loop().create_future()
        return self.future

    def hit(self, *_: Any) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(time.perf_counter())


async def _latencies(probes: list[Probe], seconds: float, rounds: int = 6) -> list[list[float]]:
    samples: list[list[float]] = [[] for _ in probes]
    for _ in range(rounds):
        for i, probe in enumerate(probes):
            deadline = time.perf_counter() + seconds / rounds
            while time.perf_counter() < deadline:
                samples[i].append(await probe())
    return samples


async def run(ctx: BenchContext) -> None:
    """Measure and record the rows described in the module docstring."""
    dsn = ctx.fresh_database()
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute(RAW_LOG_TABLE)
    sender = pgcoord.Coordinator(dsn, app="bench")
    receiver = pgcoord.Coordinator(dsn, app="bench")
    await sender.start()
    await receiver.start()
    raw_listen = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    raw_send = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    redis_pub = aioredis.Redis.from_url(ctx.redis_url)
    redis_sub = aioredis.Redis.from_url(ctx.redis_url)
    pubsub = redis_sub.pubsub(ignore_subscribe_messages=True)
    tasks: list[asyncio.Task[None]] = []
    try:
        pg_waiter, sync_waiter, raw_waiter, redis_waiter = (_Waiter() for _ in range(4))
        await receiver.pubsub_manager.subscribe("lat", pg_waiter.hit)
        await receiver.sync_message_manager.subscribe("lat", sync_waiter.hit)
        await raw_listen.execute(f"LISTEN {RAW_CHANNEL}")

        async def pump_raw() -> None:
            async for _ in raw_listen.notifies():
                raw_waiter.hit()

        async def pump_redis() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    redis_waiter.hit()

        await pubsub.subscribe("lat")
        tasks += [asyncio.create_task(pump_raw()), asyncio.create_task(pump_redis())]

        async def pgcoord_probe() -> float:
            future = pg_waiter.arm()
            start = time.perf_counter()
            await sender.pubsub_manager.publish("lat", MESSAGE)
            return await future - start

        async def sync_probe() -> float:
            future = sync_waiter.arm()
            start = time.perf_counter()
            await sender.sync_message_manager.publish("lat", MESSAGE)
            return await future - start

        async def raw_probe() -> float:
            future = raw_waiter.arm()
            start = time.perf_counter()
            await raw_send.execute("SELECT pg_notify(%s, %s)", (RAW_CHANNEL, PAYLOAD))
            return await future - start

        async def redis_probe() -> float:
            future = redis_waiter.arm()
            start = time.perf_counter()
            await redis_pub.publish("lat", PAYLOAD)
            return await future - start

        print("latency ...", flush=True)
        pg_s, sync_s, raw_s, redis_s = await _latencies(
            [pgcoord_probe, sync_probe, raw_probe, redis_probe], ctx.seconds * 2
        )
        (pg50, pg99), (sy50, sy99) = percentiles(pg_s), percentiles(sync_s)
        (raw50, raw99), (re50, re99) = percentiles(raw_s), percentiles(redis_s)
        us = 1e6
        ctx.row(
            "publish->handler latency p50",
            pg50 * us,
            "µs",
            baseline="raw pg_notify->LISTEN p50",
            baseline_value=raw50 * us,
            note=f"goal: <= raw + 300 µs; +{(pg50 - raw50) * us:,.0f} µs",
        )
        ctx.row(
            "publish->handler latency p99",
            pg99 * us,
            "µs",
            baseline="raw pg_notify->LISTEN p99",
            baseline_value=raw99 * us,
        )
        ctx.row(
            "publish->handler latency p50",
            pg50 * us,
            "µs",
            baseline="redis-py PUBLISH->SUBSCRIBE p50",
            baseline_value=re50 * us,
        )
        ctx.row(
            "publish->handler latency p99",
            pg99 * us,
            "µs",
            baseline="redis-py PUBLISH->SUBSCRIBE p99",
            baseline_value=re99 * us,
        )
        ctx.row(
            "sync message publish->handler p50",
            sy50 * us,
            "µs",
            baseline="raw pg_notify->LISTEN p50",
            baseline_value=raw50 * us,
            note=f"logged (INSERT + NOTIFY); p99 {sy99 * us:,.0f} µs",
        )

        # Throughput: nobody in this process listens, so only the publisher is measured.
        await receiver.stop()
        for task in tasks:
            # notifies() holds its connection's lock: stop it before touching the connection.
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await raw_listen.close()
        pg_channel = sender._rt.channel("sync", "tp")

        async def pgcoord_rate(seconds: float) -> float:
            return await rate(lambda: sender.pubsub_manager.publish("tp", MESSAGE), seconds)

        async def raw_rate(seconds: float) -> float:
            return await rate(
                lambda: raw_send.execute("SELECT pg_notify(%s, %s)", ("bench_tp", PAYLOAD)),
                seconds,
            )

        async def redis_rate(seconds: float) -> float:
            return await rate(lambda: redis_pub.publish("tp", PAYLOAD), seconds)

        async def sync_rate(seconds: float) -> float:
            return await rate(lambda: sender.sync_message_manager.publish("tp", MESSAGE), seconds)

        async def raw_logged_rate(seconds: float) -> float:
            return await rate(lambda: raw_send.execute(RAW_LOGGED, (pg_channel, PAYLOAD)), seconds)

        print("throughput ...", flush=True)
        pg_r, raw_r, redis_r, sync_r, raw_logged_r = await interleaved(
            [pgcoord_rate, raw_rate, redis_rate, sync_rate, raw_logged_rate], ctx.seconds * 2
        )
        ctx.row(
            "PubSubManager.publish, 1 publisher",
            pg_r,
            "msgs/s",
            baseline="raw pg_notify, 1 connection",
            baseline_value=raw_r,
            note="goal: ratio >= 0.7",
        )
        ctx.row(
            "PubSubManager.publish, 1 publisher",
            pg_r,
            "msgs/s",
            baseline="redis-py PUBLISH",
            baseline_value=redis_r,
        )
        ctx.row(
            "SyncMessageManager.publish, 1 publisher",
            sync_r,
            "msgs/s",
            baseline="raw INSERT + pg_notify, no trigger",
            baseline_value=raw_logged_r,
            note="every sync message is logged (durable catch-up)",
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pubsub.aclose()
        await redis_pub.aclose()
        await redis_sub.aclose()
        await raw_listen.close()
        await raw_send.close()
        await receiver.stop()
        await sender.stop()
