"""Foundation costs: a round trip through the work pool, Coordinator start, re-LISTEN after a loss.

Compared with the raw psycopg primitive measured in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import psycopg

import pgcoord
from bench._common import BenchContext, rate


async def _relisten_seconds(coord: pgcoord.Coordinator, dsn: str, channel: str) -> float:
    got: list[str] = []
    await coord.listener.listen(channel, lambda ch, p: got.append(p))
    pid = coord.listener.backend_pid
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
        await other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        started = time.perf_counter()
        while not got:
            await other.execute("SELECT pg_notify(%s, 'x')", (channel,))
            await asyncio.sleep(0.002)
    return time.perf_counter() - started


async def run(ctx: BenchContext) -> None:
    """Print the foundation figures."""
    dsn = ctx.fresh_database()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as raw:

        async def raw_select() -> None:
            await raw.execute("SELECT 1")

        raw_rate = await rate(raw_select, ctx.seconds)

    async with pgcoord.Coordinator(dsn) as coord:

        async def pooled_select() -> None:
            async with coord._rt.connection() as conn:
                await conn.execute("SELECT 1")

        pooled_rate = await rate(pooled_select, ctx.seconds)
        ctx.row(
            "SELECT 1 through the work pool (borrow per call)",
            pooled_rate,
            "ops/s",
            baseline="raw psycopg, one connection",
            baseline_value=raw_rate,
        )
        relisten = [
            await _relisten_seconds(coord, dsn, f"bench_relisten_{n}") * 1000 for n in range(5)
        ]
        ctx.row(
            "re-LISTEN after pg_terminate_backend (median of 5)",
            statistics.median(relisten),
            "ms",
            note="issue bound: 2,000 ms",
        )

    starts = []
    connects = []
    for _ in range(5):
        began = time.perf_counter()
        async with pgcoord.Coordinator(dsn):
            starts.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        conn = await psycopg.AsyncConnection.connect(dsn)
        connects.append((time.perf_counter() - began) * 1000)
        await conn.close()
    ctx.row(
        "Coordinator start (median of 5)",
        statistics.median(starts),
        "ms",
        baseline="one raw psycopg connect",
        baseline_value=statistics.median(connects),
        note="listener + pool + schema check + services",
    )
