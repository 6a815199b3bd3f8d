"""The shared LISTEN connection: delivery, recovery after a lost connection or server restart."""

from __future__ import annotations

import asyncio
import functools
import time

import psycopg
import pytest

import pgcoord
from tests.support import CoordFactory, PgServer, terminate_backend, wait_until

wait_for = functools.partial(wait_until, timeout=10.0)


async def notify(dsn: str, channel: str, payload: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def test_notifications_reach_every_callback_of_a_channel(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    first: list[str] = []
    second: list[str] = []
    await coord.listener.listen("pgcoord_test_a", lambda ch, p: first.append(p))
    await coord.listener.listen("pgcoord_test_a", lambda ch, p: second.append(p))
    await notify(dsn, "pgcoord_test_a", "hello")
    await wait_for(lambda: first and second)
    assert first == second == ["hello"]


async def test_a_channel_can_be_added_while_running_and_removed(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    got: list[str] = []

    def callback(channel: str, payload: str) -> None:
        got.append(payload)

    await coord.listener.listen("pgcoord_test_b", callback)
    # listen() returns once LISTEN is active: a message sent right away is not missed.
    await notify(dsn, "pgcoord_test_b", "one")
    await wait_for(lambda: got == ["one"])
    await coord.listener.unlisten("pgcoord_test_b", callback)
    await notify(dsn, "pgcoord_test_b", "two")
    await coord.listener.listen("pgcoord_test_marker", lambda ch, p: got.append("marker"))
    await notify(dsn, "pgcoord_test_marker", "")
    await wait_for(lambda: "marker" in got)
    assert got == ["one", "marker"]


async def test_channels_registered_before_start_are_listened(dsn: str) -> None:
    listener = pgcoord.listener.Listener(dsn)
    got: list[str] = []
    await listener.listen("pgcoord_test_pre", lambda ch, p: got.append(p))
    await listener.start()
    try:
        await notify(dsn, "pgcoord_test_pre", "early")
        await wait_for(lambda: got == ["early"])
    finally:
        await listener.stop()
    assert not listener.connected


async def test_a_failing_callback_does_not_stop_the_listener(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    got: list[str] = []

    def broken(channel: str, payload: str) -> None:
        raise RuntimeError("handler bug")

    await coord.listener.listen("pgcoord_test_c", broken)
    await coord.listener.listen("pgcoord_test_c", lambda ch, p: got.append(p))
    await notify(dsn, "pgcoord_test_c", "1")
    await notify(dsn, "pgcoord_test_c", "2")
    await wait_for(lambda: got == ["1", "2"])


async def _relisten_after_loss(coord: pgcoord.Coordinator, dsn: str, channel: str) -> float:
    """Send notifications until one arrives; return seconds from the loss to re-LISTEN."""
    got: list[str] = []
    await coord.listener.listen(channel, lambda ch, p: got.append(p))
    started = time.monotonic()
    deadline = started + 30
    while not got:
        assert time.monotonic() < deadline, "listener never came back"
        await notify(dsn, channel, "ping")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_terminated_listener_backend_relistens_within_two_seconds(
    make_coord: CoordFactory, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    coord = await make_coord()
    hooks: list[float] = []

    async def hook() -> None:
        hooks.append(time.monotonic())

    coord.listener.add_reconnect_hook(hook)
    pid = coord.listener.backend_pid
    assert pid is not None
    await coord.listener.listen("pgcoord_test_d", lambda ch, p: None)
    assert terminate_backend(dsn, pid)
    elapsed = await _relisten_after_loss(coord, dsn, "pgcoord_test_d")
    assert elapsed < 2.0  # the bound for recovery, not a speed benchmark
    assert coord.listener.backend_pid != pid
    assert coord.listener.reconnects == 1
    await wait_for(lambda: hooks)
    # The loss is logged, never silent.
    lost = [
        r.getMessage() for r in caplog.records if "listener lost its connection" in r.getMessage()
    ]
    # The warning names the server and the cause (the terminated backend's goodbye).
    assert any("127.0.0.1" in m or "socket" in m for m in lost) and all("()" not in m for m in lost)


@pytest.mark.restart
@pytest.mark.slow
async def test_listener_recovers_after_a_server_restart(
    make_coord: CoordFactory, dsn: str, pg: PgServer
) -> None:
    coord = await make_coord()
    await coord.listener.listen("pgcoord_test_e", lambda ch, p: None)
    await asyncio.to_thread(pg.restart)
    await _relisten_after_loss(coord, dsn, "pgcoord_test_e")
    assert coord.listener.reconnects >= 1
    # The work pool recovers too: broken connections are replaced.
    for _ in range(50):
        try:
            async with coord.pool.connection() as conn:
                await conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            await asyncio.sleep(0.1)
    async with coord.pool.connection() as conn:
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)


async def test_concurrent_listens_are_all_active_when_they_return(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    got: list[str] = []
    channels = [f"pgcoord_test_many_{n}" for n in range(8)]
    await asyncio.gather(
        *(coord.listener.listen(c, lambda ch, p: got.append(ch)) for c in channels)
    )
    # Every listen() has returned: a message sent now on any of them must arrive.
    for channel in channels:
        await notify(dsn, channel, "x")
    await wait_for(lambda: len(got) == len(channels))
    assert sorted(got) == sorted(channels)


async def test_identity_names_the_listen_session_and_changes_when_it_is_replaced(
    coord: pgcoord.Coordinator, dsn: str
) -> None:
    listener = coord.listener
    identity = listener.identity
    assert identity is not None
    pid, started = identity
    assert pid == listener.backend_pid
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT backend_start FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    assert row == (started,)
    generation = listener.generation
    seen_at_loss: list[object] = []
    listener.add_lost_hook(lambda: seen_at_loss.append(listener.identity))
    assert terminate_backend(dsn, pid)
    await wait_for(lambda: listener.generation == generation + 1 and listener.connected)
    # The hook ran once, when the session was found gone and before the new one existed.
    assert seen_at_loss == [None]
    new = listener.identity
    assert new is not None and new != identity


async def test_a_removed_lost_hook_is_not_called(coord: pgcoord.Coordinator, dsn: str) -> None:
    calls: list[int] = []

    def hook() -> None:
        calls.append(1)

    coord.listener.add_lost_hook(hook)
    coord.listener.remove_lost_hook(hook)
    generation = coord.listener.generation
    pid = coord.listener.backend_pid
    assert pid is not None and terminate_backend(dsn, pid)
    await wait_for(lambda: coord.listener.generation > generation)
    assert calls == []


async def test_database_defaults_that_would_end_the_listen_session_are_overridden(
    dsn: str,
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for setting in ("idle_session_timeout", "idle_in_transaction_session_timeout"):
            conn.execute(
                psycopg.sql.SQL("ALTER DATABASE {} SET {} = '500ms'").format(
                    psycopg.sql.Identifier(dbname), psycopg.sql.Identifier(setting)
                )
            )
    listener = pgcoord.listener.Listener(dsn, heartbeat=30.0)
    await listener.start()
    try:
        await asyncio.sleep(1.5)  # three times the idle timeout the database asks for
        assert listener.connected
        assert listener.generation == 1 and listener.reconnects == 0
    finally:
        await listener.stop()
