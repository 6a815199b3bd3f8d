"""engine=: pgcoord borrows its work connections from the application's SQLAlchemy engine."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
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


def test_a_sync_engine_is_refused_pointing_at_create_async_engine(dsn: str) -> None:
    engine = sa.create_engine(_url(dsn))
    with pytest.raises(pgcoord.InvalidTypeError, match="create_async_engine"):
        pgcoord.Coordinator(engine=engine)


def test_something_else_as_engine_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="AsyncEngine"):
        pgcoord.Coordinator(engine="postgresql://localhost/db")


async def test_engine_and_pool_together_are_refused(engine: AsyncEngine, dsn: str) -> None:
    pool = AsyncConnectionPool(dsn, open=False)
    with pytest.raises(pgcoord.InvalidInputError, match="not both"):
        pgcoord.Coordinator(engine=engine, pool=pool)
