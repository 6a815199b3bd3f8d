"""Properties of pub/sub and sync messages over generated channels and messages.

The property of a publish: a typed error (InvalidInputError / InvalidTypeError) with nothing
logged and nothing delivered, or the message delivered exactly once, exactly as published (same
types all the way down). A channel that ``subscribe`` refuses must be refused by ``publish``
too: accepting it would lose every message silently. "Nothing delivered" is checked without
waiting for silence: a sentinel published afterwards on the same channel must be the next thing
the subscriber receives, since one publisher's messages on a channel arrive in order.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

import pgcoord
from tests.properties import strategies as gen
from tests.properties.strategies import BOUND, assert_same, outcome

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(900)]

#: How a message is sent: plain pub/sub, pub/sub in a transaction, sync message, sync message
#: in a transaction (delivered on COMMIT).
MODES = ["pubsub", "pubsub-txn", "sync", "sync-txn"]
_sentinels = itertools.count()

#: Messages larger than a NOTIFY can carry (8000 bytes) travel through the message log.
big_messages = st.one_of(
    st.text(gen.ANY_CHAR, min_size=2100, max_size=2200),
    st.lists(st.sampled_from(gen.SPECIAL_TEXT), min_size=40, max_size=60),
)
messages = st.one_of(gen.values, gen.values, gen.values, big_messages)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def txconn(module_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """The caller's own connection, for ``transaction=``."""
    conn = await psycopg.AsyncConnection.connect(module_dsn, autocommit=True)
    yield conn
    await conn.close()


async def _last_log_id(db: psycopg.AsyncConnection[Any]) -> int:
    [(last,)] = await gen.table(db, "SELECT coalesce(max(id), 0) FROM pgcoord.message_log")
    return int(last)


class Inbox:
    """What one subscription received, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def __call__(self, message: Any) -> None:
        self.queue.put_nowait(message)

    async def next(self) -> Any:
        try:
            return await asyncio.wait_for(self.queue.get(), BOUND)
        except TimeoutError:
            raise AssertionError(f"nothing delivered within {BOUND} s") from None


async def _publish(
    coord: pgcoord.Coordinator,
    txconn: psycopg.AsyncConnection[Any],
    mode: str,
    channel: Any,
    message: Any,
) -> tuple[bool, Any]:
    """Publish as ``mode`` says; a refusal inside a transaction must leave it usable and the
    transaction is committed anyway (so anything half-written would be delivered)."""
    sync = mode.startswith("sync")

    def send(**kwargs: Any) -> Any:
        if sync:
            return coord.sync_message_manager.publish(channel, message, only_self=True, **kwargs)
        return coord.pubsub_manager.publish(channel, message, **kwargs)

    if not mode.endswith("-txn"):
        return await outcome(send())
    async with txconn.transaction():
        result = await outcome(send(transaction=txconn))
        await txconn.execute(b"SELECT 1")  # raises if the refused publish aborted the transaction
    return result


async def check_publish(
    coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    mode: str,
    channel: Any,
    message: Any,
) -> None:
    """See the module docstring."""
    manager: Any = coord.sync_message_manager if mode.startswith("sync") else coord.pubsub_manager
    inbox = Inbox()
    subscribed, _ = await outcome(manager.subscribe(channel, inbox))
    try:
        last = await _last_log_id(db)
        done, error = await _publish(coord, txconn, mode, channel, message)
        gen.tally(f"publish {'accepted' if done else 'refused'}")
        if not subscribed:
            assert not done, f"publish accepted channel {channel!a}, which subscribe refuses"
        if not done:
            assert await _last_log_id(db) == last, f"a refused publish logged a row ({error})"
        if not subscribed:
            return
        if done:
            assert_same(await inbox.next(), message, "message")
        sentinel = {"sentinel": next(_sentinels)}
        await _publish(coord, txconn, mode, channel, sentinel)
        got = await inbox.next()
        assert got == sentinel, f"expected only the sentinel, got {got!a} (duplicate or refused)"
    finally:
        if subscribed:
            await manager.unsubscribe(channel, inbox)


@pytest.mark.parametrize("mode", MODES)
@gen.DB_SETTINGS
@given(channel=gen.names, message=messages)
async def test_publish_delivers_exactly_once_or_refuses_before_sending(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    mode: str,
    channel: Any,
    message: Any,
) -> None:
    await check_publish(module_coord, db, txconn, mode, channel, message)


def _examples() -> list[Any]:
    cases: list[tuple[str, Any, Any, str | None]] = [
        ("true-stays-a-bool", "c", True, None),
        ("nested-types", "c", {"a": [1, 1.0, -0.0, None]}, None),
        ("nul-and-surrogate-message", "c", "\x00\ud800\udfff", None),
        ("odd-dict-key", "c", {"\x00\udfff": [1]}, None),
        ("split-pair-message", "c", "\ud83d\ude00", None),
        ("nan-message", "c", math.nan, None),
        ("int-past-64-bits", "c", 2**64, None),
        ("not-json", "c", {1, 2}, None),
        ("spilled", "c", "\U0001f600" * 2100, None),
        ("spilled-with-nul", "c", "\x00" * 9000, None),
        ("nul-channel", "a\x00b", 1, None),
        ("surrogate-channel", "\udc80", 1, None),
        ("split-pair-channel", "\ud83d\ude00", 1, None),
        ("255-channel", "\U0001f600" * 255, 1, None),
        ("256-channel", "x" * 256, 1, None),
        ("case-channel", "ǅ", 1, None),
        ("empty-channel", "", 1, None),
        ("int-channel", 1, 1, None),
    ]
    params = []
    for name, channel, message, reason in cases:
        for mode in MODES:
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(mode, channel, message, id=f"{name}-{mode}", marks=marks))
    return params


@pytest.mark.parametrize(("mode", "channel", "message"), _examples())
async def test_publish_examples(
    module_coord: pgcoord.Coordinator,
    db: psycopg.AsyncConnection[Any],
    txconn: psycopg.AsyncConnection[Any],
    mode: str,
    channel: Any,
    message: Any,
) -> None:
    await check_publish(module_coord, db, txconn, mode, channel, message)


async def test_a_message_over_the_payload_limit_is_refused_before_sending(
    module_coord: pgcoord.Coordinator, db: psycopg.AsyncConnection[Any]
) -> None:
    inbox = Inbox()
    await module_coord.pubsub_manager.subscribe("big", inbox)
    last = await _last_log_id(db)
    with pytest.raises(pgcoord.PayloadTooLargeError):
        await module_coord.pubsub_manager.publish("big", "x" * (16 * 1024 * 1024 + 1))
    assert await _last_log_id(db) == last
    await module_coord.pubsub_manager.publish("big", "after")
    assert await inbox.next() == "after"
    await module_coord.pubsub_manager.unsubscribe("big", inbox)


# -- subscribe options -------------------------------------------------------------------------


@gen.DB_SETTINGS
@given(channel=gen.names, debounce=gen.numbers_or_junk, handler=st.sampled_from(["ok", None, 1]))
async def test_subscribe_options_refuse_or_keep_delivery_working(
    module_coord: pgcoord.Coordinator, channel: Any, debounce: Any, handler: Any
) -> None:
    """subscribe(channel, handler, debounce=...) refuses with a typed error, or subscribes; a
    short debounce then delivers, and whatever was accepted, delivery elsewhere keeps working
    (a debounce timer that cannot be set must not kill the delivery pipeline)."""
    pubsub = module_coord.pubsub_manager
    inbox = Inbox()
    callback: Any = inbox if handler == "ok" else handler
    done, _ = await outcome(pubsub.subscribe(channel, callback, debounce=debounce))
    probe = Inbox()
    await pubsub.subscribe("probe", probe)
    try:
        if done:
            await pubsub.publish(channel, "m")
            if float(debounce) <= 0.05:
                assert await inbox.next() == "m"
        await pubsub.publish("probe", "alive")
        assert await probe.next() == "alive", "delivery stopped after an accepted subscribe"
    finally:
        await pubsub.unsubscribe("probe", probe)
        if done:
            await pubsub.unsubscribe(channel, callback)
