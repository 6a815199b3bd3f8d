"""Pub/sub and sync messages under hostile or careless use (issue 11).

Two apps sharing a schema and its message log, channel names Postgres cannot store, malformed
and forged notifications on every channel pgcoord listens on, and handlers slower than their
channel. Every test runs against a real server; forged notifications are sent with a plain
psycopg connection and ``pg_notify``, as any role with CONNECT could.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcoord
from pgcoord.names import pg_channel
from pgcoord.pubsub import envelope as wire_format
from tests.pubsub.helpers import WAIT, Inbox, settle, until
from tests.support import CoordFactory

LARGE = "x" * 20_000  # larger than a NOTIFY payload: travels through the log


def notify(dsn: str, channel: str, *payloads: str) -> None:
    """``pg_notify(channel, payload)`` for each payload, from a connection of no Coordinator."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def log_rows(dsn: str) -> list[str]:
    """Every envelope in the message log, oldest first."""
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT envelope FROM pgcoord.message_log ORDER BY id")]


def wire(coord: pgcoord.Coordinator, service: str, channel: str) -> str:
    """The Postgres channel ``coord`` uses for ``channel`` of ``service``."""
    return pg_channel(coord.schema, coord.app, service, channel)


# -- defect 2: one app's sweeper and another app's rows ---------------------------------------


async def test_one_apps_sweeper_keeps_another_apps_sync_messages_and_large_messages(
    make_coord: CoordFactory, dsn: str
) -> None:
    # Long-lived background sweepers; the test sweeps explicitly.
    fast = await make_coord(app="fast", sync_log_retention=1.0, pubsub_spill_retention=1.0)
    slow = await make_coord(app="slow")  # defaults: sync 120 s, spill 60 s
    await slow.sync_message_manager.publish("s", "slow sync")
    await slow.pubsub_manager.publish("p", "slow " + LARGE)
    await fast.sync_message_manager.publish("s", "fast sync")
    await fast.pubsub_manager.publish("p", "fast " + LARGE)
    assert len(log_rows(dsn)) == 4
    # Ten seconds old: far past "fast"'s retention, well within "slow"'s.
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE pgcoord.message_log SET created_at = now() - interval '10 seconds'")
    assert await fast.pubsub_manager.sweep() == 2
    # Only fast's own rows went: slow's were promised 120 s (sync) and 60 s (large message).
    left = log_rows(dsn)
    assert len(left) == 2
    assert any('"slow sync"' in e for e in left) and any('"slow x' in e for e in left)
    assert await slow.pubsub_manager.sweep() == 0  # not due yet by slow's own retention
    # Once past slow's retention, slow's sweeper deletes them.
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE pgcoord.message_log SET created_at = now() - interval '1 hour'")
    assert await fast.pubsub_manager.sweep() == 0
    assert await slow.pubsub_manager.sweep() == 2


# -- item 2: channel names ---------------------------------------------------------------------


async def test_a_channel_with_a_split_surrogate_pair_is_refused_before_anything_is_sent(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    split = "\ud83d\ude00"  # one character written as two UTF-16 code units
    joined = "😀"  # what the split pair would come back as
    watched = [
        wire(coord, service, name) for service in ("pubsub", "sync") for name in (split, joined)
    ]
    with psycopg.connect(dsn, autocommit=True) as spy:
        for channel in watched:
            spy.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        inbox = Inbox()
        with pytest.raises(pgcoord.InvalidInputError, match="surrogate pair"):
            await coord.pubsub_manager.subscribe(split, inbox)
        with pytest.raises(pgcoord.InvalidInputError, match="surrogate pair"):
            await coord.sync_message_manager.subscribe(split, inbox)
        with pytest.raises(pgcoord.InvalidInputError, match="surrogate pair"):
            await coord.pubsub_manager.publish(split, "lost")
        with pytest.raises(pgcoord.InvalidInputError, match="surrogate pair"):
            await coord.pubsub_manager.publish(split, LARGE)
        with pytest.raises(pgcoord.InvalidInputError, match="surrogate pair"):
            await coord.sync_message_manager.publish(split, "lost")
        async with await psycopg.AsyncConnection.connect(dsn) as txn:
            with pytest.raises(pgcoord.InvalidInputError, match="surrogate pair"):
                await coord.pubsub_manager.publish(split, "lost", transaction=txn)
            # Refused before the statement: the caller's transaction is still usable.
            await txn.execute("SELECT 1")
            await txn.commit()
        # Nothing was NOTIFYed, nothing logged.
        assert list(spy.notifies(timeout=0.5)) == []
    assert log_rows(dsn) == []
    await coord.pubsub_manager.subscribe(joined, inbox)
    await coord.pubsub_manager.publish(joined, "the character itself works")
    assert await inbox.wait_for(1) == ["the character itself works"]


@pytest.mark.parametrize("channel", ["nul\x00inside", "\x00", "lone \ud800 high", "\udfff"])
async def test_channels_with_nul_and_lone_surrogates_deliver(
    make_coord: CoordFactory, dsn: str, channel: str
) -> None:
    a, b = await make_coord(), await make_coord()
    pub, sync = Inbox(), Inbox()
    await b.pubsub_manager.subscribe(channel, pub)
    await b.sync_message_manager.subscribe(channel, sync)
    await a.pubsub_manager.publish(channel, "inline")
    await a.pubsub_manager.publish(channel, LARGE)
    await a.sync_message_manager.publish(channel, "sync")
    async with await psycopg.AsyncConnection.connect(dsn) as txn:
        await a.pubsub_manager.publish(channel, "in a transaction", transaction=txn)
        await a.sync_message_manager.publish(channel, "sync in a transaction", transaction=txn)
        await txn.commit()
    assert await pub.wait_for(3) == ["inline", LARGE, "in a transaction"]
    assert await sync.wait_for(2) == ["sync", "sync in a transaction"]
    # The name is not mistaken for a neighbour's (the pairs of channels share no name).
    other = Inbox()
    await b.pubsub_manager.subscribe(channel + "x", other)
    await settle()
    assert other.messages == []


# -- item 3: malformed notifications on every channel ------------------------------------------

_rng = random.Random(11)


def _random_text(size: int) -> str:
    # Any character Postgres text holds (no NUL, no surrogates), many of them multi-byte.
    alphabet = [chr(c) for c in range(1, 0xD7FF, 97)] + ["{", "}", '"', ":", "[", "]", "\\"]
    return "".join(_rng.choice(alphabet) for _ in range(size))


#: Payloads no pgcoord sends (none is a well-formed envelope of the channels under test).
MALFORMED = [
    "",
    "not json",
    _random_text(200),
    _random_text(2600),  # about 7,900 bytes of UTF-8: just under NOTIFY's limit
    "z" * 7999,  # the largest payload NOTIFY takes
    "[" * 7000,  # nesting the JSON decoders refuse (or recurse on)
    "[]",
    "null",
    "12abc",
    "-5",
    "99999999999999999999",  # wake-up xid past bigint
    "١٢٣",  # digits int() reads but no xid is written with
    '{"p":',  # truncated pointer
    '{"p":abc}',
    '{"p":-1}',
    '{"p":"1"}',
    '{"p":1.5}',
    '{"p":99999999999999999999999}',  # past bigint: must not reach the server
    '{"p":9223372036854775807}',  # a valid id naming no row
    '{"c":"c","s":"x","n":1',  # truncated envelope
    '{"v":99,"c":"c"}',  # a "newer version"
    '{"c":"c","s":"x","n":"1","f":0,"m":0}',  # wrong types
    '{"c":7,"s":"x","n":1,"f":0,"m":0}',
    '{"c":"c","s":"x","n":1,"f":0,"m":"' + "y" * 7900,  # huge and truncated
    '{"i":1,"o":[[1]]}',  # cache invalidations of the wrong shape
    '{"i":"x","o":"k"}',
    '{"i":"x","o":[[]]}',
    '{"i":"x","o":[["k"]]}',
    '{"i":"x"}',
]


#: Invalidations of a shape the cache ignores without a word (pgcoord/cache/manager.py).
CACHE_SILENT = ['{"i":"x","o":"k"}', '{"i":"x","o":[["k"]]}']


async def test_every_malformed_cache_invalidation_is_logged(
    coord: pgcoord.Coordinator, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgcoord")
    for payload in CACHE_SILENT:
        before = len(caplog.records)
        notify(dsn, wire(coord, "cache", "invalidate"), payload)
        await until(lambda before=before: len(caplog.records) > before, 5.0)


async def test_malformed_notifications_on_every_channel_are_logged_and_change_nothing(
    make_coord: CoordFactory, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgcoord")
    a, b = await make_coord(), await make_coord()
    pub, sync, queued = Inbox(), Inbox(), Inbox()
    await b.pubsub_manager.subscribe("c", pub)
    await b.sync_message_manager.subscribe("c", sync)

    async def process(message: Any, ctx: Any) -> None:
        queued(message)

    await b.event_queue.subscribe("jobs", process=process)
    near_a = a.cache_manager.create_cache("near", local_ttl=60.0)
    near_b = b.cache_manager.create_cache("near", local_ttl=60.0)
    await near_a.set("k", 1)
    assert await near_b.get("k") == 1  # now in b's near cache
    # b waits for a lock a holds: b LISTENs on the lock's channel meanwhile.
    held = await a.lock_manager.acquire("L", ttl=60.0)
    waiting = asyncio.create_task(b.lock_manager.acquire("L", ttl=60.0))
    try:
        lock_channel = wire(b, "locks", "L")
        await until(lambda: lock_channel in b._rt.listener.shared.channels)

        channels = {
            "pub/sub": wire(b, "pubsub", "c"),
            "sync": wire(b, "sync", "c"),
            "wake-up": wire(b, "wake", "transactions"),
            "cache": wire(b, "cache", "invalidate"),
            "locks": lock_channel,
            "queue": wire(b, "queue", "jobs"),
        }
        for name, channel in channels.items():
            assert channel in b._rt.listener.shared.channels, name
        # Each malformed payload on a channel whose receiver reads payloads is logged.
        for name in ("pub/sub", "sync", "wake-up", "cache"):
            for payload in MALFORMED:
                if name == "cache" and payload in CACHE_SILENT:
                    continue  # see test_every_malformed_cache_invalidation_is_logged
                before = len(caplog.records)
                notify(dsn, channels[name], payload)
                await until(lambda before=before: len(caplog.records) > before)
        for name in ("locks", "queue"):  # wake-ups only: the payload is never read
            notify(dsn, channels[name], *MALFORMED)

        # Everything still works.
        await a.pubsub_manager.publish("c", "after")
        await a.pubsub_manager.publish("c", LARGE)
        await a.sync_message_manager.publish("c", "sync after")
        async with await psycopg.AsyncConnection.connect(dsn) as txn:
            await a.pubsub_manager.publish("c", "in a transaction", transaction=txn)
            await txn.commit()
        assert await pub.wait_for(3) == ["after", LARGE, "in a transaction"]
        assert await sync.wait_for(1) == ["sync after"]
        await a.event_queue.publish("jobs", {"job": 1})
        assert await queued.wait_for(1) == [{"job": 1}]
        await near_a.set("k", 2)
        deadline = asyncio.get_running_loop().time() + WAIT
        while await near_b.get("k") != 2:
            assert asyncio.get_running_loop().time() < deadline, "b's near cache stayed stale"
            await asyncio.sleep(0.05)
        await held.release()
        lock = await asyncio.wait_for(waiting, WAIT)
        await lock.release()
    finally:
        # A failure above must not leave the waiter running past the test.
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    await settle()
    assert pub.messages == ["after", LARGE, "in a transaction"]
    assert sync.messages == ["sync after"]
    # Nothing raised out of a notification callback, and the listener never reconnected.
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failed == [], [r.getMessage()[:200] for r in failed]
    assert b._rt.listener.reconnects == 0


# -- item 4: bounded backlogs --------------------------------------------------------------------


async def test_a_slow_pubsub_handler_keeps_a_bounded_backlog_and_drops_the_oldest(
    make_coord: CoordFactory, caplog: pytest.LogCaptureFixture
) -> None:
    coord = await make_coord(pubsub_backlog=5)
    gate = asyncio.Event()
    got: list[Any] = []

    async def slow(message: Any) -> None:
        await gate.wait()
        got.append(message)

    await coord.pubsub_manager.subscribe("c", slow)
    total = 200
    for n in range(total):
        await coord.pubsub_manager.publish("c", n)
    # The handler holds the first; 5 wait; every other one was dropped, oldest first.
    await until(lambda: coord.pubsub_manager.dropped >= total - 6)
    gate.set()
    await until(lambda: len(got) + coord.pubsub_manager.dropped == total)
    await settle()
    assert len(got) + coord.pubsub_manager.dropped == total
    assert len(got) <= 6
    assert got == sorted(got) and got[-1] == total - 1  # the newest are kept, in order
    assert any("pubsub_backlog" in r.getMessage() for r in caplog.records)


async def test_a_slow_sync_handler_loses_nothing_beyond_its_backlog(
    make_coord: CoordFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sender, receiver = await make_coord(), await make_coord(pubsub_backlog=5)
    gate = asyncio.Event()
    got: list[Any] = []

    async def slow(message: Any) -> None:
        await gate.wait()
        got.append(message)

    await receiver.sync_message_manager.subscribe("s", slow)
    total = 60
    for n in range(total):
        await sender.sync_message_manager.publish("s", n)
    # The receiver stopped keeping them in memory...
    await until(lambda: any("behind" in r.getMessage() for r in caplog.records))
    gate.set()
    # ... and reads them back: every one, once, in order.
    await until(lambda: len(got) >= total)
    await settle()
    assert got == list(range(total))
    assert receiver.pubsub_manager.dropped == 0


# -- item 5: forged notifications ----------------------------------------------------------------


def _forged(channel: str, message: str) -> str:
    return '{"c":' + f'"{channel}"' + ',"s":"forger","n":1,"f":0,"m":"' + message + '"}'


async def test_under_pubsub_via_table_a_forged_notify_delivers_nothing(
    make_coord: CoordFactory, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pgcoord.pubsub")
    plain = await make_coord(app="plain")
    guarded = await make_coord(app="guarded", pubsub_via_table=True)
    at_plain, at_guarded, elsewhere = Inbox(), Inbox(), Inbox()
    await plain.pubsub_manager.subscribe("c", at_plain)
    await guarded.pubsub_manager.subscribe("c", at_guarded)
    await guarded.pubsub_manager.subscribe("other", elsewhere)
    # The threat: by default a forged envelope is a delivered message.
    notify(dsn, wire(plain, "pubsub", "c"), _forged("c", "forged"))
    assert await at_plain.wait_for(1) == ["forged"]

    notify(dsn, wire(guarded, "pubsub", "c"), _forged("c", "forged"))
    await guarded.pubsub_manager.publish("c", "real")
    await guarded.pubsub_manager.publish("c", LARGE)
    assert await at_guarded.wait_for(2) == ["real", LARGE]
    assert any("ignored a message carried by a NOTIFY" in r.getMessage() for r in caplog.records)
    # Pointers anyone may NOTIFY again: replaying a real row, or pointing one channel at
    # another channel's row, delivers nothing either.
    with psycopg.connect(dsn) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM pgcoord.message_log ORDER BY id")]
    assert len(ids) == 2  # both real messages travelled through the table
    notify(dsn, wire(guarded, "pubsub", "c"), *(f'{{"p":{i}}}' for i in ids))
    notify(dsn, wire(guarded, "pubsub", "other"), *(f'{{"p":{i}}}' for i in ids))
    await guarded.pubsub_manager.publish("c", "last")
    assert await at_guarded.wait_for(3) == ["real", LARGE, "last"]
    await settle()
    assert at_guarded.messages == ["real", LARGE, "last"]
    assert elsewhere.messages == []


async def test_a_forged_notify_never_delivers_a_sync_message(
    make_coord: CoordFactory, dsn: str
) -> None:
    a, b = await make_coord(), await make_coord()
    inbox, plugin_inbox = Inbox(), Inbox()
    await b.sync_message_manager.subscribe("s", inbox)

    class Recorder(pgcoord.Plugin):
        name = "recorder"

        async def handle_sync_message(self, message: Any) -> None:
            plugin_inbox(message)

    await b.add_plugin(Recorder())
    notify(dsn, wire(b, "sync", "s"), _forged("s", "forged"), _forged("s", "x" * 7000))
    notify(dsn, wire(b, "plugin", "recorder"), _forged("recorder", "forged"))
    async with await psycopg.AsyncConnection.connect(dsn) as txn:
        await a.sync_message_manager.publish("s", "in a transaction", transaction=txn)
        cur = await txn.execute("SELECT pg_current_xact_id()::text")
        row = await cur.fetchone()
        assert row is not None
        await txn.commit()
    await a.sync_message_manager.publish("s", "real")
    assert await inbox.wait_for(2) == ["in a transaction", "real"]
    # Replaying the transaction's wake-up and the rows' pointers delivers nothing again.
    notify(dsn, wire(b, "wake", "transactions"), row[0])
    with psycopg.connect(dsn) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM pgcoord.message_log ORDER BY id")]
    notify(dsn, wire(b, "sync", "s"), *(f'{{"p":{i}}}' for i in ids))
    await a.sync_message_manager.publish("s", "last")
    assert await inbox.wait_for(3) == ["in a transaction", "real", "last"]
    await settle()
    assert inbox.messages == ["in a transaction", "real", "last"]
    assert plugin_inbox.messages == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"pubsub_backlog": 0}, ValueError),
        ({"pubsub_backlog": True}, TypeError),
        ({"pubsub_backlog": 1.5}, TypeError),
        ({"pubsub_via_table": "yes"}, TypeError),
        ({"pubsub_via_table": 1}, TypeError),
    ],
)
def test_bad_backlog_and_via_table_options_are_refused_at_construction(
    dsn: str, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        pgcoord.Coordinator(dsn, **options)


def test_pointers_and_wake_ups_are_checked_before_any_query() -> None:
    assert wire_format.pointer_id('{"p":42}') == 42
    assert wire_format.pointer_id('{"c":"x"}') is None
    for bad in (
        '{"p":',
        '{"p":}',
        '{"p":-1}',
        '{"p":"1"}',
        '{"p":١٢}',
        '{"p":9223372036854775808}',
    ):
        with pytest.raises(ValueError):
            wire_format.pointer_id(bad)
    assert wire_format.wake_xid("9223372036854775807") == 2**63 - 1
    for bad in ("", "-5", " 5", "١٢٣", "9223372036854775808", "5" * 20, "0x10"):
        with pytest.raises(ValueError):
            wire_format.wake_xid(bad)
    with pytest.raises(ValueError, match="nests too deeply"):
        wire_format.parse("[" * 100_000)


# -- review of the hardening: read-back, long transactions, forged floods -----------------------


async def test_a_slow_sync_handler_loses_nothing_committed_while_it_reads_back(
    make_coord: CoordFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sender, receiver = await make_coord(), await make_coord(pubsub_backlog=5)
    gate = asyncio.Event()
    got: list[Any] = []

    async def slow(message: Any) -> None:
        await gate.wait()
        got.append(message)

    live = Inbox()  # a fast subscription on the same channel: it sees each live arrival
    await receiver.sync_message_manager.subscribe("s", slow)
    await receiver.sync_message_manager.subscribe("s", live)
    total = 20
    for n in range(total):
        await sender.sync_message_manager.publish("s", n)
    await live.wait_for(total)
    assert any("behind" in r.getMessage() for r in caplog.records)

    # Messages committed after a read-back's snapshot reach the subscription live while the
    # page is on its way: the read returns, then they are published and arrive, then the page
    # is handed back. Twice, on the last (not full) pages.
    engine = receiver.pubsub_manager._engine
    real_reread = engine.reread
    injected: list[int] = []

    async def reread_then_publish(sub: Any, after: int, limit: int) -> Any:
        page = await real_reread(sub, after, limit)
        if sub.handler is slow and page is not None and not page.full and len(injected) < 6:
            batch = [total + len(injected) + i for i in range(3)]
            injected.extend(batch)
            for n in batch:
                await sender.sync_message_manager.publish("s", n)
            await until(lambda: live.messages[-1:] == [batch[-1]])
        return page

    engine.reread = reread_then_publish  # type: ignore[method-assign]
    gate.set()
    expected = list(range(total + 6))
    await until(lambda: len(injected) == 6 and len(got) >= len(expected))
    await settle()
    assert got == expected
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lost == []


@pytest.mark.parametrize("service", ["pubsub", "sync"])
async def test_a_message_published_in_a_transaction_older_than_its_retention_is_delivered(
    make_coord: CoordFactory, dsn: str, service: str
) -> None:
    a, b = await make_coord(), await make_coord()

    def manager(coord: pgcoord.Coordinator) -> Any:
        return coord.pubsub_manager if service == "pubsub" else coord.sync_message_manager

    inbox = Inbox()
    await manager(b).subscribe("c", inbox)
    async with await psycopg.AsyncConnection.connect(dsn) as txn:
        await manager(a).publish("c", "long", transaction=txn)
        # created_at is now(), the transaction's start: this row is what a transaction that
        # began ten minutes ago (past either retention + 30 s) writes.
        await txn.execute(
            "UPDATE pgcoord.message_log SET created_at = created_at - interval '10 minutes'"
            " WHERE xid = pg_current_xact_id()::text::bigint"
        )
        await txn.commit()
    await manager(a).publish("c", "after")
    assert (await inbox.wait_for(1))[0] == "long"
    assert await inbox.wait_for(2) == ["long", "after"]
    await settle()
    assert inbox.messages == ["long", "after"]


async def test_a_forged_notify_flood_costs_bounded_tasks_reads_and_memory(
    make_coord: CoordFactory, dsn: str
) -> None:
    # Under pubsub_via_table every pub/sub message is a pointer too: all of b's channels read.
    a, b = await make_coord(pubsub_via_table=True), await make_coord(pubsub_via_table=True)
    sync_in, pub_in = Inbox(), Inbox()
    await b.sync_message_manager.subscribe("s", sync_in)
    await b.pubsub_manager.subscribe("p", pub_in)
    await a.sync_message_manager.publish("s", "before")
    assert await sync_in.wait_for(1) == ["before"]
    engine = b.pubsub_manager._engine
    reads = 0
    real_read_rows = engine._read_rows

    async def counted(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_read_rows(*args)

    engine._read_rows = counted  # type: ignore[method-assign]
    baseline = len(asyncio.all_tasks())
    most_tasks = most_pending = 0
    flooding = True

    async def sample() -> None:
        nonlocal most_tasks, most_pending
        while flooding:
            most_tasks = max(most_tasks, len(asyncio.all_tasks()) - baseline)
            most_pending = max(most_pending, getattr(engine, "pending", 0))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    flood = 100_000

    def forge() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_notify(%s, '{\"p\":' || g || '}') FROM generate_series(1, %s) g",
                (wire(b, "sync", "s"), flood),
            )
            conn.execute(
                "SELECT pg_notify(%s, g::text) FROM generate_series(1, %s) g",
                (wire(b, "wake", "transactions"), flood // 5),
            )

    try:
        await asyncio.to_thread(forge)
        # Published after the flood: delivered behind it, so their arrival means it was read.
        await a.sync_message_manager.publish("s", "during")
        await a.pubsub_manager.publish("p", "during")
        async with await psycopg.AsyncConnection.connect(dsn) as txn:
            await a.sync_message_manager.publish("s", "in a transaction", transaction=txn)
            await txn.commit()
        await sync_in.wait_for(3, timeout=60.0)
        await pub_in.wait_for(1, timeout=60.0)
    finally:
        flooding = False
        await sampler
    await settle()
    assert sync_in.messages == ["before", "during", "in a transaction"]
    assert pub_in.messages == ["during"]
    # One read per batch, at most two in flight, a bounded set of pending pointers.
    assert most_tasks <= 10, most_tasks
    assert reads <= 1_000, reads
    assert most_pending <= 20_000, most_pending


async def test_a_flood_past_the_pending_bound_loses_no_sync_message(
    make_coord: CoordFactory, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = await make_coord(pubsub_via_table=True)
    b = await make_coord(pubsub_via_table=True)
    sync_in = Inbox()
    await b.sync_message_manager.subscribe("s", sync_in)
    await a.sync_message_manager.publish("s", "before")
    assert await sync_in.wait_for(1) == ["before"]
    engine = b.pubsub_manager._engine
    # A bound of 100 pending notifications, and the log held locked while the flood arrives:
    # the reads in flight wait, so the flood surely overflows the bound (left to the machine's
    # speed, the reads sometimes kept up and nothing was dropped).
    engine.pending_max = 100

    def forge(channel: str, template: str, count: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_notify(%s, format(%s, g)) FROM generate_series(1, %s) g",
                (channel, template, count),
            )

    async def publish_during_the_flood() -> None:
        # Their pointers arrive among the flood's: they may well be let go past the bound,
        # and are then read back by commit_seq.
        for n in range(20):
            await a.sync_message_manager.publish("s", n)

    async with await psycopg.AsyncConnection.connect(dsn) as locker:
        await locker.execute("LOCK TABLE pgcoord.message_log IN ACCESS EXCLUSIVE MODE")
        await asyncio.gather(
            # Forged pointers name ids no real row gets here. (One naming the id of a message
            # committed during the flood delivers it early, out of commit order, and the
            # read-back after the highest commit_seq then skips an earlier message: a known
            # defect, noted on the faults issue, not what this test is about.)
            asyncio.to_thread(forge, wire(b, "sync", "s"), '{"p":900000000%s}', 50_000),
            asyncio.to_thread(forge, wire(b, "wake", "transactions"), "%s", 50_000),
        )
        # Released only once the wake-ups overflowed too: released after a fixed pause, a
        # slow listener had read only the pointers by then and kept up with the wake-ups.
        deadline = asyncio.get_running_loop().time() + 60.0
        while engine.dropped_notifications == 0:
            assert asyncio.get_running_loop().time() < deadline, "no wake-up was dropped"
            await asyncio.sleep(0.05)
        # Started only now, so their wait for the lock stays within the command timeout.
        publishing = asyncio.create_task(publish_during_the_flood())
        await asyncio.sleep(0.2)
        await locker.commit()
    await publishing
    await a.sync_message_manager.publish("s", "after")
    with contextlib.suppress(TimeoutError):  # the assertion below says what is missing
        await sync_in.wait_for(22, timeout=60.0)
    await settle()
    assert sync_in.messages == ["before", *range(20), "after"]
    # Wake-ups past the bound were dropped and counted (they may name pub/sub rows, which
    # are not read back: a pub/sub message can be lost in a flood, never a sync one).
    assert any("a flood, maybe forged" in r.getMessage() for r in caplog.records)
