"""Several instances in separate processes; listener connections killed; the server restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgcoord
from tests import support
from tests.pubsub.helpers import Inbox, settle, until
from tests.support import CoordFactory, PgServer, Proc


@pytest.fixture
def nodes(dsn: str) -> Iterator[list[Proc]]:
    """Three pgcoord instances, each in its own process, ready."""
    with support.processes() as procs:
        for _ in range(3):
            procs.append(support.spawn("tests.workers.pubsub_node", dsn=dsn))
        for proc in procs:
            proc.expect("ready", timeout=60)
        yield procs


def report(proc: Proc) -> dict[str, list[Any]]:
    proc.send({"cmd": "report"})
    result: dict[str, list[Any]] = proc.expect("report")["report"]
    return result


def listener_pid(proc: Proc) -> int | None:
    proc.send({"cmd": "pid"})
    pid: int | None = proc.expect("pid_now")["pid_now"]
    return pid


async def wait_reports(procs: list[Proc], key: str, count: int, timeout: float = 60.0) -> list[Any]:
    """Poll each process until it reports at least ``count`` messages under ``key``."""
    deadline = time.monotonic() + timeout
    reports = []
    for proc in procs:
        while True:
            got = await asyncio.to_thread(report, proc)
            if len(got[key]) >= count or time.monotonic() > deadline:
                reports.append(got[key])
                break
            await asyncio.sleep(0.2)
    return reports


@pytest.mark.slow
async def test_three_processes_committed_once_each_rolled_back_never(
    nodes: list[Proc], coord: pgcoord.Coordinator, dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await coord.pubsub_manager.publish("news", "rolled back", transaction=conn)
        await coord.sync_message_manager.publish("burst", "rolled back", transaction=conn)
        await conn.rollback()
        await coord.pubsub_manager.publish("news", "committed", transaction=conn)
        await coord.sync_message_manager.publish("burst", "committed", transaction=conn)
        await conn.commit()
    await coord.pubsub_manager.publish("news", "plain")
    # A sync message and a plugin message from one node reach the two others, not itself.
    nodes[0].send({"cmd": "publish", "kind": "sync", "message": "from node 0"})
    nodes[0].send({"cmd": "publish", "kind": "plugin", "message": "plugin from node 0"})
    nodes[0].expect("published")
    nodes[0].expect("published")
    await wait_reports(nodes[1:], "plugin", 1)
    await wait_reports(nodes, "news", 2)
    await settle(0.5)
    reports = [await asyncio.to_thread(report, proc) for proc in nodes]
    for index, got in enumerate(reports):
        assert got["news"] == ["committed", "plain"]
        if index == 0:
            assert got["burst"] == ["committed"]
            assert got["plugin"] == []
        else:
            assert got["burst"] == ["committed", "from node 0"]
            assert got["plugin"] == ["plugin from node 0"]


@pytest.mark.slow
async def test_listener_killed_during_a_burst_every_instance_gets_all_once_in_order(
    nodes: list[Proc], coord: pgcoord.Coordinator, dsn: str
) -> None:
    total = 500
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for n in range(total):
            if n in (120, 330):
                pids = [await asyncio.to_thread(listener_pid, p) for p in nodes]
                for pid in pids:
                    if pid is not None:
                        support.terminate_backend(dsn, pid)
            if n % 5 == 4:
                # Some through the caller's transaction (read from the log), some large.
                await coord.sync_message_manager.publish("burst", n, transaction=conn)
                await conn.commit()
            elif n % 50 == 7:
                await coord.sync_message_manager.publish("burst", [n, "x" * 9000])
            else:
                await coord.sync_message_manager.publish("burst", n)
    expected = [[n, "x" * 9000] if n % 50 == 7 and n % 5 != 4 else n for n in range(total)]
    for got in await wait_reports(nodes, "burst", total):
        assert len(got) == total  # none missing, none twice
        assert got == expected  # and in commit order
    for proc in nodes:
        proc.send({"cmd": "pid"})
        assert proc.expect("pid_now")["reconnects"] >= 2  # both kills were noticed
    # Plain pub/sub works again on the new connections.
    await coord.pubsub_manager.publish("news", "after the burst")
    for got in await wait_reports(nodes, "news", 1):
        assert got == ["after the burst"]


def set_connections_allowed(pg: PgServer, dsn: str, allowed: bool) -> None:
    """ALLOW_CONNECTIONS false keeps even a superuser's listener from reconnecting."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with pg.admin() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(str(dbname)), sql.SQL("true" if allowed else "false")
            )
        )


async def test_messages_committed_while_disconnected_are_caught_up_once_in_order(
    make_coord: CoordFactory, dsn: str, pg: PgServer
) -> None:
    sender, receiver = await make_coord(), await make_coord()
    await sender.sync_message_manager.publish("gap", "before subscribing")
    inbox = Inbox()
    await receiver.sync_message_manager.subscribe("gap", inbox)
    async with await psycopg.AsyncConnection.connect(dsn) as late:
        # This transaction takes a log id now but commits only during the gap, after rows with
        # higher ids: a reader remembering "the last id seen" would skip it.
        await sender.sync_message_manager.publish("gap", "late", transaction=late)
        await sender.sync_message_manager.publish("gap", "live")
        assert await inbox.wait_for(1) == ["live"]
        set_connections_allowed(pg, dsn, False)
        try:
            pid = receiver.listener.backend_pid
            assert pid is not None
            with pg.admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await until(lambda: not receiver.listener.connected)
            for n in range(3):
                await sender.sync_message_manager.publish("gap", f"gap {n}")
            await late.commit()
            await sender.sync_message_manager.publish("gap", "gap 3")
            await settle(0.5)
            assert inbox.messages == ["live"]  # really disconnected
        finally:
            set_connections_allowed(pg, dsn, True)
    await sender.sync_message_manager.publish("gap", "after")
    await inbox.wait_for(7)
    await settle(0.5)
    got = inbox.messages
    # Each once; "before subscribing" never (committed before this instance listened).
    assert sorted(got) == sorted(["live", "late", "gap 0", "gap 1", "gap 2", "gap 3", "after"])
    assert got[0] == "live"
    assert got[-1] == "after"
    # Messages a publisher sent one after another keep their order through the catch-up.
    assert [m for m in got if m.startswith("gap")] == ["gap 0", "gap 1", "gap 2", "gap 3"]
    assert receiver.listener.reconnects >= 1


@pytest.mark.restart
@pytest.mark.slow
async def test_after_a_server_restart_messages_of_the_reconnect_gap_are_caught_up(
    nodes: list[Proc], coord: pgcoord.Coordinator, pg: PgServer
) -> None:
    for n in range(20):
        await coord.sync_message_manager.publish("burst", n)
    await wait_reports(nodes, "burst", 20)
    await asyncio.to_thread(pg.restart)
    # Published at once: the instances' listeners are still reconnecting (backoff), so these
    # reach them only through the catch-up.
    for n in range(20, 60):
        await coord.sync_message_manager.publish("burst", n)
    for got in await wait_reports(nodes, "burst", 60):
        assert got == list(range(60))
    for proc in nodes:
        assert await asyncio.to_thread(listener_pid, proc) is not None


async def test_overlapping_transactions_committed_while_disconnected_are_caught_up_in_commit_order(
    make_coord: CoordFactory, dsn: str, pg: PgServer
) -> None:
    # Two publishers' transactions overlap: the first takes the lower log id but commits last.
    # Connected instances see them in commit order (NOTIFY order); so must the catch-up.
    sender, receiver = await make_coord(), await make_coord()
    inbox = Inbox()
    await receiver.sync_message_manager.subscribe("order", inbox)
    async with (
        await psycopg.AsyncConnection.connect(dsn) as t1,
        await psycopg.AsyncConnection.connect(dsn) as t2,
    ):
        set_connections_allowed(pg, dsn, False)
        try:
            pid = receiver.listener.backend_pid
            assert pid is not None
            with pg.admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await until(lambda: not receiver.listener.connected)
            await sender.sync_message_manager.publish("order", "inserted first", transaction=t1)
            await sender.sync_message_manager.publish("order", "committed first", transaction=t2)
            await t2.commit()
            await t1.commit()
            await settle(0.5)
            assert inbox.messages == []  # really disconnected: only the catch-up can bring them
        finally:
            set_connections_allowed(pg, dsn, True)
    await sender.sync_message_manager.publish("order", "after")
    await inbox.wait_for(3)
    await settle(0.5)
    assert inbox.messages == ["committed first", "inserted first", "after"]
    assert receiver.listener.reconnects >= 1
