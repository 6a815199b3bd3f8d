"""Several real worker processes on one queue: exactly once, kill -9 rescue, frozen workers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import pgcoord
from tests.support import Proc, processes, spawn, wait_until

pytestmark = pytest.mark.slow

JOBS = 5000


def _rows(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _make_log(dsn: str) -> None:
    _rows(
        dsn, "CREATE TABLE queue_log (job_id bigint NOT NULL, pid int NOT NULL, kind text NOT NULL)"
    )


def _wait(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(0.1)


def _queue_empty(dsn: str) -> bool:
    return _rows(dsn, "SELECT count(*) FROM pgcoord.queue_jobs")[0][0] == 0


async def _publish(dsn: str, count: int) -> list[int]:
    async with pgcoord.Coordinator(dsn) as producer:
        return await producer.event_queue.publish_many("work", list(range(count)))


def _start_workers(procs: list[Proc], dsn: str, n: int, *extra: str) -> list[Proc]:
    started = [
        spawn("tests.workers.queue_worker", "work", "--concurrency", "8", *extra, dsn=dsn)
        for _ in range(n)
    ]
    procs.extend(started)
    for proc in started:
        proc.expect("ready")
    return started


async def test_three_processes_process_each_job_exactly_once(dsn: str) -> None:
    _make_log(dsn)
    with processes() as procs:
        workers = _start_workers(procs, dsn, 3)
        ids = await _publish(dsn, JOBS)
        _wait(lambda: _queue_empty(dsn))
        done = _rows(dsn, "SELECT job_id, pid FROM queue_log WHERE kind = 'done'")
        for proc in workers:
            proc.send({"quit": True})
            proc.expect("stopped")
    assert len(done) == JOBS
    assert sorted(job for job, _ in done) == ids
    # The work was shared: every process took part.
    assert {pid for _, pid in done} == {p.pid for p in workers}


async def test_killed_process_jobs_are_rescued_and_none_is_lost(dsn: str) -> None:
    _make_log(dsn)
    with processes() as procs:
        workers = _start_workers(procs, dsn, 3, "--lease", "1.5", "--sleep", "0.01")
        victim = workers[0]
        ids = await _publish(dsn, JOBS)
        # Killed while it has jobs in flight (8 at a time, 10 ms each): on a loaded machine a
        # slow victim could otherwise reach its 300th job only as the queue drains.
        _wait(
            lambda: _rows(
                dsn,
                "SELECT count(*) FILTER (WHERE kind = 'start') > 300"
                " AND count(*) FILTER (WHERE kind = 'start')"
                " > count(*) FILTER (WHERE kind = 'done') FROM queue_log WHERE pid = %s",
                victim.pid,
            )[0][0]
        )
        victim.kill()
        _wait(lambda: _queue_empty(dsn))
        done = _rows(dsn, "SELECT DISTINCT job_id FROM queue_log WHERE kind = 'done'")
        rescued = _rows(
            dsn,
            "SELECT s.job_id, array_agg(DISTINCT d.pid) FROM queue_log s "
            "LEFT JOIN queue_log d ON d.job_id = s.job_id AND d.kind = 'done' "
            "WHERE s.kind = 'start' AND s.pid = %s AND NOT EXISTS ("
            " SELECT 1 FROM queue_log x WHERE x.job_id = s.job_id AND x.pid = %s AND x.kind = 'done')"
            " GROUP BY s.job_id",
            victim.pid,
            victim.pid,
        )
        for proc in workers[1:]:
            proc.send({"quit": True})
            proc.expect("stopped")
    assert sorted(job for (job,) in done) == ids  # none lost
    # The victim died holding jobs; each was finished by a survivor.
    assert rescued
    survivors = {p.pid for p in workers[1:]}
    for _job, pids in rescued:
        assert pids and set(pids) <= survivors


async def test_frozen_worker_loses_its_job_and_cannot_complete_it(dsn: str) -> None:
    with processes() as procs:
        frozen = spawn(
            "tests.workers.queue_worker", "work", "--mode", "hold", "--lease", "1", dsn=dsn
        )
        procs.append(frozen)
        frozen.expect("ready")
        [job] = await _publish(dsn, 1)
        assert frozen.expect("holding") == {"holding": job, "attempt": 1}
        frozen.stop()  # SIGSTOP: it can neither renew nor finish
        time.sleep(2.0)  # > the 1 s lease

        rescuer = spawn("tests.workers.queue_worker", "work", "--mode", "hold", dsn=dsn)
        procs.append(rescuer)
        assert rescuer.expect("holding") == {"holding": job, "attempt": 2}

        # The frozen worker wakes up and finishes its (stale) try.
        frozen.send({"finish": job})
        frozen.cont()
        ended = frozen.expect("ended")
        assert ended["ended"] == job
        time.sleep(0.5)  # room for its outcome flush, which must be fenced off
        assert _rows(dsn, "SELECT id, attempt FROM pgcoord.queue_jobs") == [(job, 2)]

        rescuer.send({"finish": job})
        rescuer.expect("ended")
        _wait(lambda: _queue_empty(dsn), timeout=15)
        for proc in (frozen, rescuer):
            proc.send({"quit": True})
            proc.expect("stopped")


async def test_a_retried_dead_letter_never_reuses_a_fencing_token(dsn: str) -> None:
    # A worker freezes holding the job; this process takes the job over, fails it into the dead
    # letters, and runs it again once an operator retries it. That run's attempt (the fencing
    # token) must be new, or the frozen worker's late success would count as its outcome.
    attempts: list[int] = []
    release = asyncio.Event()

    async def process(message: Any, ctx: pgcoord.JobContext) -> None:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            raise RuntimeError("boom")  # no retries left: dead-lettered
        await release.wait()

    with processes() as procs:
        frozen = spawn(
            "tests.workers.queue_worker", "work", "--mode", "hold", "--lease", "1", dsn=dsn
        )
        procs.append(frozen)
        await asyncio.to_thread(frozen.expect, "ready")
        async with pgcoord.Coordinator(dsn, heartbeat=1.0) as coord:
            eq = coord.event_queue
            job = await eq.publish("work", "x")
            holding = await asyncio.to_thread(frozen.expect, "holding")
            assert holding == {"holding": job, "attempt": 1}
            frozen.stop()  # SIGSTOP: it can neither renew nor finish, and its lease runs out
            await eq.subscribe("work", process=process, interval=0.05)
            deadline = time.monotonic() + 30
            while [f.id for f in await eq.failed_jobs()] != [job]:
                assert time.monotonic() < deadline, "the job was never taken over and failed"
                await asyncio.sleep(0.05)
            assert await eq.retry_failed() == [job]
            await wait_until(lambda: len(attempts) == 2)
            assert 1 < attempts[0] < attempts[1]

            # The frozen worker wakes up and reports success for its try; stopping it then
            # flushes every outcome it still had, so its late one has been written by now.
            frozen.send({"finish": job})
            frozen.cont()
            assert (await asyncio.to_thread(frozen.expect, "ended"))["ended"] == job
            frozen.send({"quit": True})
            await asyncio.to_thread(frozen.expect, "stopped")
            assert _rows(dsn, "SELECT id, attempt FROM pgcoord.queue_jobs") == [(job, attempts[1])]

            release.set()  # the retried run's own success is the one that counts
            await wait_until(lambda: _queue_empty(dsn))
            assert await eq.failed_jobs() == []
