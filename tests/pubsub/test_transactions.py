"""transaction=: a message is delivered if and only if the caller's transaction commits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import pgcoord
from tests.conftest import CoordFactory
from tests.pubsub.helpers import Inbox, settle

MANAGERS = ["pubsub_manager", "sync_message_manager"]


async def pair(make_coord: CoordFactory, manager: str) -> tuple[Any, Inbox]:
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()
    await getattr(receiver, manager).subscribe("tx", inbox)
    return getattr(sender, manager), inbox


@pytest.mark.parametrize("manager", MANAGERS)
async def test_psycopg_async_rollback_is_never_delivered_commit_exactly_once(
    make_coord: CoordFactory, dsn: str, manager: str
) -> None:
    publisher, inbox = await pair(make_coord, manager)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await publisher.publish("tx", "rolled back", transaction=conn)
        await conn.rollback()
        await publisher.publish("tx", "committed", transaction=conn)
        await settle()
        assert inbox.messages == []  # not before the commit
        await conn.commit()
        async with conn.transaction():
            await publisher.publish("tx", "in a block", transaction=conn)
    assert await inbox.wait_for(2) == ["committed", "in a block"]
    await settle()
    assert inbox.messages == ["committed", "in a block"]


@pytest.mark.parametrize("manager", MANAGERS)
async def test_psycopg_sync_connection(make_coord: CoordFactory, dsn: str, manager: str) -> None:
    publisher, inbox = await pair(make_coord, manager)
    with psycopg.connect(dsn) as conn:
        await publisher.publish("tx", "rolled back", transaction=conn)
        conn.rollback()
        await publisher.publish("tx", "committed", transaction=conn)
        conn.commit()
    assert await inbox.wait_for(1) == ["committed"]
    await settle()
    assert inbox.messages == ["committed"]


@pytest.mark.parametrize("manager", MANAGERS)
async def test_sqlalchemy_session(make_coord: CoordFactory, dsn: str, manager: str) -> None:
    publisher, inbox = await pair(make_coord, manager)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        with Session(engine) as session:
            await publisher.publish("tx", "rolled back", transaction=session)
            session.rollback()
            await publisher.publish("tx", "committed", transaction=session)
            session.commit()
    finally:
        engine.dispose()
    assert await inbox.wait_for(1) == ["committed"]
    await settle()
    assert inbox.messages == ["committed"]


async def test_sqlalchemy_async_session(make_coord: CoordFactory, dsn: str) -> None:
    publisher, inbox = await pair(make_coord, "sync_message_manager")
    engine = create_async_engine(
        "postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(dsn)
    )
    try:
        async with AsyncSession(engine) as session:
            await publisher.publish("tx", "rolled back", transaction=session)
            await session.rollback()
            await publisher.publish("tx", "committed", transaction=session)
            await session.commit()
    finally:
        await engine.dispose()
    assert await inbox.wait_for(1) == ["committed"]


async def test_a_transaction_notifies_once_however_many_messages_it_publishes(
    make_coord: CoordFactory, dsn: str
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()
    for channel in ("a", "b"):
        await receiver.pubsub_manager.subscribe(channel, inbox)
        await receiver.sync_message_manager.subscribe(channel, inbox)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as spy:
        # Listen on every channel pgcoord could NOTIFY for these publishes.
        channels = [sender._rt.channel("wake", "transactions")]
        channels += [sender._rt.channel(tag, c) for tag in ("pubsub", "sync") for c in "ab"]
        for channel in channels:
            await spy.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            big = "x" * 20_000
            for n in range(3):
                await sender.pubsub_manager.publish("a", n, transaction=conn)
                await sender.pubsub_manager.publish("b", [n, big], transaction=conn)
                await sender.sync_message_manager.publish("a", n, transaction=conn)
                await sender.sync_message_manager.publish("b", n, transaction=conn)
            await conn.commit()
        await inbox.wait_for(12)
        received: list[str] = []

        async def collect() -> None:
            async for notify in spy.notifies():
                received.append(notify.channel)

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0.5)
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
    assert received == [channels[0]]
    assert sorted(map(str, inbox.messages)) == sorted(
        map(str, [*range(3), *range(3), *range(3), *([n, big] for n in range(3))])
    )


async def test_an_autocommit_connection_outside_a_transaction_is_refused(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(ValueError):
            await coord.pubsub_manager.publish("tx", 1, transaction=conn)


def test_the_blocking_api_publishes_inside_a_sync_transaction(dsn: str) -> None:
    received: list[Any] = []
    sender = pgcoord.BlockingCoordinator(dsn)
    receiver = pgcoord.BlockingCoordinator(dsn)
    with sender, receiver:
        receiver.pubsub_manager.subscribe("blocking", received.append)
        receiver.sync_message_manager.subscribe("blocking", received.append)
        with psycopg.connect(dsn) as conn:
            sender.pubsub_manager.publish("blocking", "rolled back", transaction=conn)
            conn.rollback()
            sender.pubsub_manager.publish("blocking", "pub", transaction=conn)
            sender.sync_message_manager.publish("blocking", "sync", transaction=conn)
            conn.commit()
        sender.pubsub_manager.publish("blocking", "plain")
        deadline = time.monotonic() + 20
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
    # Order holds per channel (pub/sub "pub" before "plain"); the sync channel is another one.
    assert sorted(received) == ["plain", "pub", "sync"]
    assert received.index("pub") < received.index("plain")
