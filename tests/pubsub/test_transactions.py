"""transaction= for messages, beyond "delivered if and only if the caller commits".

That promise is checked for every kind of transaction and every effect by the conformance test
in tests/foundation/test_transaction.py; here: one NOTIFY per transaction, what is refused, and
the blocking API.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord.names import pg_channel
from tests.pubsub.helpers import Inbox
from tests.support import CoordFactory


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
        channels = [pg_channel(sender.schema, sender.app, "wake", "transactions")]
        channels += [
            pg_channel(sender.schema, sender.app, tag, c)
            for tag in ("pubsub", "sync")
            for c in "ab"
        ]
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
