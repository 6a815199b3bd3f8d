"""PubSubManager against a real PostgreSQL: delivery semantics of the model platform."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

import pgcoord
from pgcoord.names import pg_channel
from tests.pubsub.helpers import Inbox, settle, until
from tests.support import CoordFactory


async def test_a_message_reaches_every_subscribed_instance_including_the_sender(
    make_coord: CoordFactory,
) -> None:
    a, b, c = await make_coord(), await make_coord(), await make_coord()
    inboxes = [Inbox(), Inbox(), Inbox()]
    for coord, inbox in zip((a, b, c), inboxes, strict=True):
        await coord.pubsub_manager.subscribe("news", inbox)
    await a.pubsub_manager.publish("news", {"n": 1})
    for inbox in inboxes:
        assert await inbox.wait_for(1) == [{"n": 1}]
    await settle()
    assert [len(i.messages) for i in inboxes] == [1, 1, 1]


async def test_skip_self_and_only_self(make_coord: CoordFactory) -> None:
    a, b = await make_coord(), await make_coord()
    at_a, at_b = Inbox(), Inbox()
    await a.pubsub_manager.subscribe("ch", at_a)
    await b.pubsub_manager.subscribe("ch", at_b)
    await a.pubsub_manager.publish("ch", "skip", skip_self=True)
    await a.pubsub_manager.publish("ch", "only", only_self=True)
    await a.pubsub_manager.publish("ch", "end")
    await at_a.wait_for(2)
    await at_b.wait_for(2)
    await settle()
    assert at_a.messages == ["only", "end"]
    assert at_b.messages == ["skip", "end"]
    with pytest.raises(ValueError):
        await a.pubsub_manager.publish("ch", "x", skip_self=True, only_self=True)


async def test_the_same_handler_subscribed_twice_is_called_once(coord: pgcoord.Coordinator) -> None:
    inbox = Inbox()
    await coord.pubsub_manager.subscribe("ch", inbox)
    await coord.pubsub_manager.subscribe("ch", inbox)
    await coord.pubsub_manager.publish("ch", 1)
    await coord.pubsub_manager.publish("ch", 2)
    await inbox.wait_for(2)
    await settle()
    assert inbox.messages == [1, 2]


async def test_unsubscribe_stops_only_that_handler(coord: pgcoord.Coordinator) -> None:
    kept, dropped = Inbox(), Inbox()
    await coord.pubsub_manager.subscribe("ch", kept)
    await coord.pubsub_manager.subscribe("ch", dropped)
    await coord.pubsub_manager.unsubscribe("ch", dropped)
    await coord.pubsub_manager.unsubscribe("ch", dropped)  # idempotent
    await coord.pubsub_manager.publish("ch", "x")
    await kept.wait_for(1)
    await settle()
    assert dropped.messages == []


async def test_debounce_collapses_identical_messages_and_keeps_different_ones(
    coord: pgcoord.Coordinator,
) -> None:
    debounced, plain = Inbox(), Inbox()
    await coord.pubsub_manager.subscribe("ch", debounced, debounce=1.0)
    await coord.pubsub_manager.subscribe("ch", plain)
    for _ in range(5):
        await coord.pubsub_manager.publish("ch", {"a": 1, "b": 2})
        await coord.pubsub_manager.publish("ch", {"other": True})
    await plain.wait_for(10)
    await debounced.wait_for(2)
    await settle(1.5)
    # One call per distinct message, made after the window (trailing edge).
    assert sorted(debounced.messages, key=str) == [{"a": 1, "b": 2}, {"other": True}]


async def test_sync_and_async_handlers_both_work(coord: pgcoord.Coordinator) -> None:
    got: list[str] = []

    def sync_handler(message: str) -> None:
        got.append("sync:" + message)

    async def async_handler(message: str) -> None:
        await asyncio.sleep(0)
        got.append("async:" + message)

    await coord.pubsub_manager.subscribe("ch", sync_handler)
    await coord.pubsub_manager.subscribe("ch", async_handler)
    await coord.pubsub_manager.publish("ch", "m")
    await until(lambda: len(got) == 2)
    assert sorted(got) == ["async:m", "sync:m"]


async def test_a_failing_handler_is_logged_and_affects_nothing_else(
    coord: pgcoord.Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(message: object) -> None:
        raise RuntimeError("boom")

    def broken_sync(message: object) -> None:
        raise KeyError("bang")

    inbox = Inbox()
    await coord.pubsub_manager.subscribe("ch", broken)
    await coord.pubsub_manager.subscribe("ch", broken_sync)
    await coord.pubsub_manager.subscribe("ch", inbox)
    with caplog.at_level(logging.ERROR, logger="pgcoord.pubsub"):
        for n in range(3):
            await coord.pubsub_manager.publish("ch", n)
        assert await inbox.wait_for(3) == [0, 1, 2]
        await until(lambda: sum("failed" in r.getMessage() for r in caplog.records) >= 6)
    assert coord.listener.connected


async def test_messages_of_one_channel_arrive_in_publish_order(
    make_coord: CoordFactory, dsn: str
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()

    async def slow(message: int) -> None:
        # A handler that yields must still see messages one at a time, in order.
        await asyncio.sleep(0)
        inbox(message)

    await receiver.pubsub_manager.subscribe("ordered", slow)
    big = "x" * 9000
    expected = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for n in range(300):
            if n % 10 == 3:
                # A large message (read from a table) between small ones (inline NOTIFY).
                await sender.pubsub_manager.publish("ordered", [n, big])
            elif n % 10 == 7:
                await sender.pubsub_manager.publish("ordered", [n], transaction=conn)
                await conn.commit()
            else:
                await sender.pubsub_manager.publish("ordered", [n])
            expected.append(n)
    messages = await inbox.wait_for(300)
    assert [m[0] for m in messages] == expected


async def test_subscriptions_made_before_start_work_after_it(dsn: str) -> None:
    coord = pgcoord.Coordinator(dsn, heartbeat=1.0)
    inbox = Inbox()
    await coord.pubsub_manager.subscribe("early", inbox)
    await coord.sync_message_manager.subscribe("early", inbox)
    other = pgcoord.Coordinator(dsn, heartbeat=1.0)
    async with coord, other:
        await other.pubsub_manager.publish("early", "pub")
        await other.sync_message_manager.publish("early", "sync")
        await inbox.wait_for(2)
    assert sorted(inbox.messages) == ["pub", "sync"]


async def test_no_handler_runs_after_stop_not_even_a_pending_debounced_one(
    make_coord: CoordFactory,
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    debounced, plain = Inbox(), Inbox()
    await receiver.pubsub_manager.subscribe("ch", debounced, debounce=2.0)
    await receiver.pubsub_manager.subscribe("ch", plain)
    await receiver.sync_message_manager.subscribe("ch", plain)
    await sender.pubsub_manager.publish("ch", "before")
    await plain.wait_for(1)
    await receiver.stop()
    await sender.pubsub_manager.publish("ch", "after")
    await sender.sync_message_manager.publish("ch", "after")
    await settle(2.5)  # past the debounce window that was pending at stop()
    assert debounced.messages == []
    assert plain.messages == ["before"]


async def test_apps_on_one_database_never_hear_each_other(make_coord: CoordFactory) -> None:
    blue, green = await make_coord(app="blue"), await make_coord(app="green")
    at_blue, at_green = Inbox(), Inbox()
    await blue.pubsub_manager.subscribe("shared", at_blue)
    await green.pubsub_manager.subscribe("shared", at_green)
    await blue.pubsub_manager.publish("shared", "blue")
    await at_blue.wait_for(1)
    await settle()
    assert at_green.messages == []


async def test_long_unicode_channels_and_case_are_distinct(coord: pgcoord.Coordinator) -> None:
    names = ["Ch", "ch", "é" * 255, "頻道 ✓", "a\x00b", "x" * 255]
    inboxes = {name: Inbox() for name in names}
    for name, inbox in inboxes.items():
        await coord.pubsub_manager.subscribe(name, inbox)
    for name in names:
        await coord.pubsub_manager.publish(name, name)
    for name, inbox in inboxes.items():
        assert await inbox.wait_for(1) == [name]
    await settle()
    assert all(len(i.messages) == 1 for i in inboxes.values())


async def test_an_envelope_for_another_channel_is_dropped(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    # What a hash collision between two channel names would look like on the wire.
    inbox = Inbox()
    await coord.pubsub_manager.subscribe("mine", inbox)
    wire = pg_channel(coord.schema, coord.app, "pubsub", "mine")
    stray = '{"c":"theirs","s":"x","n":1,"f":0,"m":"stray"}'
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (wire, stray))
        conn.execute("SELECT pg_notify(%s, %s)", (wire, "not json"))
    await coord.pubsub_manager.publish("mine", "ok")
    assert await inbox.wait_for(1) == ["ok"]
    await settle()
    assert inbox.messages == ["ok"]


async def test_a_publisher_gives_its_connection_back_when_idle(coord: pgcoord.Coordinator) -> None:
    for n in range(50):
        await coord.pubsub_manager.publish("ch", n)

    def checked_out() -> int:
        stats = coord.pool.get_stats()
        return int(stats.get("pool_size", 0)) - int(stats.get("pool_available", 0))

    # Back-to-back publishes keep one connection; it returns to the pool once they stop.
    await until(lambda: checked_out() == 0)
