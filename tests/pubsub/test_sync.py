"""SyncMessageManager and Plugin in one process: defaults, plugins, the log's retention."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgcoord
from pgcoord.names import advisory_key
from tests.pubsub.helpers import Inbox, settle, until
from tests.support import CoordFactory


async def test_sync_messages_skip_the_sender_by_default(make_coord: CoordFactory) -> None:
    a, b = await make_coord(), await make_coord()
    at_a, at_b = Inbox(), Inbox()
    await a.sync_message_manager.subscribe("s", at_a)
    await b.sync_message_manager.subscribe("s", at_b)
    await a.sync_message_manager.publish("s", "default")
    await a.sync_message_manager.publish("s", "to me too", skip_self=False)
    await a.sync_message_manager.publish("s", "only me", only_self=True)
    await at_b.wait_for(2)
    await at_a.wait_for(2)
    await settle()
    assert at_b.messages == ["default", "to me too"]
    assert at_a.messages == ["to me too", "only me"]


async def test_sync_and_pubsub_channels_of_one_name_are_separate(
    coord: pgcoord.Coordinator,
) -> None:
    pub, sync = Inbox(), Inbox()
    await coord.pubsub_manager.subscribe("same", pub)
    await coord.sync_message_manager.subscribe("same", sync)
    await coord.pubsub_manager.publish("same", "p")
    await coord.sync_message_manager.publish("same", "s", skip_self=False)
    await pub.wait_for(1)
    await sync.wait_for(1)
    await settle()
    assert (pub.messages, sync.messages) == (["p"], ["s"])


class Recorder(pgcoord.Plugin):
    name = "recorder"

    def __init__(self) -> None:
        self.inbox = Inbox()

    async def handle_sync_message(self, message: Any) -> None:
        self.inbox(message)


class Other(Recorder):
    name = "other"


async def test_a_plugin_hears_the_same_plugin_on_other_instances_only(
    make_coord: CoordFactory, dsn: str
) -> None:
    a, b = await make_coord(), await make_coord()
    mine, theirs, unrelated = Recorder(), Recorder(), Other()
    await a.add_plugin(mine)
    await b.add_plugin(theirs)
    await b.add_plugin(unrelated)
    assert mine.coord is a
    await mine.send_sync_message({"hello": "from a"})
    with psycopg.connect(dsn) as conn:
        await mine.send_sync_message("rolled back", transaction=conn)
        conn.rollback()
        await mine.send_sync_message("committed", transaction=conn)
        conn.commit()
    assert await theirs.inbox.wait_for(2) == [{"hello": "from a"}, "committed"]
    await settle()
    assert mine.inbox.messages == []
    assert unrelated.inbox.messages == []
    assert len(theirs.inbox.messages) == 2


async def test_plugins_need_a_name_and_a_coordinator(coord: pgcoord.Coordinator) -> None:
    class Nameless(pgcoord.Plugin):
        pass

    with pytest.raises(ValueError):
        await coord.add_plugin(Nameless())
    with pytest.raises(pgcoord.NotRunningError):
        await Recorder().send_sync_message("x")
    with pytest.raises(TypeError):
        await coord.add_plugin(object())  # type: ignore[arg-type]


def log_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pgcoord.message_log").fetchone()
    assert row is not None
    return int(row[0])


async def test_the_message_log_is_swept_after_its_retention(
    make_coord: CoordFactory, dsn: str
) -> None:
    # The background sweeper (retention 0.3 s) deletes expired rows by itself.
    short = await make_coord(sync_log_retention=0.3, pubsub_spill_retention=0.3)
    await short.sync_message_manager.publish("s", "swept")
    await short.pubsub_manager.publish("p", "x" * 10_000)
    assert log_rows(dsn) == 2
    await until(lambda: log_rows(dsn) == 0)
    await short.stop()
    # Rows younger than the retention stay.
    keeper = await make_coord(sync_log_retention=3600.0, pubsub_spill_retention=3600.0)
    await keeper.sync_message_manager.publish("s", "kept")
    await keeper.pubsub_manager.publish("p", "x" * 10_000)
    assert await keeper.pubsub_manager.sweep() == 0
    assert log_rows(dsn) == 2


async def test_only_one_instance_sweeps_at_a_time(make_coord: CoordFactory, dsn: str) -> None:
    # Long retention for the background sweepers; the explicit sweeps below use a short one.
    coord = await make_coord(sync_log_retention=3600.0, pubsub_spill_retention=3600.0)
    await coord.sync_message_manager.publish("s", "old")
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE pgcoord.message_log SET created_at = now() - interval '2 hours'")
        conn.commit()
        # Another instance is sweeping: it holds the sweep lock in its transaction.
        sweep_key = advisory_key(coord.schema, coord.app, "pubsub", "sweep")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (sweep_key,))
        assert await coord.pubsub_manager.sweep() == 0
        conn.rollback()
    assert await coord.pubsub_manager.sweep() == 1
    assert log_rows(dsn) == 0
