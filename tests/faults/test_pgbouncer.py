"""pgcoord behind a real PgBouncer: session mode works, transaction mode is refused at start.

Session mode is also covered by the lock, pub/sub and queue modules run through a bouncer
(``PGCOORD_TEST_BOUNCER=session``, see tests/conftest.py); this module covers what only a
bouncer of its own can show: the refusal, a full pool, and every service across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from psycopg_pool import AsyncConnectionPool

import pgcoord
from pgcoord import _pooler
from tests.faults.bouncer import Bouncer, pgbouncer_binary, running_bouncer
from tests.support import PgServer, Proc, processes, spawn, wait_until

pytestmark = pytest.mark.skipif(
    pgbouncer_binary() is None, reason="pgbouncer is not installed (apt-get install pgbouncer)"
)

#: A pgcoord instance's budget by default (Coordinator(max_connections=4)).
BUDGET = 4


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


@pytest.fixture
def transaction_bouncer(pg: PgServer) -> Iterator[Bouncer]:
    """A PgBouncer in transaction pool mode in front of the server under test."""
    with running_bouncer(pg, "transaction") as bouncer:
        yield bouncer


@pytest.fixture
def session_bouncer(pg: PgServer) -> Iterator[Bouncer]:
    """A PgBouncer in session pool mode in front of the server under test."""
    with running_bouncer(pg, "session") as bouncer:
        yield bouncer


def _clients(bouncer: Bouncer, dbname: str) -> list[dict[str, Any]]:
    return [row for row in bouncer.show("CLIENTS") if row["database"] == dbname]


def _pool(bouncer: Bouncer, dbname: str) -> dict[str, Any]:
    rows = [row for row in bouncer.show("POOLS") if row["database"] == dbname]
    return rows[0] if rows else {}


async def _nothing_left(bouncer: Bouncer, dbname: str) -> None:
    """No task of pgcoord's is left on this loop, and none of its connections at the bouncer."""
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await wait_until(lambda: not _clients(bouncer, dbname), timeout=5)


def _assert_refusal(exc: pgcoord.TransactionPoolingError) -> None:
    text = str(exc)
    assert isinstance(exc, pgcoord.PgcoordError)
    assert "pool_mode = session" in text and "directly" in text  # what to do
    assert "pooler" in text and "docs/operations.md" in text


# -- the decision (pure) -----------------------------------------------------------------------


def test_sightings_of_kept_sessions_are_no_evidence() -> None:
    assert _pooler.shared_session(10, []) is None
    assert _pooler.shared_session(10, [[11, 11, 11], [12, 12]]) is None


def test_any_shared_or_moved_session_is_evidence() -> None:
    moved = _pooler.shared_session(10, [[11, 13]])
    assert moved is not None and "11, 13" in moved
    listeners = _pooler.shared_session(10, [[10]])
    assert listeners is not None and "LISTEN" in listeners
    shared = _pooler.shared_session(10, [[11], [11]])
    assert shared is not None and "same server process 11" in shared


# -- transaction mode: refused -----------------------------------------------------------------


async def test_start_through_a_transaction_mode_bouncer_is_refused_and_leaves_nothing_running(
    dsn: str, transaction_bouncer: Bouncer
) -> None:
    dbname = _dbname(dsn)
    for budget in (2, BUDGET):  # one work connection, or several
        coord = pgcoord.Coordinator(transaction_bouncer.dsn_for(dbname), max_connections=budget)
        with pytest.raises(pgcoord.TransactionPoolingError) as refused:
            await coord.start()
        _assert_refusal(refused.value)
        assert not coord.running
        with pytest.raises(pgcoord.NotRunningError):
            await coord.lock_manager.acquire("k")
        await _nothing_left(transaction_bouncer, dbname)


async def test_refused_while_other_clients_keep_the_bouncer_sessions_busy(
    dsn: str, transaction_bouncer: Bouncer
) -> None:
    # Other applications' transactions take and free the server sessions all the time, so
    # pgcoord's connections are not simply handed the listener's session back.
    dbname = _dbname(dsn)
    stop = asyncio.Event()

    async def busy() -> None:
        async with await psycopg.AsyncConnection.connect(
            # Prepared statements would fail at random through transaction mode.
            transaction_bouncer.dsn_for(dbname),
            autocommit=True,
            prepare_threshold=None,
        ) as conn:
            while not stop.is_set():
                async with conn.transaction():
                    await conn.execute("SELECT pg_sleep(0.002)")

    load = [asyncio.create_task(busy()) for _ in range(3)]
    try:
        for _ in range(10):
            coord = pgcoord.Coordinator(transaction_bouncer.dsn_for(dbname))
            with pytest.raises(pgcoord.TransactionPoolingError):
                await coord.start()
    finally:
        stop.set()
        await asyncio.gather(*load)


async def test_a_work_pool_through_a_transaction_bouncer_is_refused_with_a_direct_listener(
    dsn: str, pg: PgServer, transaction_bouncer: Bouncer
) -> None:
    # The listener connects directly (it hears every notification), the work connections go
    # through the bouncer: session locks would still have two holders.
    dbname = _dbname(dsn)
    async with AsyncConnectionPool(
        transaction_bouncer.dsn_for(dbname), min_size=1, max_size=3, open=False
    ) as pool:
        coord = pgcoord.Coordinator(pg.dsn_for(dbname), pool=pool)
        with pytest.raises(pgcoord.TransactionPoolingError) as refused:
            await coord.start()
        _assert_refusal(refused.value)
        assert not coord.running


async def test_a_listener_through_a_transaction_bouncer_is_refused_with_a_direct_pool(
    dsn: str, pg: PgServer, transaction_bouncer: Bouncer
) -> None:
    dbname = _dbname(dsn)
    async with AsyncConnectionPool(pg.dsn_for(dbname), min_size=1, max_size=3, open=False) as pool:
        coord = pgcoord.Coordinator(
            transaction_bouncer.dsn_for(dbname), pool=pool, connect_timeout=2
        )
        with pytest.raises(pgcoord.TransactionPoolingError) as refused:
            await coord.start()
        _assert_refusal(refused.value)
        assert "did not reach the LISTEN connection" in str(refused.value)


async def test_a_session_mode_entry_of_its_own_in_a_transaction_mode_bouncer_works(
    dsn: str, pg: PgServer
) -> None:
    # What docs/operations.md advises: the application keeps transaction pooling, pgcoord gets
    # a database entry in session mode pointing at the same database.
    dbname = _dbname(dsn)
    alias = f"{dbname}_pgcoord"
    entries = {alias: f"dbname={dbname} pool_mode=session"}
    with running_bouncer(pg, "transaction", databases=entries) as bouncer:
        refused = pgcoord.Coordinator(bouncer.dsn_for(dbname))
        with pytest.raises(pgcoord.TransactionPoolingError):
            await refused.start()
        async with (
            pgcoord.Coordinator(bouncer.dsn_for(alias)) as first,
            pgcoord.Coordinator(bouncer.dsn_for(alias, application_name="second")) as second,
        ):
            heard: list[Any] = []
            await second.pubsub_manager.subscribe("news", heard.append)
            await first.pubsub_manager.publish("news", "hello")
            await wait_until(lambda: heard == ["hello"])
            await first.cache.set("k", 1)
            assert await second.cache.get("k") == 1


@pytest.mark.slow
def test_no_two_processes_hold_a_lock_through_transaction_mode(
    dsn: str, transaction_bouncer: Bouncer
) -> None:
    # Before: both processes started, and both held "k" at once (8-21 overlaps per run).
    # Now neither gets as far as holding anything: each start() says why.
    target = transaction_bouncer.dsn_for(_dbname(dsn))
    with processes() as procs:
        for _ in range(2):
            procs.append(spawn("tests.faults.bouncer_node", dsn=target))
        for proc in procs:
            failed = proc.expect("start_error")
            assert failed["start_error"] == "TransactionPoolingError", failed
            assert proc.wait(30) == 0


# -- session mode: works, within a budget the size of its instances' ---------------------------


def _node(procs: list[Proc], dsn: str, *args: str) -> Proc:
    proc = spawn("tests.faults.bouncer_node", *args, dsn=dsn)
    procs.append(proc)
    return proc


def _ready(proc: Proc) -> None:
    while True:
        line = proc.next(timeout=30)
        assert not (isinstance(line, dict) and "start_error" in line), line
        if isinstance(line, dict) and "ready" in line:
            return


def _report(proc: Proc) -> dict[str, list[Any]]:
    proc.send({"op": "report"})
    report: dict[str, list[Any]] = proc.expect("report")["report"]
    return report


def _until_reported(nodes: list[Proc], done: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Ask every node for its report until ``done(reports)`` holds; return the last reports."""
    deadline = time.monotonic() + timeout
    while True:
        reports = [_report(node) for node in nodes]
        if done(reports):
            return reports
        if time.monotonic() > deadline:
            raise AssertionError(f"not reported within {timeout:g} s: {reports}")
        time.sleep(0.05)


@pytest.mark.slow
async def test_session_mode_serves_every_service_across_processes(
    dsn: str, session_bouncer: Bouncer
) -> None:
    target = session_bouncer.dsn_for(_dbname(dsn))
    coord = pgcoord.Coordinator(target, heartbeat=1.0)
    heard: list[Any] = []
    await coord.pubsub_manager.subscribe("smoke", heard.append)
    await coord.sync_message_manager.subscribe("smoke", heard.append)
    await coord.start()
    try:
        with processes() as procs:
            nodes = [_node(procs, target) for _ in range(2)]
            for node in nodes:
                await asyncio.to_thread(_ready, node)
            first, second = nodes

            # Pub/sub and sync messages reach every other instance, a job runs on one of them.
            first.send({"op": "publish", "message": "hello"})
            await asyncio.to_thread(first.expect, "published")
            reports = await asyncio.to_thread(
                _until_reported,
                nodes,
                lambda r: r[1]["pubsub"] and r[1]["sync"] and r[0]["jobs"] + r[1]["jobs"],
            )
            assert reports[1]["pubsub"] == reports[1]["sync"] == ["hello"]
            assert reports[0]["sync"] == []  # sync messages skip their sender
            await wait_until(lambda: heard == ["hello", "hello"])

            # The cache is one across processes.
            await coord.cache.set("shared", {"from": "parent"})
            second.send({"op": "get", "key": "shared"})
            assert (await asyncio.to_thread(second.expect, "got"))["got"] == {"from": "parent"}

            # A lock has one holder at a time across processes, on its session and as a lease
            # row, with fencing tokens never issued twice.
            for node in nodes:
                node.send({"op": "locks", "key": "shared", "rounds": 10, "tasks": 2})
            results = [(await asyncio.to_thread(node.expect, "locks"))["locks"] for node in nodes]
            for result in results:
                assert result["overlaps"] == 0 and result["errors"] == [], result
            tokens = [token for result in results for token in result["tokens"]]
            assert len(set(tokens)) == len(tokens) == 40

            # The job ran exactly once across the two (nothing failed, so nothing re-ran).
            reports = await asyncio.to_thread(_until_reported, nodes, lambda r: True)
            assert reports[0]["jobs"] + reports[1]["jobs"] == ["hello"]
            for node in nodes:
                node.send({"op": "quit"})
                await asyncio.to_thread(node.expect, "stopped")
    finally:
        await coord.stop()


@pytest.mark.slow
def test_instances_fit_a_pool_the_size_of_their_budgets(dsn: str, pg: PgServer) -> None:
    # Before: 9 instances filled default_pool_size = 20 and the 10th start() hung. Each
    # instance now opens at most its max_connections (4) server connections, so a pool of
    # 3 x 4 serves 3 instances working flat out at once.
    instances = 3
    with running_bouncer(pg, "session", default_pool_size=instances * BUDGET) as bouncer:
        target = bouncer.dsn_for(_dbname(dsn))
        with processes() as procs:
            nodes = [_node(procs, target) for _ in range(instances)]
            for node in nodes:
                _ready(node)
            for node in nodes:
                node.send({"op": "locks", "key": "shared", "rounds": 5, "tasks": 6})
            results = [node.expect("locks", timeout=60)["locks"] for node in nodes]
            for result in results:
                assert result["overlaps"] == 0 and result["errors"] == [], result
            pool = _pool(bouncer, _dbname(dsn))
            assert pool["sv_active"] + pool["sv_idle"] + pool["sv_used"] <= instances * BUDGET


@contextlib.contextmanager
def _occupied(bouncer: Bouncer, dbname: str, count: int) -> Iterator[list[psycopg.Connection[Any]]]:
    """``count`` client connections that each hold one of the bouncer's server connections."""
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(count):
            conn = psycopg.connect(bouncer.dsn_for(dbname), autocommit=True)
            conns.append(conn)
            conn.execute("SELECT 1")  # session mode: the server connection is its own from now
        yield conns
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("free", [0, 1], ids=["no-slot", "one-slot"])
async def test_start_against_a_full_pool_fails_within_its_connect_timeout(
    dsn: str, pg: PgServer, free: int
) -> None:
    # no-slot: the listener's first statement waits; one-slot: the listener gets the last
    # server connection and the first work connection's statement waits. PgBouncer would
    # hold either for its query_wait_timeout (120 s).
    dbname = _dbname(dsn)
    size = 3
    with (
        running_bouncer(pg, "session", default_pool_size=size) as bouncer,
        _occupied(bouncer, dbname, size - free) as held,
    ):
        coord = pgcoord.Coordinator(bouncer.dsn_for(dbname), connect_timeout=2)
        began = time.monotonic()
        with pytest.raises(pgcoord.ConnectionFailedError) as failed:
            await coord.start()
        elapsed = time.monotonic() - began
        assert elapsed < 2 + 1.5, elapsed  # the connect timeout, plus teardown
        assert "pool full" in str(failed.value) and str(bouncer.port) in str(failed.value)
        assert not coord.running
        assert asyncio.all_tasks() == {asyncio.current_task()}
        for conn in held:
            conn.close()
        # PgBouncer reads a queued client's socket only once it has a server connection for
        # it, so the ones pgcoord closed are gone once the others have left.
        await wait_until(lambda: not _clients(bouncer, dbname), timeout=5)


async def test_start_against_a_full_pool_waits_and_succeeds_when_connections_free_up(
    dsn: str, pg: PgServer
) -> None:
    dbname = _dbname(dsn)
    size = 3
    with running_bouncer(pg, "session", default_pool_size=size) as bouncer:
        with _occupied(bouncer, dbname, size) as held:
            coord = pgcoord.Coordinator(bouncer.dsn_for(dbname), connect_timeout=10)
            starting = asyncio.create_task(coord.start())
            await wait_until(lambda: _pool(bouncer, dbname).get("cl_waiting", 0) >= 1, timeout=5)
            assert not starting.done()
            for conn in held[:2]:  # the listener's and one work connection's worth
                conn.close()
            await asyncio.wait_for(starting, 10)
        try:
            await coord.cache.set("k", 1)
            assert await coord.cache.get("k") == 1
        finally:
            await coord.stop()
