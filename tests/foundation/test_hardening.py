"""The connection layer against misconfiguration (issue 11): a caller's pool on another database
than ``$PGCOORD_DSN``, a database default ``idle_session_timeout``, a reserved schema name."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

import pgcoord
from pgcoord import _driver
from tests.support import CoordFactory, PgServer, unique_name


@pytest.fixture
def other_dsn(pg: PgServer, template_db: str) -> Iterator[str]:
    """A second migrated database on the same server (not the one the ``dsn`` fixture gives)."""
    name = unique_name("pgct_other")
    yield pg.create_database(name, template=template_db)
    pg.drop_database(name)


@pytest.fixture
def idle_dsn(pg: PgServer, template_db: str) -> Iterator[str]:
    """A migrated database of its own whose default ``idle_session_timeout`` is 1 s (a DBA's
    safeguard), so no other test's sessions are affected."""
    name = unique_name("pgct_idle")
    dsn = pg.create_database(name, template=template_db)
    with pg.admin() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET idle_session_timeout = '1s'").format(
                sql.Identifier(name)
            )
        )
    yield dsn
    pg.drop_database(name)


async def _eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.05)


def _dbname(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


# -- pool= without dsn= (defect 3) --------------------------------------------------------------


async def test_pool_without_dsn_uses_the_pools_database_not_the_environment(
    dsn: str, other_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # $PGCOORD_DSN names another database: pgcoord must follow the pool, or the listener would
    # listen there while messages are sent in the pool's database, and never arrive.
    monkeypatch.setenv(pgcoord.DSN_ENV, other_dsn)
    async with AsyncConnectionPool(dsn, min_size=1, max_size=3, open=False) as pool:
        await pool.open(wait=True)
        async with (
            pgcoord.Coordinator(pool=pool, app="shared") as pooled,
            pgcoord.Coordinator(dsn, app="shared") as direct,
        ):
            assert pooled.dsn is not None and _dbname(pooled.dsn) == _dbname(dsn)
            to_pooled: list[Any] = []
            to_direct: list[Any] = []
            await pooled.pubsub_manager.subscribe("news", to_pooled.append)
            await direct.pubsub_manager.subscribe("news", to_direct.append)
            await direct.pubsub_manager.publish("news", {"from": "direct"}, skip_self=True)
            await pooled.pubsub_manager.publish("news", {"from": "pooled"}, skip_self=True)
            await _eventually(lambda: bool(to_pooled and to_direct), "delivery both ways")
            assert to_pooled == [{"from": "direct"}]
            assert to_direct == [{"from": "pooled"}]
            # Locks too: the pool's instance and the direct one exclude each other.
            async with pooled.lock_manager.lock("k"):
                with pytest.raises(pgcoord.LockAcquireError):
                    await direct.lock_manager.try_acquire("k")


async def test_pool_with_keyword_arguments_is_followed_too(
    dsn: str, other_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pgcoord.DSN_ENV, other_dsn)
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    dbname = params.pop("dbname")
    base = psycopg.conninfo.make_conninfo("", **params)
    pool = AsyncConnectionPool(base, kwargs={"dbname": dbname}, min_size=1, open=False)
    async with pool, pgcoord.Coordinator(pool=pool) as coord:
        assert coord.dsn is not None and _dbname(coord.dsn) == dbname


async def test_pool_whose_conninfo_is_computed_needs_a_dsn() -> None:
    async def conninfo() -> str:
        return ""

    pool = AsyncConnectionPool(conninfo, open=False)
    with pytest.raises(pgcoord.InvalidInputError, match="dsn="):
        pgcoord.Coordinator(pool=pool)


async def test_dsn_and_pool_on_different_databases_are_refused_at_start(
    dsn: str, other_dsn: str
) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True)
        coord = pgcoord.Coordinator(other_dsn, pool=pool)
        with pytest.raises(pgcoord.InvalidInputError, match="same database"):
            await coord.start()
        assert not coord.running
        # The pool is the caller's: it is left open and usable.
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")


async def test_dsn_and_pool_spelled_differently_on_one_database_start(dsn: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    spelled = psycopg.conninfo.make_conninfo("", **dict(reversed(list(params.items()))))
    async with AsyncConnectionPool(spelled, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True)
        async with pgcoord.Coordinator(dsn, pool=pool) as coord:
            await coord.cache.set("k", 1)
            assert await coord.cache.get("k") == 1


async def test_an_engine_is_followed_before_the_environment_and_checked_against_dsn(
    dsn: str, other_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import create_async_engine

    monkeypatch.setenv(pgcoord.DSN_ENV, other_dsn)
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    url = sa.URL.create(
        "postgresql+psycopg",
        username=str(params.get("user") or "") or None,
        host=str(params.get("host") or "") or None,
        database=str(params["dbname"]),
    )
    engine = create_async_engine(url, pool_size=3, max_overflow=0)
    try:
        async with pgcoord.Coordinator(engine=engine, app="eng") as coord:
            assert coord.dsn is not None and _dbname(coord.dsn) == _dbname(dsn)
            async with coord.lock_manager.lock("k"):
                assert [h.key for h in await coord.lock_manager.holders()] == ["k"]
        with pytest.raises(pgcoord.InvalidInputError, match="same database"):
            await pgcoord.Coordinator(other_dsn, engine=engine).start()
    finally:
        await engine.dispose()


# -- a database default idle_session_timeout (defect 5) ----------------------------------------


async def test_a_database_idle_session_timeout_does_not_close_pgcoords_work_sessions(
    idle_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with pgcoord.Coordinator(idle_dsn, heartbeat=0.5, app="idle") as coord:
        async with coord.pool.connection() as conn:
            cur = await conn.execute("SELECT current_setting('idle_session_timeout')")
            assert await cur.fetchone() == ("0",)
        received: list[Any] = []
        synced: list[Any] = []
        jobs: list[Any] = []
        await coord.pubsub_manager.subscribe("c", received.append)
        await coord.sync_message_manager.subscribe("s", synced.append)
        await coord.event_queue.subscribe("q", process=lambda message, ctx: jobs.append(message))
        with caplog.at_level(logging.WARNING):
            await asyncio.sleep(2.5)  # past the database's 1 s
            await coord.cache.set("k", 1)
            assert await coord.cache.get("k") == 1
            await coord.pubsub_manager.publish("c", "m")
            await coord.sync_message_manager.publish("s", "m", skip_self=False)
            await coord.event_queue.publish("q", "job")
            assert await coord.lock_manager.run_exclusive("l", lambda: 7) == 7
            await _eventually(lambda: bool(received and synced and jobs), "every delivery")
        assert (received, synced, jobs) == (["m"], ["m"], ["job"])
    # No session was closed under the pool during the quiet period (psycopg_pool warns when it
    # discards one).
    assert not [r for r in caplog.records if "closed connection" in r.getMessage()]


async def test_a_lock_lease_still_ends_a_silent_holders_session(idle_dsn: str) -> None:
    # pgcoord turns the database's idle_session_timeout off on its work sessions, but a held
    # lock's session still carries the lock's own lease.
    async with pgcoord.Coordinator(idle_dsn, app="idle") as coord:
        lock = await coord.lock_manager.acquire("k", ttl=0.5)
        await _eventually(lambda: lock.lost, "the lease end")
        again = await coord.lock_manager.try_acquire("k", timeout=5.0)
        await again.release()


async def test_idle_session_timeout_is_a_connection_failure(idle_dsn: str) -> None:
    # A session the server ended for idling (57P05): nothing ran on it, so it is a lost
    # connection (retryable), not a refused operation.
    conn = await psycopg.AsyncConnection.connect(idle_dsn, autocommit=True)
    try:
        await asyncio.sleep(1.5)
        with pytest.raises(psycopg.Error) as raised:
            await conn.execute("SELECT 1")
    finally:
        await conn.close()
    translated = _driver.translate(raised.value, idle_dsn)
    assert isinstance(translated, pgcoord.ConnectionFailedError), translated


async def test_a_callers_pool_with_dead_sessions_still_serves_every_call(idle_dsn: str) -> None:
    # The caller's pool keeps the database default, so its sessions die while idle: pgcoord
    # finds them dead when it borrows them and takes fresh ones.
    async with AsyncConnectionPool(idle_dsn, min_size=2, max_size=3, open=False) as pool:
        await pool.open(wait=True)
        async with pgcoord.Coordinator(idle_dsn, pool=pool, app="idle") as coord:
            for _ in range(2):
                await asyncio.sleep(1.5)
                await coord.cache.set("k", 2)
                assert await coord.cache.get("k") == 2
                async with coord.lock_manager.lock("l"):
                    pass
                assert await coord.lock_manager.holders() == []


async def test_a_step_that_meets_an_idle_session_timeout_runs_again_once(idle_dsn: str) -> None:
    # Runtime.run is what services call (it has no public face): a statement that meets a
    # session the server ended for idling (57P05) was never read, so it runs again, once.
    async with pgcoord.Coordinator(idle_dsn, app="idle") as coord:
        rt = coord._rt
        pids: list[int] = []

        async def step(conn: psycopg.AsyncConnection[Any]) -> int:
            pids.append(conn.info.backend_pid)
            if len(pids) == 1:  # this session times out while the step holds it
                await conn.execute("SET idle_session_timeout = '100ms'")
                await asyncio.sleep(0.5)
            cur = await conn.execute("SELECT 41 + 1")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        assert await rt.run("test step", step) == 42
        assert len(pids) == 2 and pids[0] != pids[1]

        # Any other lost connection: again only when the step says it is idempotent.
        runs: list[int] = []

        async def terminated(conn: psycopg.AsyncConnection[Any]) -> None:
            runs.append(1)
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(pgcoord.ConnectionFailedError):
            await rt.run("test write", terminated)
        assert len(runs) == 1
        with pytest.raises(pgcoord.ConnectionFailedError):
            await rt.run("test read", terminated, idempotent=True)
        assert len(runs) == 3  # once more, and no further
        await coord.cache.set("k", 1)  # the pool replaced what was lost


# -- the schema name (defect 10) ---------------------------------------------------------------


def test_a_schema_starting_with_pg_is_refused_at_construction() -> None:
    with pytest.raises(pgcoord.InvalidInputError, match="pg_"):
        pgcoord.Coordinator("host=/nonexistent", schema="pg_x")
    with pytest.raises(pgcoord.InvalidInputError):
        pgcoord.Coordinator("host=/nonexistent", schema="pg_")
    # Only the prefix is reserved.
    pgcoord.Coordinator("host=/nonexistent", schema="pgx")


async def test_a_latin1_database_gives_typed_errors_not_unicode_encode_errors(
    pg: PgServer, make_coord: CoordFactory
) -> None:
    # libpq's default client encoding is the database's; Python text beyond LATIN1 then fails
    # to encode in the driver before the server is asked.
    name = unique_name("pgct_latin1")
    with pg.admin() as conn:
        conn.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
            ).format(sql.Identifier(name))
        )
    dsn = pg.dsn_for(name)
    try:
        coord = await make_coord(dsn=dsn, migrate=True)
        await coord.cache.set("café", "déjà vu")
        assert await coord.cache.get("café") == "déjà vu"
        with pytest.raises(pgcoord.PgcoordError):
            await coord.cache.set("中文", 1)
        await coord.stop()
    finally:
        pg.drop_database(name)
