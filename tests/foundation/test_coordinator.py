"""Coordinator lifecycle against a real server: start, stop, budgets, bad configuration."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

import pgcoord
from tests.support import CoordFactory, client_backend_rows, client_backends


async def test_context_manager_returns_the_started_coordinator(dsn: str) -> None:
    coord = pgcoord.Coordinator(dsn, app="lifecycle")
    async with coord as entered:
        assert entered is coord
        assert coord.running
        assert coord.listener.connected
    assert not coord.running


async def test_start_and_stop_are_idempotent(dsn: str) -> None:
    coord = pgcoord.Coordinator(dsn)
    await coord.start()
    await coord.start()
    await coord.stop()
    await coord.stop()
    assert not coord.running


async def test_idle_instance_holds_two_connections_and_stop_releases_all(dsn: str) -> None:
    before = {t for t in asyncio.all_tasks()}
    coord = pgcoord.Coordinator(dsn)
    await coord.start()
    try:
        assert client_backends(dsn) <= 2
    finally:
        await coord.stop()
    # Connections close asynchronously on the server side; give it a moment (CI once saw one
    # backend outlive 2.5 s; a leaked connection would stay for good).
    for _ in range(200):
        if client_backends(dsn) == 0:
            break
        await asyncio.sleep(0.05)
    left = client_backend_rows(dsn)
    assert left == [], left
    leftover = {t for t in asyncio.all_tasks() if not t.done()} - before
    assert leftover == set()


async def test_instance_ids_are_unique(make_coord: CoordFactory) -> None:
    first, second = await make_coord(), await make_coord()
    assert first.instance_id != second.instance_id
    assert isinstance(first.instance_id, str)


async def test_using_the_pool_after_stop_raises_not_running(dsn: str) -> None:
    coord = pgcoord.Coordinator(dsn)
    async with coord:
        pass
    with pytest.raises(pgcoord.NotRunningError):
        _ = coord.pool


@pytest.mark.parametrize("app", ["", "Main", "9lives", "x" * 33, "a-b"])
def test_bad_app_raises_value_error_at_construction(app: str) -> None:
    with pytest.raises(ValueError, match="app"):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", app=app)


def test_bad_schema_raises_value_error_at_construction() -> None:
    with pytest.raises(ValueError, match="schema"):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", schema="Public")


def test_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="unknown Coordinator option"):
        pgcoord.Coordinator("postgresql://127.0.0.1:1/none", no_such_option=1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_refused_connection_fails_fast_naming_the_host() -> None:
    port = _closed_port()
    coord = pgcoord.Coordinator(f"postgresql://root@127.0.0.1:{port}/test", connect_timeout=2)
    with pytest.raises(pgcoord.ConnectionFailedError, match=f"127.0.0.1:{port}"):
        await coord.start()
    assert not coord.running


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback TCP server that accepts connections and never answers (a hung server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


async def test_unresponsive_server_fails_within_the_connect_timeout() -> None:
    with silent_server() as port:
        coord = pgcoord.Coordinator(f"postgresql://root@127.0.0.1:{port}/test", connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(pgcoord.ConnectionFailedError, match=r"127\.0\.0\.1"):
            await coord.start()
        # The contract is "fails within its connect timeout", not a speed figure: allow slack.
        assert time.monotonic() - started < 2 + 8


async def test_outdated_schema_is_refused_naming_the_fix(empty_dsn: str) -> None:
    coord = pgcoord.Coordinator(empty_dsn)
    with pytest.raises(pgcoord.SchemaOutdatedError, match="pgcoord migrate"):
        await coord.start()
    assert not coord.running


async def test_migrate_true_creates_the_schema(empty_dsn: str) -> None:
    async with pgcoord.Coordinator(empty_dsn, migrate=True, schema="coord_x") as coord:
        assert coord.running
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute("SELECT version_num FROM coord_x.pgcoord_alembic_version").fetchone()
    assert row == (pgcoord.migrate.head_revision(),)


async def test_dsn_comes_from_the_environment(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCOORD_DSN", dsn)
    async with pgcoord.Coordinator() as coord:
        assert coord.dsn == dsn


async def test_a_shared_pool_is_used_and_left_open(dsn: str) -> None:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(dsn, min_size=1, max_size=4, kwargs={"autocommit": True}, open=False)
    await pool.open()
    try:
        async with pgcoord.Coordinator(dsn, pool=pool) as coord:
            assert coord.pool is pool
        async with pool.connection() as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    finally:
        await pool.close()


async def test_a_shared_non_autocommit_pool_still_commits_pgcoords_writes(dsn: str) -> None:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)  # autocommit off
    await pool.open()
    try:
        coord = pgcoord.Coordinator(dsn, pool=pool)
        async with coord, coord._rt.connection() as conn:
            await conn.execute("CREATE TABLE shared_pool_probe (x int)")
            await conn.execute("INSERT INTO shared_pool_probe VALUES (1)")
        async with pool.connection() as conn:
            assert not conn.autocommit  # handed back as it came
        with psycopg.connect(dsn) as check:
            assert check.execute("SELECT x FROM shared_pool_probe").fetchall() == [(1,)]
    finally:
        await pool.close()


async def test_a_server_older_than_supported_is_refused_clearly(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No PostgreSQL 14 here: raise the floor above the real server instead.
    monkeypatch.setattr(pgcoord.coordinator, "MIN_SERVER_VERSION", 10**7)
    coord = pgcoord.Coordinator(dsn)
    with pytest.raises(pgcoord.UnsupportedServerError, match="needs PostgreSQL >= 15"):
        await coord.start()
    assert not coord.running
    for _ in range(50):
        if client_backends(dsn) == 0:
            break
        await asyncio.sleep(0.05)
    assert client_backends(dsn) == 0
