"""Cache: get (hit) and set ops/s, pgcoord vs the raw UNLOGGED primitive vs Redis, in one run.

Rows: ``Cache.get`` hit and ``Cache.set`` on 1 and 8 concurrent tasks, each beside the raw
psycopg statement on the same table (SELECT by primary key / upsert; 1 connection, or one
connection per task) and beside redis-py asyncio GET/SET on the local Redis; then a near-cache
``get`` (``local_ttl``) beside Redis GET. Goals: raw ratio >= 0.8, near cache >= 50x Redis.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import redis.asyncio as aioredis

import pgcoord
from bench._common import BenchContext, interleaved, rate
from pgcoord import codec

VALUE = {"user": 42, "name": "Ada", "roles": ["admin", "dev"]}
RAW_GET = "SELECT value FROM pgcoord.cache_entries WHERE ns = %s AND key = %s"
RAW_SET = (
    "INSERT INTO pgcoord.cache_entries (ns, key, value, expires_at, written_at)"
    " VALUES (%s, %s, %s, NULL, now()) ON CONFLICT (ns, key) DO UPDATE"
    " SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at, written_at = EXCLUDED.written_at"
)


class _RawConns:
    """One autocommit connection per task, running a statement directly (the raw primitive)."""

    def __init__(self, dsn: str, query: str, params: tuple[Any, ...]) -> None:
        self.dsn, self.query, self.params = dsn, query, params
        self.conns: list[psycopg.AsyncConnection[Any]] = []

    async def open(self, count: int) -> None:
        while len(self.conns) < count:
            self.conns.append(await psycopg.AsyncConnection.connect(self.dsn, autocommit=True))

    async def rate(self, tasks: int, seconds: float) -> float:
        await self.open(tasks)
        count = 0

        async def loop(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal count
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                cur = await conn.execute(self.query, self.params)  # type: ignore[arg-type]
                if cur.description is not None:
                    await cur.fetchone()
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop(conn) for conn in self.conns[:tasks]))
        return count / (time.perf_counter() - start)

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()


async def run(ctx: BenchContext) -> None:
    """Measure and record the rows described in the module docstring."""
    dsn = ctx.fresh_database()
    seconds = ctx.seconds
    text = codec.encode(VALUE)
    red = aioredis.from_url(ctx.redis_url)
    await red.set("bench:k", text)
    async with pgcoord.Coordinator(dsn, app="bench", pool_size=8) as coord:
        cache = coord.cache
        await cache.set("k", VALUE)
        near = coord.cache_manager.create_cache("near", local_ttl=60)
        await near.set("k", VALUE)
        # warm up: pool connections opened, statements prepared
        await asyncio.gather(*(cache.get("k") for _ in range(200)))
        ns = cache.ns
        raw_get = _RawConns(dsn, RAW_GET, (ns, "k"))
        raw_set = _RawConns(dsn, RAW_SET, (ns, "k", text))
        for tasks in (1, 8):
            ours, raw, peer = await interleaved(
                [
                    lambda s, t=tasks: rate(lambda: cache.get("k"), s, tasks=t),
                    lambda s, t=tasks: raw_get.rate(t, s),
                    lambda s, t=tasks: rate(lambda: red.get("bench:k"), s, tasks=t),
                ],
                seconds,
            )
            ctx.row(
                f"get hit, {tasks} task(s)",
                ours,
                "ops/s",
                baseline="raw SELECT by key",
                baseline_value=raw,
                note="goal >= 0.8",
            )
            ctx.row(
                f"get hit, {tasks} task(s)",
                ours,
                "ops/s",
                baseline="redis-py asyncio GET",
                baseline_value=peer,
            )
        for tasks in (1, 8):
            ours, raw, peer = await interleaved(
                [
                    lambda s, t=tasks: rate(lambda: cache.set("k", VALUE), s, tasks=t),
                    lambda s, t=tasks: raw_set.rate(t, s),
                    lambda s, t=tasks: rate(lambda: red.set("bench:k", text), s, tasks=t),
                ],
                seconds,
            )
            ctx.row(
                f"set, {tasks} task(s)",
                ours,
                "ops/s",
                baseline="raw UNLOGGED upsert",
                baseline_value=raw,
                note="goal >= 0.8; one hot key",
            )
            ctx.row(
                f"set, {tasks} task(s)",
                ours,
                "ops/s",
                baseline="redis-py asyncio SET",
                baseline_value=peer,
            )
        await raw_get.close()
        await raw_set.close()
        ours = await rate(lambda: near.get("k"), seconds)
        peer = await rate(lambda: red.get("bench:k"), seconds)
        ctx.row(
            "near-cache get, 1 task",
            ours,
            "ops/s",
            baseline="redis-py asyncio GET",
            baseline_value=peer,
            note="goal >= 50x",
        )
        ours = await rate(lambda: near.set("k", VALUE), seconds, tasks=8)
        ctx.row(
            "near-cache set (write + NOTIFY), 8 tasks",
            ours,
            "ops/s",
            note="NOTIFYs of concurrent writers are batched",
        )
    await red.aclose()
