"""engine=: pgcoord borrows its work connections from the application's SQLAlchemy engine."""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgcoord
from pgcoord import _kept
from tests.support import client_backends, wait_until

wait_for = functools.partial(wait_until, timeout=10.0)


def wait_until_sync(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` from sync code until it is true (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _url(dsn: str, driver: str = "psycopg") -> sa.URL:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return sa.URL.create(
        f"postgresql+{driver}",
        username=str(params.get("user") or "") or None,
        password=str(params.get("password") or "") or None,
        host=str(params.get("host") or "") or None,
        port=int(params["port"]) if params.get("port") else None,
        database=str(params["dbname"]),
    )


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[AsyncEngine]:
    """The host application's own async engine (autocommit off, as SQLAlchemy's default)."""
    engine = create_async_engine(_url(dsn), pool_size=3, max_overflow=0, pool_pre_ping=True)
    yield engine
    await engine.dispose()


async def test_services_work_on_the_engines_connections_plus_one_listener(
    engine: AsyncEngine, dsn: str
) -> None:
    async with pgcoord.Coordinator(engine=engine, app="ridden") as coord:
        got: list[Any] = []
        await coord.pubsub_manager.subscribe("news", got.append)
        await coord.pubsub_manager.publish("news", {"n": 1})
        await wait_for(lambda: got == [{"n": 1}])
        await coord.cache.set("k", [1, 2])
        assert await coord.cache.get("k") == [1, 2]
        job = await coord.event_queue.publish("jobs", {"x": 1})
        assert job is not None
        await asyncio.sleep(_kept.HOLD * 2)  # kept-warm connections go back to the engine
        pool = engine.pool
        engine_conns = pool.checkedin() + pool.checkedout()  # type: ignore[attr-defined]
        assert engine_conns >= 1
        assert client_backends(dsn) == engine_conns + 1  # the listener is all pgcoord adds
        assert pool.checkedout() == 0  # type: ignore[attr-defined]
        assert coord._rt.work_capacity == 3


async def test_borrowed_connections_go_back_to_the_engine_as_they_came(
    engine: AsyncEngine,
) -> None:
    async with pgcoord.Coordinator(engine=engine, app="ridden") as coord:
        await coord.cache.set("k", 1)  # committed on its own although autocommit was off
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert raw.driver_connection.autocommit is False  # type: ignore[union-attr]
        result = await conn.execute(sa.text("SELECT count(*) FROM pgcoord.cache_entries"))
        assert result.scalar_one() >= 1


async def test_a_burst_never_takes_more_than_the_budget_from_the_engine(
    dsn: str,
) -> None:
    engine = create_async_engine(_url(dsn), pool_size=10, max_overflow=0)
    try:
        async with pgcoord.Coordinator(engine=engine, max_connections=3) as coord:
            out = 0
            peak = 0

            async def work() -> None:
                nonlocal out, peak
                async with coord._rt.connection() as conn:
                    out += 1
                    peak = max(peak, out)
                    await conn.execute("SELECT pg_sleep(0.02)")
                    out -= 1

            await asyncio.gather(*(work() for _ in range(20)))
            assert peak == 2  # max_connections - 1; the rest queued
    finally:
        await engine.dispose()


def test_an_engine_with_another_driver_is_refused_naming_the_supported_one(dsn: str) -> None:
    engine = create_async_engine(_url(dsn, "asyncpg"))
    with pytest.raises(pgcoord.InvalidTypeError, match=r"postgresql\+psycopg") as info:
        pgcoord.Coordinator(engine=engine)
    assert isinstance(info.value, TypeError)
    assert "asyncpg" in str(info.value)


@pytest.fixture
def sync_engine(dsn: str) -> Iterator[sa.Engine]:
    """A sync application's engine (Flask, Django with SQLAlchemy, scripts)."""
    engine = sa.create_engine(_url(dsn), pool_size=3, max_overflow=0, pool_pre_ping=True)
    yield engine
    engine.dispose()


def test_a_sync_engine_lends_the_work_connections_of_a_blocking_coordinator(
    sync_engine: sa.Engine, dsn: str
) -> None:
    with pgcoord.BlockingCoordinator(engine=sync_engine, app="ridden_sync") as coord:
        got: list[Any] = []
        coord.pubsub_manager.subscribe("news", got.append)
        coord.pubsub_manager.publish("news", {"n": 1})
        coord.cache.set("k", [1, 2])
        assert coord.cache.get("k") == [1, 2]
        assert coord.event_queue.publish("jobs", {"x": 1}) is not None
        with coord.lock_manager.lock("report", ttl=30) as lock:
            assert lock.held
        assert coord.lock_manager.run_exclusive("report", lambda: 7) == 7
        wait_until_sync(lambda: got == [{"n": 1}])
        time.sleep(_kept.HOLD * 2)  # kept-warm connections go back to the engine
        pool = sync_engine.pool
        engine_conns = pool.checkedin() + pool.checkedout()  # type: ignore[attr-defined]
        assert engine_conns >= 1
        assert client_backends(dsn) == engine_conns + 1  # the listener is all pgcoord adds
        assert pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_sync_engines_connections_come_back_as_they_were_lent(
    sync_engine: sa.Engine,
) -> None:
    notices: list[str] = []

    @sa.event.listens_for(sync_engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))

    # The host's own statement, prepared by psycopg on the session (prepare_threshold 0).
    with sync_engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    with pgcoord.BlockingCoordinator(engine=sync_engine, app="ridden_sync", max_connections=2):
        pass  # start() ran statements on the engine's connection
    with pgcoord.BlockingCoordinator(engine=sync_engine, app="ridden_sync", max_connections=2) as c:
        for n in range(10):  # often enough that psycopg would prepare them
            c.cache.set("k", n)  # committed on its own although the engine's autocommit is off
            assert c.cache.get("k") == n
        assert c.lock_manager.run_exclusive("k", lambda: 1) == 1
    with sync_engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        assert raw.autocommit is False
        raw.prepare_threshold = 0
        for _ in range(3):  # psycopg's own prepared statements still work on the session
            assert conn.exec_driver_sql("SELECT 1 + 1").scalar_one() == 2
        count = conn.execute(sa.text("SELECT count(*) FROM pgcoord.cache_entries"))
        assert count.scalar_one() >= 1
        conn.rollback()
        # Notices on the session reach the host's handler again, not pgcoord's view of it.
        conn.exec_driver_sql("DO $$ BEGIN RAISE NOTICE 'hello host'; END $$")
    assert "hello host" in notices


def test_a_sync_engine_checkout_that_outlives_its_wait_goes_back(dsn: str) -> None:
    # The engine's single connection is held by the host past pgcoord's connect_timeout: the
    # borrow fails within it, and the checkout that then completes in the thread returns.
    engine = sa.create_engine(_url(dsn), pool_size=1, max_overflow=0, pool_timeout=30)
    try:
        with pgcoord.BlockingCoordinator(engine=engine, connect_timeout=2) as coord:
            with engine.connect(), pytest.raises(pgcoord.ConnectionFailedError):
                coord.cache.get("k")
            wait_until_sync(lambda: engine.pool.checkedout() == 0)  # type: ignore[attr-defined]
            assert coord.cache.get("k") is None
    finally:
        engine.dispose()


def test_a_sync_engine_checkout_that_ends_after_the_coordinator_closed_goes_back(
    dsn: str,
) -> None:
    # As above, but the BlockingCoordinator is closed (its event loop gone) before the host
    # lets its connection go: the checkout still waiting in the thread must go back anyway.
    engine = sa.create_engine(_url(dsn), pool_size=1, max_overflow=0, pool_timeout=60)
    try:
        with pgcoord.BlockingCoordinator(engine=engine, connect_timeout=1) as coord:
            host = engine.connect()  # waits for pgcoord's kept connection to go back first
            try:
                with pytest.raises(pgcoord.ConnectionFailedError):
                    coord.cache.get("k")
                coord.close()
            finally:
                host.close()  # the checkout waiting in the thread gets the connection now
        wait_until_sync(lambda: engine.pool.checkedout() == 0)  # type: ignore[attr-defined]
        gc.collect()
        # Checked back in, not left to the garbage collector (which would throw it away).
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_something_else_as_engine_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="Engine or AsyncEngine"):
        pgcoord.Coordinator(engine="postgresql://localhost/db")


async def test_engine_and_pool_together_are_refused(engine: AsyncEngine, dsn: str) -> None:
    pool = AsyncConnectionPool(dsn, open=False)
    with pytest.raises(pgcoord.InvalidInputError, match="not both"):
        pgcoord.Coordinator(engine=engine, pool=pool)


@pytest.mark.parametrize(
    ("kind", "pool_class"),
    [
        ("sync", sa.pool.StaticPool),
        ("sync", sa.pool.SingletonThreadPool),
        ("async", sa.pool.StaticPool),  # (SQLAlchemy refuses the other one itself)
    ],
)
def test_an_engine_whose_pool_lends_one_connection_twice_is_refused(
    dsn: str, kind: str, pool_class: type[sa.pool.Pool]
) -> None:
    # Such a pool hands the connection already lent to the next borrower too: two lock
    # acquisitions would share one session, and a session re-grants its own advisory locks.
    make = sa.create_engine if kind == "sync" else create_async_engine
    engine = make(_url(dsn), poolclass=pool_class)
    try:
        with pytest.raises(pgcoord.InvalidInputError, match=pool_class.__name__):
            pgcoord.Coordinator(engine=engine)
    finally:
        if isinstance(engine, sa.Engine):
            engine.dispose()


async def test_a_sync_engine_connection_that_comes_home_after_stop_is_checked_in(dsn: str) -> None:
    # A statement still out when stop() runs gives its connection back afterwards: it must go
    # back to the engine's pool, not be left to the garbage collector.
    engine = sa.create_engine(_url(dsn), pool_size=1, max_overflow=0, pool_timeout=30)
    try:
        coord = pgcoord.Coordinator(engine=engine)
        await coord.start()
        conn = await coord._rt.acquire()  # a statement of a service, under way
        await coord.stop()
        await coord._rt.release(conn)
        await wait_for(lambda: engine.pool.checkedout() == 0)  # type: ignore[attr-defined]
        gc.collect()
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        engine.dispose()
