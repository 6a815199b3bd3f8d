"""``transaction=``: pgcoord's statements join the caller's transaction, whatever its kind.

One conformance test runs every effect a caller can put in its own transaction (a pub/sub
message, a sync message, a job, a batch of jobs) through every kind of transaction pgcoord
accepts, and checks that another instance sees the effect if and only if the caller commits.
The tests after it cover the blocking entry point and what is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import pgcoord
from pgcoord import transaction
from tests.support import CoordFactory, wait_until

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


# -- the caller's transaction, of every accepted kind -------------------------------------------


@contextmanager
def sync_kind(kind: str, dsn: str, commit: bool) -> Iterator[object]:
    """An open transaction of a sync ``kind``, committed or rolled back when the block ends."""
    if kind == "psycopg":
        with psycopg.connect(dsn) as conn:
            yield conn
            conn.commit() if commit else conn.rollback()
        return
    if kind == "psycopg_block":
        # An autocommit connection inside `with conn.transaction():`, as transaction.py asks.
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            yield conn
            if not commit:
                raise psycopg.Rollback  # leaves the block rolling back, and goes no further
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
    """An open transaction of an async ``kind``, committed or rolled back when the block ends."""
    if kind == "psycopg_async":
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            yield conn
            await (conn.commit() if commit else conn.rollback())
        return
    if kind == "psycopg_async_block":
        connecting = psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with await connecting as conn, conn.transaction():
            yield conn
            if not commit:
                raise psycopg.Rollback
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


SYNC_KINDS = ["psycopg", "psycopg_block", "sa_connection", "sa_session"]
ASYNC_KINDS = ["psycopg_async", "psycopg_async_block", "sa_async_connection", "sa_async_session"]


@asynccontextmanager
async def caller_transaction(kind: str, dsn: str, commit: bool) -> AsyncIterator[object]:
    """A transaction of any accepted ``kind``: the async API takes sync ones too."""
    if kind in SYNC_KINDS:
        with sync_kind(kind, dsn, commit) as txn:
            yield txn
    else:
        async with async_kind(kind, dsn, commit) as txn:
            yield txn


# -- what a caller can put in its transaction ----------------------------------------------------


class Effect:
    """One kind of effect: ``watch`` makes an instance record what reaches it (in ``seen``);
    ``produce`` causes the effect from another instance and returns the labels it sent."""

    channel = "conformance"

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def watch(self, coord: pgcoord.Coordinator) -> None:
        raise NotImplementedError

    async def produce(self, coord: pgcoord.Coordinator, label: str, txn: object) -> list[str]:
        raise NotImplementedError

    def check(self) -> None:
        """Effect-specific checks on what was seen (none by default)."""


class Message(Effect):
    """``pubsub_manager.publish``."""

    async def watch(self, coord: pgcoord.Coordinator) -> None:
        await coord.pubsub_manager.subscribe(self.channel, self.seen.append)

    async def produce(self, coord: pgcoord.Coordinator, label: str, txn: object) -> list[str]:
        await coord.pubsub_manager.publish(self.channel, label, transaction=txn)
        return [label]


class SyncMessage(Effect):
    """``sync_message_manager.publish`` (skips the sender: only the other instance sees it)."""

    async def watch(self, coord: pgcoord.Coordinator) -> None:
        await coord.sync_message_manager.subscribe(self.channel, self.seen.append)

    async def produce(self, coord: pgcoord.Coordinator, label: str, txn: object) -> list[str]:
        await coord.sync_message_manager.publish(self.channel, label, transaction=txn)
        return [label]


class Job(Effect):
    """``event_queue.publish``, run by a worker of the other instance, one job at a time (so in
    queue order); the id a publish returns must be the id the job runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.published: dict[str, int] = {}
        self.ran: dict[str, int] = {}

    async def watch(self, coord: pgcoord.Coordinator) -> None:
        async def process(message: Any, ctx: pgcoord.JobContext) -> None:
            self.ran[message] = ctx.id
            self.seen.append(message)

        await coord.event_queue.subscribe(self.channel, process=process, interval=0.05)

    async def produce(self, coord: pgcoord.Coordinator, label: str, txn: object) -> list[str]:
        self.published[label] = await coord.event_queue.publish(
            self.channel, label, transaction=txn
        )
        return [label]

    def check(self) -> None:
        assert self.ran == {label: self.published[label] for label in self.seen}


class Jobs(Job):
    """``event_queue.publish_many``: two jobs in one statement."""

    async def produce(self, coord: pgcoord.Coordinator, label: str, txn: object) -> list[str]:
        batch = [f"{label} 1", f"{label} 2"]
        ids = await coord.event_queue.publish_many(self.channel, batch, transaction=txn)
        self.published.update(zip(batch, ids, strict=True))
        return batch


EFFECTS: dict[str, type[Effect]] = {
    "message": Message,
    "sync_message": SyncMessage,
    "job": Job,
    "jobs": Jobs,
}


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
@pytest.mark.parametrize("effect_kind", list(EFFECTS))
@pytest.mark.parametrize("kind", SYNC_KINDS + ASYNC_KINDS)
async def test_an_effect_in_the_callers_transaction_happens_if_and_only_if_it_commits(
    make_coord: CoordFactory, dsn: str, kind: str, effect_kind: str, outcome: str
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    effect = EFFECTS[effect_kind]()
    await effect.watch(receiver)
    commit = outcome == "commit"
    # The same effect without transaction= is a marker: what was sent before it would have
    # reached the receiver before it (one publisher's messages, and equal jobs, keep their
    # order), so once a marker arrived, nothing that is missing can still come.
    async with caller_transaction(kind, dsn, commit) as txn:
        inside = await effect.produce(sender, "inside", txn)
        during = await effect.produce(sender, "during", None)
        await wait_until(lambda: effect.seen[-1:] == during[-1:])
        assert effect.seen == during  # nothing of an open transaction shows
    after = await effect.produce(sender, "after", None)
    await wait_until(lambda: effect.seen[-1:] == after[-1:])
    assert effect.seen == [*during, *(inside if commit else []), *after]
    effect.check()


# -- the blocking entry point, and what is refused ----------------------------------------------


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_sync_transaction_commit_and_rollback(probe: str, kind: str) -> None:
    with sync_kind(kind, probe, commit=True) as txn:
        transaction.execute_sync(txn, INSERT, ("committed",))
    with sync_kind(kind, probe, commit=False) as txn:
        transaction.execute_sync(txn, INSERT, ("rolled back",))
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
