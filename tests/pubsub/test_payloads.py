"""Payloads: every JSON value, the NOTIFY size boundary, large messages, bad input."""

from __future__ import annotations

import datetime
from typing import Any

import psycopg
import pytest

import pgcoord
from tests.pubsub.helpers import Inbox, settle
from tests.support import CoordFactory


def json_string_of_bytes(size: int, char: str = "x") -> str:
    """A str whose JSON text (quotes included) is exactly ``size`` UTF-8 bytes."""
    width = len(char.encode())
    body = size - 2
    return char * (body // width) + "y" * (body % width)


def log_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pgcoord.message_log").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("manager", ["pubsub_manager", "sync_message_manager"])
async def test_every_size_arrives_intact(make_coord: CoordFactory, manager: str) -> None:
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()
    await getattr(receiver, manager).subscribe("sizes", inbox)
    messages: list[Any] = [
        "",  # 0 bytes of content
        None,
        json_string_of_bytes(7_999),
        json_string_of_bytes(8_000),
        json_string_of_bytes(7_999, "é"),
        json_string_of_bytes(8_000, "😀"),
        json_string_of_bytes(1_000_000),
        {"nested": [json_string_of_bytes(300_000, "ж"), {"n": 1.5, "t": True}]},
        0,
        False,
        [],
        {},
    ]
    for message in messages:
        await getattr(sender, manager).publish("sizes", message)
    assert await inbox.wait_for(len(messages)) == messages
    await settle()
    assert len(inbox.messages) == len(messages)


@pytest.mark.parametrize("size", [200, 20_000])
async def test_nul_characters_and_any_unicode_round_trip(
    make_coord: CoordFactory, size: int
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()
    await receiver.pubsub_manager.subscribe("unicode", inbox)
    message = {
        "nul\x00key": "a\x00b\x00",
        "text": "héllo 世界 😀 \u200b\u2028 \\ \" ' \n\t",
        "lone surrogate": "\ud800",
        "pad": "z" * size,
    }
    await sender.pubsub_manager.publish("unicode", message)
    assert await inbox.wait_for(1) == [message]


async def test_a_message_above_the_maximum_is_refused_before_anything_is_sent(
    make_coord: CoordFactory, dsn: str
) -> None:
    sender = await make_coord(pubsub_max_payload=100_000)
    receiver = await make_coord()
    inbox = Inbox()
    await receiver.pubsub_manager.subscribe("big", inbox)
    await receiver.sync_message_manager.subscribe("big", inbox)
    with pytest.raises(pgcoord.PayloadTooLargeError):
        await sender.pubsub_manager.publish("big", json_string_of_bytes(100_001))
    with pytest.raises(pgcoord.PayloadTooLargeError):
        await sender.sync_message_manager.publish("big", json_string_of_bytes(100_001))
    await sender.pubsub_manager.publish("big", json_string_of_bytes(100_000))
    await inbox.wait_for(1)
    await settle()
    assert len(inbox.messages) == 1
    assert log_rows(dsn) == 1  # only the accepted (spilled) one was written


@pytest.mark.parametrize(
    "message",
    [
        {1, 2},
        datetime.datetime(2026, 1, 1),
        object(),
        {1: "int key"},
        (1, 2),
        b"bytes",
    ],
    ids=["set", "datetime", "object", "int-key", "tuple", "bytes"],
)
async def test_non_json_messages_raise_type_error_before_sending(
    make_coord: CoordFactory, dsn: str, message: object
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()
    await receiver.pubsub_manager.subscribe("ch", inbox)
    await receiver.sync_message_manager.subscribe("ch", inbox)
    with pytest.raises(TypeError):
        await sender.pubsub_manager.publish("ch", message)
    with pytest.raises(TypeError):
        await sender.sync_message_manager.publish("ch", message)
    with pytest.raises(ValueError):
        await sender.pubsub_manager.publish("ch", float("nan"))
    await settle()
    assert inbox.messages == []
    assert log_rows(dsn) == 0


async def test_bad_channels_handlers_and_options_are_refused(coord: pgcoord.Coordinator) -> None:
    pubsub, sync = coord.pubsub_manager, coord.sync_message_manager
    for bad in ("", "x" * 256):
        with pytest.raises(ValueError):
            await pubsub.publish(bad, 1)
        with pytest.raises(ValueError):
            await pubsub.subscribe(bad, print)
        with pytest.raises(ValueError):
            await sync.publish(bad, 1)
        with pytest.raises(ValueError):
            await sync.subscribe(bad, print)
    with pytest.raises(TypeError):
        await pubsub.publish(b"bytes", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await pubsub.subscribe("ch", "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await sync.subscribe("ch", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await pubsub.subscribe("ch", print, debounce=-1)
    with pytest.raises(TypeError):
        await pubsub.publish("ch", 1, transaction="not a connection")
    with pytest.raises(ValueError):
        pgcoord.Coordinator(sync_log_retention=0)
    with pytest.raises(ValueError):
        pgcoord.Coordinator(pubsub_max_payload=0)


async def test_publish_needs_a_running_coordinator(dsn: str) -> None:
    coord = pgcoord.Coordinator(dsn)
    with pytest.raises(pgcoord.NotRunningError):
        await coord.pubsub_manager.publish("ch", 1)
    async with coord:
        pass
    with pytest.raises(pgcoord.NotRunningError):
        await coord.sync_message_manager.publish("ch", 1)
