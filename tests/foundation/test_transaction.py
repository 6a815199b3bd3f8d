"""``transaction=``: pgcoord's statements join the caller's transaction, whatever its kind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from pgcoord import transaction

INSERT = "INSERT INTO txn_probe (label) VALUES (%s)"


@pytest.fixture
def probe(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE txn_probe (label text)")
    return dsn


def labels(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT label FROM txn_probe ORDER BY label")]


def sa_engine(dsn: str) -> sa.Engine:
    # Hand SQLAlchemy the libpq DSN unchanged: its URL parser would mangle socket hosts.
    return sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))


def sa_async_engine(dsn: str) -> AsyncEngine:
    return create_async_engine(
        "postgresql+psycopg_async://", async_creator=lambda: psycopg.AsyncConnection.connect(dsn)
    )


@contextmanager
def sync_kind(kind: str, dsn: str, commit: bool) -> Iterator[object]:
    if kind == "psycopg":
        with psycopg.connect(dsn) as conn:
            yield conn
            conn.commit() if commit else conn.rollback()
        return
    engine = sa_engine(dsn)
    try:
        if kind == "sa_connection":
            with engine.connect() as sa_conn:
                sa_conn.execute(sa.text("SELECT 1"))  # begin the transaction
                yield sa_conn
                sa_conn.commit() if commit else sa_conn.rollback()
        else:
            with Session(engine) as session:
                yield session
                session.commit() if commit else session.rollback()
    finally:
        engine.dispose()


@asynccontextmanager
async def async_kind(kind: str, dsn: str, commit: bool) -> AsyncIterator[object]:
    if kind == "psycopg_async":
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            yield conn
            await (conn.commit() if commit else conn.rollback())
        return
    engine = sa_async_engine(dsn)
    try:
        if kind == "sa_async_connection":
            async with engine.connect() as sa_conn:
                await sa_conn.execute(sa.text("SELECT 1"))
                yield sa_conn
                await (sa_conn.commit() if commit else sa_conn.rollback())
        else:
            async with AsyncSession(engine) as session:
                yield session
                await (session.commit() if commit else session.rollback())
    finally:
        await engine.dispose()


SYNC_KINDS = ["psycopg", "sa_connection", "sa_session"]
ASYNC_KINDS = ["psycopg_async", "sa_async_connection", "sa_async_session"]


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_sync_transaction_commit_and_rollback(probe: str, kind: str) -> None:
    with sync_kind(kind, probe, commit=True) as txn:
        transaction.execute_sync(txn, INSERT, ("committed",))
    with sync_kind(kind, probe, commit=False) as txn:
        transaction.execute_sync(txn, INSERT, ("rolled back",))
    assert labels(probe) == ["committed"]


@pytest.mark.parametrize("kind", SYNC_KINDS)
async def test_sync_transaction_through_the_async_entry_point(probe: str, kind: str) -> None:
    with sync_kind(kind, probe, commit=True) as txn:
        await transaction.execute(txn, INSERT, ("committed",))
    with sync_kind(kind, probe, commit=False) as txn:
        await transaction.execute(txn, INSERT, ("rolled back",))
    assert labels(probe) == ["committed"]


@pytest.mark.parametrize("kind", ASYNC_KINDS)
async def test_async_transaction_commit_and_rollback(probe: str, kind: str) -> None:
    async with async_kind(kind, probe, commit=True) as txn:
        rows = await transaction.execute(txn, INSERT + " RETURNING label", ("committed",))
        assert rows == [("committed",)]
    async with async_kind(kind, probe, commit=False) as txn:
        await transaction.execute(txn, INSERT, ("rolled back",))
    assert labels(probe) == ["committed"]


def test_autocommit_connection_outside_a_transaction_is_refused(probe: str) -> None:
    with psycopg.connect(probe, autocommit=True) as conn:
        with pytest.raises(ValueError, match="outside a transaction"):
            transaction.execute_sync(conn, INSERT, ("escaped",))
        with conn.transaction():
            transaction.execute_sync(conn, INSERT, ("inside",))
    assert labels(probe) == ["inside"]


def test_a_failed_transaction_is_refused_clearly(probe: str) -> None:
    with psycopg.connect(probe) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(ValueError, match="failed transaction"):
            transaction.execute_sync(conn, INSERT, ("x",))


@pytest.mark.parametrize("bad", [None, "postgresql://x", object(), 42])
def test_other_objects_are_refused_with_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="transaction= must be"):
        transaction.check_transaction(bad)
    with pytest.raises(TypeError):
        transaction.execute_sync(bad, "SELECT 1")


async def test_async_connection_in_the_sync_api_is_refused(probe: str) -> None:
    async with await psycopg.AsyncConnection.connect(probe) as conn:
        with pytest.raises(TypeError, match="async"):
            transaction.execute_sync(conn, INSERT, ("x",))


def test_a_sqlalchemy_connection_that_began_nothing_still_commits_the_effect(probe: str) -> None:
    engine = sa_engine(probe)
    try:
        with engine.connect() as conn:
            assert not conn.in_transaction()
            transaction.execute_sync(conn, INSERT, ("committed",))
            conn.commit()
        with engine.connect() as conn:
            transaction.execute_sync(conn, INSERT, ("never committed",))
    finally:
        engine.dispose()
    assert labels(probe) == ["committed"]


async def test_an_async_sqlalchemy_connection_that_began_nothing_still_commits(probe: str) -> None:
    engine = sa_async_engine(probe)
    try:
        async with engine.connect() as conn:
            await transaction.execute(conn, INSERT, ("committed",))
            await conn.commit()
    finally:
        await engine.dispose()
    assert labels(probe) == ["committed"]
