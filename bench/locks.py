"""Locks: uncontended cycles/s and contended handoffs/s, pgcoord vs raw advisory locks vs Redis.

Rows, all measured in this one run. The machine is noisy, so contenders alternate: uncontended
loops in 0.25 s slices, contended runs in two halves; each figure covers all its slices.

- uncontended ``LockManager.run_exclusive`` (1 task, no-op fn) beside the raw
  ``pg_advisory_lock`` + ``pg_advisory_unlock`` pair on one connection, as psycopg runs it
  (goal: ratio >= 0.8); beside the same pair sent through libpq directly, prepared, with no
  cursor layer (the path pgcoord's hot statements take, see ``pgcoord/_prepared.py``: the gap
  to it is what pgcoord's own bookkeeping costs); and beside python-redis-lock
  ``Lock.acquire`` + ``release`` on the local Redis;
- one key contended by 8 tasks in 2 processes: ``run_exclusive`` handoffs/s beside the raw
  blocking pair on 8 connections (goal: ratio >= 0.8) and beside python-redis-lock with 8
  threads in 2 processes.

Child processes: ``python -m bench.locks MODE DSN REDIS_URL START_AT SECONDS`` prints ``{"count": n}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

import pgcoord
from bench._common import BenchContext, rate, sync_rate
from pgcoord import _prepared

RAW_KEY = 424242
TASKS_PER_PROCESS = 4
PROCESSES = 2


def _noop() -> None:
    return None


async def _uncontended(ctx: BenchContext, dsn: str) -> tuple[float, float, float, float]:
    import redis
    import redis_lock

    rounds = max(2, round(ctx.seconds / 0.25))
    piece = ctx.seconds / rounds
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    lean_conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    lock_stmt = _prepared.Statement("bench_lock", b"SELECT pg_advisory_lock(%s)", (_prepared.INT8,))
    unlock_stmt = _prepared.Statement(
        "bench_unlock", b"SELECT pg_advisory_unlock(%s)", (_prepared.INT8,)
    )
    lean_key = (_prepared.int8(RAW_KEY + 1),)
    lean_formats = (_prepared.BINARY_FORMAT,)
    coord = pgcoord.Coordinator(dsn, app="bench")
    await coord.start()
    client = redis.Redis.from_url(ctx.redis_url)
    rlock = redis_lock.Lock(client, "pgcoord-bench-uncontended", expire=30)
    try:

        async def raw() -> None:
            await conn.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
            await conn.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))

        async def lean() -> None:
            await _prepared.run(lean_conn, lock_stmt, lean_key, lean_formats)
            await _prepared.run(lean_conn, unlock_stmt, lean_key, lean_formats)

        async def pgcoord_cycle() -> None:
            await coord.lock_manager.run_exclusive("uncontended", _noop)

        def redis_cycle() -> None:
            rlock.acquire()
            rlock.release()

        for _ in range(200):  # warm up: connections open, statements prepared
            await raw()
            await lean()
            await pgcoord_cycle()
            redis_cycle()
        totals = [0.0, 0.0, 0.0, 0.0]
        for _ in range(rounds):
            totals[0] += await rate(raw, piece) / rounds
            totals[1] += await rate(pgcoord_cycle, piece) / rounds
            totals[2] += sync_rate(redis_cycle, piece) / rounds
            totals[3] += await rate(lean, piece) / rounds
        return totals[0], totals[1], totals[2], totals[3]
    finally:
        await conn.close()
        await lean_conn.close()
        await coord.stop()
        client.close()


HELD = 10_000


async def _with_many_held(ctx: BenchContext, dsn: str) -> tuple[float, float, float]:
    """(acquire+release cycles/s with none held, the same with HELD held, seconds to take HELD).

    Each cycle takes a key never taken before, so neither figure profits from a warm key.
    """
    coord = pgcoord.Coordinator(dsn, app="benchheld")
    await coord.start()
    locks = coord.lock_manager
    fresh = iter(range(10**9))

    async def cycle() -> None:
        await locks.run_exclusive(f"fresh-{next(fresh)}", _noop)

    try:
        for _ in range(200):
            await cycle()
        none_held = await rate(cycle, ctx.seconds)
        started = time.perf_counter()
        held = [await locks.acquire(f"held-{i}", ttl=600) for i in range(HELD)]
        took = time.perf_counter() - started
        many_held = await rate(cycle, ctx.seconds)
        for lock in held:
            await lock.release()
        return none_held, many_held, took
    finally:
        await coord.stop()


async def _contended(ctx: BenchContext, dsn: str, mode: str) -> float:
    """Handoffs/s of one key among 2 processes x 4 tasks (threads for Redis)."""
    start_at = time.time() + 2.0  # time for both children to start and connect
    seconds = ctx.seconds / 2
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.locks",
            mode,
            dsn,
            ctx.redis_url,
            repr(start_at),
            repr(seconds),
            cwd=Path(__file__).resolve().parent.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    total = 0
    for proc in procs:
        out, err = await proc.communicate()
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"bench child {mode} failed ({proc.returncode}): {tail}")
        total += json.loads(out.decode().strip().splitlines()[-1])["count"]
    return total / seconds


async def run(ctx: BenchContext) -> None:
    """Measure the rows described in the module docstring."""
    dsn = ctx.fresh_database()
    raw, mine, peer, lean = await _uncontended(ctx, dsn)
    ctx.row(
        "uncontended run_exclusive, 1 task",
        mine,
        "cycles/s",
        baseline="raw pg_advisory_lock+unlock, 1 conn, via psycopg conn.execute()",
        baseline_value=raw,
        note="goal >= 0.8 (this baseline; the libpq floor is the next row)",
    )
    ctx.row(
        "uncontended run_exclusive, 1 task",
        mine,
        "cycles/s",
        baseline="the same raw pair through libpq directly, prepared",
        baseline_value=lean,
        note="the gap is pgcoord's own bookkeeping",
    )
    ctx.row(
        "uncontended run_exclusive, 1 task",
        mine,
        "cycles/s",
        baseline="python-redis-lock acquire+release",
        baseline_value=peer,
    )
    none_held, many_held, took = await _with_many_held(ctx, dsn)
    ctx.row(
        f"acquire+release, {HELD:,} other locks held",
        many_held,
        "cycles/s",
        baseline="the same, none held",
        baseline_value=none_held,
        note=f"goal >= 0.8; taking the {HELD:,} took {took:.1f} s",
    )
    contended = {"raw": 0.0, "pgcoord": 0.0, "redis": 0.0}
    for _ in range(2):  # interleaved halves
        for mode in contended:
            contended[mode] += await _contended(ctx, dsn, mode) / 2
    ctx.row(
        "one key, 8 tasks in 2 processes",
        contended["pgcoord"],
        "handoffs/s",
        baseline="raw blocking pg_advisory_lock, 8 conns",
        baseline_value=contended["raw"],
        note="goal >= 0.8",
    )
    ctx.row(
        "one key, 8 tasks in 2 processes",
        contended["pgcoord"],
        "handoffs/s",
        baseline="python-redis-lock, 8 threads in 2 processes",
        baseline_value=contended["redis"],
    )


# -- child processes ---------------------------------------------------------------------------


async def _child_async(mode: str, dsn: str, start_at: float, seconds: float) -> int:
    count = 0
    if mode == "raw":
        conns = [
            await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            for _ in range(TASKS_PER_PROCESS)
        ]

        async def raw_loop(conn: psycopg.AsyncConnection[Any], deadline: float) -> None:
            nonlocal count
            while time.time() < deadline:
                await conn.execute("SELECT pg_advisory_lock(%s)", (RAW_KEY,))
                await conn.execute("SELECT pg_advisory_unlock(%s)", (RAW_KEY,))
                count += 1

        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(raw_loop(c, start_at + seconds) for c in conns))
        for c in conns:
            await c.close()
        return count
    async with pgcoord.Coordinator(dsn, app="bench") as coord:
        locks = coord.lock_manager

        async def pgcoord_loop(deadline: float) -> None:
            nonlocal count
            while time.time() < deadline:
                await locks.run_exclusive("contended", _noop)
                count += 1

        await locks.run_exclusive("warm-up", _noop)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(pgcoord_loop(start_at + seconds) for _ in range(TASKS_PER_PROCESS)))
    return count


def _child_redis(redis_url: str, start_at: float, seconds: float) -> int:
    import redis
    import redis_lock

    client = redis.Redis.from_url(redis_url)
    counts = [0] * TASKS_PER_PROCESS

    def loop(i: int) -> None:
        lock = redis_lock.Lock(client, "pgcoord-bench-contended", expire=30)
        deadline = start_at + seconds
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < deadline:
            lock.acquire()
            lock.release()
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(TASKS_PER_PROCESS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def _child(argv: list[str]) -> None:
    mode, dsn, redis_url, start_at, seconds = argv[0], argv[1], argv[2], *map(float, argv[3:5])
    if mode == "redis":
        count = _child_redis(redis_url, start_at, seconds)
    else:
        count = asyncio.run(_child_async(mode, dsn, start_at, seconds))
    print(json.dumps({"count": count}), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1:])
