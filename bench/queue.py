"""EventQueue benchmark: pgcoord beside pgqueuer (asyncpg and psycopg), procrastinate and raw SQL.

All systems run in this one process against the same server, each in a fresh database.

1. Drain N pre-enqueued no-op jobs with each system's own worker (pgcoord, pgqueuer-asyncpg,
   pgqueuer-psycopg; procrastinate gets fewer jobs by default: it is ~40x slower), and pgcoord
   again with ``queue_synchronous_commit="on"``.
2. The raw primitive: ``DELETE ... WHERE id IN (SELECT ... LIMIT 50 FOR UPDATE SKIP LOCKED)``.
3. Continuous enqueue + process for ``--seconds`` (two producer tasks publish batches of 50
   while the system's worker runs; jobs/s processed within the window, for every system).
4. Idle pickup latency: one job at a time into an idle worker (publish() -> process() start).
5. 8 producers, one job per transaction: publish() vs the same INSERT into an identical
   table with no queue (and the naive INSERT+NOTIFY per transaction, and transaction=).
6. Churn: drain rate at the start vs after QUEUE_BENCH_CHURN jobs (default 600,000) went
   through the same table.

Environment knobs: QUEUE_BENCH_DRAIN (20000), QUEUE_BENCH_SLOW_DRAIN (5000, procrastinate's
drain), QUEUE_BENCH_CHURN (1000000), QUEUE_BENCH_ROUNDS (5), QUEUE_BENCH_GAP
(queue_notify_gap for the producer processes),
QUEUE_BENCH_PEERS=0 to skip the peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from datetime import timedelta
from typing import Any

import psycopg

import pgcoord
from bench._common import BenchContext, percentiles
from pgcoord.queue import queries

DRAIN = int(os.environ.get("QUEUE_BENCH_DRAIN", "20000"))
SLOW_DRAIN = int(os.environ.get("QUEUE_BENCH_SLOW_DRAIN", "5000"))  # procrastinate: ~600/s
CHURN = int(os.environ.get("QUEUE_BENCH_CHURN", "1000000"))
PEERS = os.environ.get("QUEUE_BENCH_PEERS", "1") != "0"
CONCURRENCY = 100  # pgcoord's per-process concurrency in the throughput runs


# -- pgcoord -------------------------------------------------------------------------------


async def _pgcoord_drain(coord: pgcoord.Coordinator, channel: str, n: int) -> float:
    eq = coord.event_queue
    for start in range(0, n, 5000):
        await eq.publish_many(channel, list(range(start, min(n, start + 5000))))
    done = 0
    finished = asyncio.Event()

    async def noop(message: Any, ctx: pgcoord.JobContext) -> None:
        nonlocal done
        done += 1
        if done == n:
            finished.set()

    began = time.perf_counter()
    await eq.subscribe(channel, process=noop, concurrency=CONCURRENCY)
    await finished.wait()
    await eq.flush()
    elapsed = time.perf_counter() - began
    await eq.unsubscribe(channel)
    return n / elapsed


async def _pgcoord_continuous(dsn: str, seconds: float) -> tuple[float, float]:
    done = 0

    async def noop(message: Any, ctx: pgcoord.JobContext) -> None:
        nonlocal done
        done += 1

    async with pgcoord.Coordinator(dsn) as coord:

        async def worker() -> None:
            await coord.event_queue.subscribe("cont", process=noop, concurrency=CONCURRENCY)

        result = await _feed("pgcoord", dsn, seconds, worker, lambda: None, lambda: done)
        await coord.event_queue.unsubscribe("cont")
    return result


async def _pgcoord_latency(dsn: str, samples: int) -> tuple[float, float]:
    async with (
        pgcoord.Coordinator(dsn, app="lat") as consumer,
        pgcoord.Coordinator(dsn, app="lat") as producer,
    ):
        got: asyncio.Queue[float] = asyncio.Queue()

        async def process(message: Any, ctx: pgcoord.JobContext) -> None:
            got.put_nowait(time.perf_counter() - message)

        await consumer.event_queue.subscribe("lat", process=process, interval=1.0)
        lat: list[float] = []
        for _ in range(samples):
            await asyncio.sleep(0.01)  # the worker is idle, waiting on NOTIFY
            await producer.event_queue.publish("lat", time.perf_counter())
            lat.append(await asyncio.wait_for(got.get(), 10))
        return percentiles([x * 1000 for x in lat])


# -- producers -----------------------------------------------------------------------------


async def _producers(dsn: str, seconds: float, action: Any, *, writers: int = 8) -> float:
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(writers)]
    count = 0
    stop = time.perf_counter() + seconds

    async def loop(conn: psycopg.AsyncConnection[Any]) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await action(conn)
            count += 1

    try:
        began = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in conns))
        return count / (time.perf_counter() - began)
    finally:
        for c in conns:
            await c.close()


_PARAMS = {
    "app": "main",
    "channel": "p",
    "priority": 0,
    "delay": 0.0,
    "max_retries": 0,
    "timeout": 15.0,
    "payload": '{"n":1}',
}


def _gap() -> dict[str, float]:
    gap = os.environ.get("QUEUE_BENCH_GAP")
    return {"queue_notify_gap": float(gap)} if gap else {}


def _plain_insert() -> str:
    # The very statement publish() runs, aimed at an identical table that no queue uses.
    return queries.build("pgcoord").publish.decode().replace("queue_jobs", "plain_jobs")


_MODES = ("plain", "publish", "plain_txn", "publish_txn", "naive")


async def _produce_in_child(dsn: str, schedule: list[tuple[str, float, float]]) -> list[int]:
    insert = _plain_insert()
    naive = (
        f"WITH ins AS ({insert}), n AS (SELECT pg_notify('plain_jobs', '')) SELECT 1 FROM ins, n"
    )
    counts: list[int] = []
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        pgcoord.Coordinator(dsn, pool_size=2, **_gap()) as coord,
    ):
        eq = coord.event_queue
        for mode, start_at, seconds in schedule:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            stop = start_at + seconds
            count = 0
            while time.time() < stop:
                if mode == "plain":
                    await conn.execute(insert, _PARAMS)
                elif mode == "publish":
                    await eq.publish("p", {"n": 1})
                elif mode == "naive":
                    await conn.execute(naive, _PARAMS)
                elif mode == "plain_txn":
                    async with conn.transaction():
                        await conn.execute(insert, _PARAMS)
                else:
                    async with conn.transaction():
                        await eq.publish("p", {"n": 1}, transaction=conn)
                count += 1
            counts.append(count)
    return counts


def _producer_child(dsn: str, schedule: list[tuple[str, float, float]]) -> list[int]:
    """One producer process (an app instance): its counts of one-job transactions per slot."""
    return asyncio.run(_produce_in_child(dsn, schedule))


def _producer_processes(
    dsn: str, seconds: float, rounds: int, writers: int = 8
) -> dict[str, list[float]]:
    """Rates per mode, one per round: all writers run the same mode in the same time slot.

    Modes alternate slot by slot in long-lived processes, so load changes on a shared
    machine hit every mode alike; the caller takes medians.
    """
    import multiprocessing

    first = time.time() + 3.0  # every child connected before the first slot
    schedule = [
        (mode, first + i * (seconds + 0.25), seconds)
        for i, mode in enumerate(m for _ in range(rounds) for m in _MODES)
    ]
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        per_child = pool.starmap(_producer_child, [(dsn, schedule)] * writers)
    rates: dict[str, list[float]] = {m: [] for m in _MODES}
    for slot, (mode, _, secs) in enumerate(schedule):
        rates[mode].append(sum(counts[slot] for counts in per_child) / secs)
    return rates


async def _producer_rows(ctx: BenchContext, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE pgcoord.plain_jobs (LIKE pgcoord.queue_jobs INCLUDING ALL)")
    rounds = int(os.environ.get("QUEUE_BENCH_ROUNDS", "5"))
    rates = await asyncio.to_thread(_producer_processes, dsn, 1.0, rounds)
    med = {m: statistics.median(r) for m, r in rates.items()}
    spread = f"median of {rounds} interleaved 1 s slots, 8 processes"
    ctx.row(
        "8 producer processes, 1 job/transaction: publish()",
        med["publish"],
        "jobs/s",
        baseline="same INSERT, no queue",
        baseline_value=med["plain"],
        note=f"goal >= 0.8; {spread}",
    )
    ctx.row(
        "8 producer processes: publish(transaction=conn) in BEGIN..COMMIT",
        med["publish_txn"],
        "jobs/s",
        baseline="same INSERT in BEGIN..COMMIT",
        baseline_value=med["plain_txn"],
        note=spread,
    )
    ctx.row(
        "8 producer processes: naive INSERT + NOTIFY per transaction",
        med["naive"],
        "jobs/s",
        baseline="same INSERT, no queue",
        baseline_value=med["plain"],
        note="what the coalescing avoids",
    )


# -- raw primitive -------------------------------------------------------------------------


async def _raw_claim_delete(dsn: str, n: int) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE raw_jobs (id bigserial PRIMARY KEY, payload text)")
        await conn.execute(
            "INSERT INTO raw_jobs (payload) SELECT 'x' FROM generate_series(1, %s)", (n,)
        )
        await conn.execute("VACUUM ANALYZE raw_jobs")
        query = (
            "DELETE FROM raw_jobs WHERE id IN (SELECT id FROM raw_jobs ORDER BY id LIMIT 50 "
            "FOR UPDATE SKIP LOCKED) RETURNING id, payload"
        )
        done = 0
        began = time.perf_counter()
        while done < n:
            cur = await conn.execute(query)
            got = len(await cur.fetchall())
            if not got:
                break
            done += got
        return done / (time.perf_counter() - began)


# -- peers ---------------------------------------------------------------------------------


async def _asyncpg_connect(dsn: str) -> Any:
    """asyncpg takes URLs or keywords, not libpq key=value strings."""
    import asyncpg

    params = psycopg.conninfo.conninfo_to_dict(dsn)
    kwargs = {
        "host": params.get("host"),
        "port": int(params["port"]) if params.get("port") else None,
        "user": params.get("user"),
        "password": params.get("password") or None,
        "database": params.get("dbname"),
    }
    return await asyncpg.connect(**{k: v for k, v in kwargs.items() if v is not None})


async def _pgqueuer_queries(dsn: str, driver_kind: str) -> tuple[Any, Any]:
    """A connection of the given driver and pgqueuer's Queries on it, schema installed."""
    from pgqueuer.db import AsyncpgDriver, PsycopgDriver
    from pgqueuer.queries import Queries

    if driver_kind == "asyncpg":
        conn: Any = await _asyncpg_connect(dsn)
        driver: Any = AsyncpgDriver(conn)
    else:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        driver = PsycopgDriver(conn)
    queries = Queries(driver)
    if not await queries.schema_is_installed():
        await queries.install()
    return conn, queries


async def _pgqueuer_drain(dsn: str, n: int, driver_kind: str) -> float:
    from pgqueuer import QueueManager
    from pgqueuer.types import QueueExecutionMode

    conn, queries = await _pgqueuer_queries(dsn, driver_kind)
    try:
        for start in range(0, n, 5000):
            size = min(5000, n - start)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        qm = QueueManager(queries)
        done = 0

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            nonlocal done
            done += 1

        began = time.perf_counter()
        await qm.run(mode=QueueExecutionMode.drain, batch_size=10)
        elapsed = time.perf_counter() - began
        return done / elapsed
    finally:
        await conn.close()


async def _pgqueuer_continuous(dsn: str, seconds: float, driver_kind: str) -> tuple[float, float]:
    from pgqueuer import QueueManager

    conn, queries = await _pgqueuer_queries(dsn, driver_kind)
    try:
        qm = QueueManager(queries)
        done = 0

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            nonlocal done
            done += 1

        async def worker() -> None:
            await qm.run(batch_size=10, dequeue_timeout=timedelta(seconds=1))

        return await _feed("pgqueuer", dsn, seconds, worker, qm.shutdown.set, lambda: done)
    finally:
        await conn.close()


async def _feed_in_child(system: str, dsn: str, start_at: float, seconds: float) -> int:
    """Two tasks enqueueing 50-job batches with ``system``'s own API; returns jobs enqueued."""
    published = 0
    calls: list[Any] = []
    closers: list[Any] = []
    if system == "pgcoord":
        coord = pgcoord.Coordinator(dsn)
        await coord.start()
        closers.append(coord.stop)
        calls = [lambda: coord.event_queue.publish_many("cont", [None] * 50)] * 2
    elif system == "pgqueuer":
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        for _ in range(2):
            conn = await _asyncpg_connect(dsn)
            closers.append(conn.close)
            q = Queries(AsyncpgDriver(conn))
            calls.append(lambda q=q: q.enqueue(["noop"] * 50, [None] * 50, [0] * 50))
    else:
        app, noop, _ = _procrastinate_app(dsn)
        await app.open_async()
        closers.append(app.close_async)
        calls = [lambda: noop.batch_defer_async(*([{}] * 50))] * 2
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        stop = start_at + seconds

        async def produce(call: Any) -> None:
            nonlocal published
            while time.time() < stop:
                await call()
                published += 50

        await asyncio.gather(*(produce(c) for c in calls))
    finally:
        for close in closers:
            await close()
    return published


def _feeder_process(system: str, dsn: str, start_at: float, seconds: float) -> int:
    """Entry point of the producer process."""
    return asyncio.run(_feed_in_child(system, dsn, start_at, seconds))


async def _feed(
    system: str, dsn: str, seconds: float, worker: Any, stop_worker: Any, processed: Any
) -> tuple[float, float]:
    """Run ``worker()`` here while another process enqueues for ``seconds``.

    The producers live in their own process so that they do not take the worker's event
    loop away (all systems' workers here are asyncio). Returns (processed/s, enqueued/s)
    over the producing window.
    """
    import multiprocessing

    task = asyncio.create_task(worker())
    start_at = time.time() + 3.0
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply_async(_feeder_process, (system, dsn, start_at, seconds))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        before = processed()
        await asyncio.sleep(seconds)
        after = processed()
        published = await asyncio.to_thread(result.get, 60)
    stop_worker()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, 30)
    return (after - before) / seconds, published / seconds


def _procrastinate_app(dsn: str) -> tuple[Any, Any, list[int]]:
    """A procrastinate app on ``dsn``, its no-op task ``noop``, and a counter of its runs."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    done = [0]

    @app.task(name="noop")
    async def noop() -> None:
        done[0] += 1

    return app, noop, done


async def _procrastinate_continuous(dsn: str, seconds: float) -> tuple[float, float]:
    app, _, done = _procrastinate_app(dsn)
    async with app.open_async():
        with contextlib.suppress(Exception):
            await app.schema_manager.apply_schema_async()
        worker_task: list[asyncio.Task[Any]] = []

        async def worker() -> None:
            task = asyncio.create_task(
                app.run_worker_async(
                    concurrency=10, install_signal_handlers=False, delete_jobs="always"
                )
            )
            worker_task.append(task)
            with contextlib.suppress(asyncio.CancelledError):
                await task

        def stop() -> None:
            if worker_task:
                worker_task[0].cancel()

        return await _feed("procrastinate", dsn, seconds, worker, stop, lambda: done[0])


async def _procrastinate_drain(dsn: str, n: int) -> float:
    app, noop, done = _procrastinate_app(dsn)
    async with app.open_async():
        with contextlib.suppress(Exception):
            await app.schema_manager.apply_schema_async()
        for start in range(0, n, 1000):
            await noop.batch_defer_async(*([{}] * min(1000, n - start)))
        began = time.perf_counter()
        await app.run_worker_async(
            concurrency=10, wait=False, install_signal_handlers=False, delete_jobs="always"
        )
        elapsed = time.perf_counter() - began
    return done[0] / elapsed


# -- churn ---------------------------------------------------------------------------------


def _jobs_table_size(dsn: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('pgcoord.queue_jobs') / 1048576.0"
        ).fetchone()
    return float(row[0]) if row else 0.0


async def _churn(ctx: BenchContext, dsn: str) -> None:
    async with pgcoord.Coordinator(dsn, app="churn") as coord:
        # Best of two on each side: single drains swing with the machine's load.
        first = max([await _pgcoord_drain(coord, "churn", DRAIN) for _ in range(2)])
        size_before = _jobs_table_size(dsn)
        eq = coord.event_queue
        passed = 2 * DRAIN
        done = 0

        async def noop(message: Any, ctx_: pgcoord.JobContext) -> None:
            nonlocal done
            done += 1

        await eq.subscribe("churn", process=noop, concurrency=CONCURRENCY)
        began = time.perf_counter()
        budget = 60.0
        published = 0
        while published < CHURN and time.perf_counter() - began < budget:
            await eq.publish_many("churn", [None] * 5000)
            published += 5000
            while published - done > 20000:  # a realistic backlog, not a million rows
                await asyncio.sleep(0.01)
        while done < published:
            await asyncio.sleep(0.01)
        await eq.unsubscribe("churn")
        passed += published
        churn_rate = published / (time.perf_counter() - began)
        last = max([await _pgcoord_drain(coord, "churn", DRAIN) for _ in range(2)])
        passed += 2 * DRAIN
        size_after = _jobs_table_size(dsn)
    ctx.row(
        f"drain after {passed:,} jobs passed through",
        last,
        "jobs/s",
        baseline="drain on the fresh table",
        baseline_value=first,
        note=(
            f"churn ran at {churn_rate:,.0f} jobs/s; jobs table + indexes "
            f"{size_before:.0f} MB -> {size_after:.0f} MB"
        ),
    )


# -- entry ---------------------------------------------------------------------------------


async def run(ctx: BenchContext) -> None:
    """Run every section; see the module docstring."""
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    print(f"drain {DRAIN:,} no-op jobs ...", flush=True)
    dsn = ctx.fresh_database()
    async with pgcoord.Coordinator(dsn) as coord:
        ours = await _pgcoord_drain(coord, "drain", DRAIN)
    async with pgcoord.Coordinator(ctx.fresh_database(), queue_synchronous_commit="on") as coord:
        durable = await _pgcoord_drain(coord, "drain", DRAIN)
    ctx.row(
        "drain no-op jobs, queue_synchronous_commit='on'",
        durable,
        "jobs/s",
        baseline="the default, 'off'",
        baseline_value=ours,
        note="claims and outcomes wait for the WAL flush (and a synchronous standby, if any)",
    )
    raw = await _raw_claim_delete(ctx.fresh_database(migrate=False), DRAIN * 2)
    peers: dict[str, float] = {}
    if PEERS:
        peers["pgqueuer-asyncpg"] = await _pgqueuer_drain(
            ctx.fresh_database(migrate=False), DRAIN, "asyncpg"
        )
        peers["pgqueuer-psycopg"] = await _pgqueuer_drain(
            ctx.fresh_database(migrate=False), DRAIN, "psycopg"
        )
        peers["procrastinate"] = await _procrastinate_drain(
            ctx.fresh_database(migrate=False), SLOW_DRAIN
        )
    for name, value in peers.items():
        jobs = SLOW_DRAIN if name == "procrastinate" else DRAIN
        ctx.row(
            "drain no-op jobs",
            ours,
            "jobs/s",
            baseline=name,
            baseline_value=value,
            note=f"{name}: {jobs:,} jobs, its own worker",
        )
    ctx.row(
        "drain no-op jobs",
        ours,
        "jobs/s",
        baseline="raw claim+delete, 50/tx, 1 conn",
        baseline_value=raw,
        note=f"pgcoord: 1 process, concurrency {CONCURRENCY}",
    )

    print("continuous enqueue + process ...", flush=True)
    processed, published = await _pgcoord_continuous(ctx.fresh_database(), ctx.seconds)
    note = "producer process, 2 tasks x 50-job batches; enqueued/s: pgcoord {:,.0f}, peer {:,.0f}"
    if PEERS:
        for name, peer_run in (
            ("pgqueuer-asyncpg", lambda d: _pgqueuer_continuous(d, ctx.seconds, "asyncpg")),
            ("pgqueuer-psycopg", lambda d: _pgqueuer_continuous(d, ctx.seconds, "psycopg")),
            ("procrastinate", lambda d: _procrastinate_continuous(d, ctx.seconds)),
        ):
            p_processed, p_published = await peer_run(ctx.fresh_database(migrate=False))
            ctx.row(
                f"continuous enqueue+process, {ctx.seconds:g} s",
                processed,
                "jobs/s done",
                baseline=name,
                baseline_value=p_processed,
                note=note.format(published, p_published),
            )
    else:
        ctx.row("continuous enqueue+process", processed, "jobs/s done")

    print("idle pickup latency ...", flush=True)
    p50, p99 = await _pgcoord_latency(ctx.fresh_database(), 300)
    ctx.row("idle pickup latency p50", p50, "ms", note="goal < 5 ms")
    ctx.row("idle pickup latency p99", p99, "ms", note="goal < 20 ms")

    print("8 producers ...", flush=True)
    await _producer_rows(ctx, ctx.fresh_database())

    print(f"churn ({CHURN:,} jobs or 60 s) ...", flush=True)
    await _churn(ctx, ctx.fresh_database())
