"""Internal failures that must not leave delivery stuck or a subscription half made."""

from __future__ import annotations

from typing import Any

import pytest

import pgcoord
from pgcoord.errors import ConnectionFailedError
from pgcoord.pubsub.engine import Engine, Ready
from tests.pubsub.helpers import Inbox, settle

# Larger than a NOTIFY payload: travels through the log (a "spilled" read).
LARGE = "x" * 20_000


async def test_a_read_failing_unexpectedly_does_not_block_later_messages(
    coord: pgcoord.Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine: Engine = coord.pubsub_manager._engine
    real = engine._read_batch
    failures = []

    async def fail_once(batch: Any) -> Ready:
        if not failures:
            failures.append(batch)
            raise RuntimeError("injected: an unexpected bug in a read")
        return await real(batch)

    monkeypatch.setattr(engine, "_read_batch", fail_once)
    inbox = Inbox()
    await coord.pubsub_manager.subscribe("c", inbox)
    await coord.pubsub_manager.publish("c", LARGE)  # its read fails: lost (and logged)
    await coord.pubsub_manager.publish("c", "small after")
    await coord.pubsub_manager.publish("c", LARGE + "2")
    assert await inbox.wait_for(2) == ["small after", LARGE + "2"]
    assert failures


async def test_a_subscribe_whose_snapshot_fails_is_undone_and_can_be_retried(
    coord: pgcoord.Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine: Engine = coord.pubsub_manager._engine
    real = engine._snapshot

    async def failing() -> str:
        raise ConnectionFailedError("injected: the snapshot query failed")

    monkeypatch.setattr(engine, "_snapshot", failing)
    inbox = Inbox()
    sync = coord.sync_message_manager
    with pytest.raises(ConnectionFailedError):
        await sync.subscribe("s", inbox)
    await sync.publish("s", "while not subscribed", skip_self=False)
    await settle()
    assert inbox.messages == []  # the failed subscribe left no live handler

    monkeypatch.setattr(engine, "_snapshot", real)
    await sync.subscribe("s", inbox)  # not taken for a duplicate of the failed one
    assert len(engine._snapshots) == 1  # reconnect catch-up will cover the channel
    await sync.publish("s", "subscribed", skip_self=False)
    assert await inbox.wait_for(1) == ["subscribed"]
