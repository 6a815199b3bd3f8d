"""LockManager edge cases: stop() racing an acquisition, and server settings that cut waits short."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

import pgcoord
from tests.support import CoordFactory

APP = "locktest"


class HoldingProxy:
    """A byte-for-byte proxy to the test server that can hold new connections unanswered.

    While ``hold`` is set, a client that connects gets no reply until :meth:`release` (its
    connection attempt stays under way), which puts an acquisition in the middle of opening its
    lock connection for as long as the test needs, without any timing.
    """

    def __init__(self, dsn: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self._host = str(params.get("host") or "127.0.0.1")
        self._port = int(params.get("port") or 5432)
        self._params = params
        self.hold = False
        self.held = asyncio.Event()  # set once a held connection arrived
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        #: One gate per connection accepted, in order: while a gate is clear, what the server
        #: sends on that connection is held back (the client sees no reply yet).
        self.replies: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return psycopg.conninfo.make_conninfo(
            psycopg.conninfo.make_conninfo(**self._params), host="127.0.0.1", port=port
        )

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        gate = asyncio.Event()
        gate.set()
        self.replies.append(gate)
        try:
            if self.hold:
                self.held.set()
                await self._released.wait()
            if self._host.startswith("/"):
                up_r, up_w = await asyncio.open_unix_connection(
                    f"{self._host}/.s.PGSQL.{self._port}"
                )
            else:
                up_r, up_w = await asyncio.open_connection(self._host, self._port)
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer, gate))
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None = None
    ) -> None:
        try:
            while data := await src.read(65536):
                if gate is not None:
                    await gate.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


async def test_stop_while_an_acquisition_waits_for_a_connection_leaves_nothing_behind(
    make_coord: CoordFactory, dsn: str
) -> None:
    a = await make_coord(app=APP, pool_size=1)
    busy = await a.pool.getconn()  # the process's only work connection is in use
    try:
        acquiring = asyncio.create_task(a.lock_manager.acquire("k", ttl=None))
        await asyncio.sleep(0.2)
        assert not acquiring.done()  # queued in-process for a connection, not failed
        await a.stop()
    finally:
        await a.pool.putconn(busy) if a.running else await busy.close()
    with pytest.raises(pgcoord.NotRunningError):
        await asyncio.wait_for(acquiring, 30)
    assert a.lock_manager.connection_stats()["held"] == 0
    b = await make_coord(app=APP)
    lock = await b.lock_manager.try_acquire("k")  # the key is free for everyone else
    await lock.release()


async def test_stop_while_a_granted_acquisition_is_returning_leaves_nothing_behind(
    make_coord: CoordFactory, dsn: str
) -> None:
    proxy = HoldingProxy(dsn)
    try:
        # One work connection, so the acquisition surely runs on the one behind gate 1 (the
        # listener connects first, through gate 0).
        a = await make_coord(app=APP, dsn=await proxy.start(), pool_size=1)
        # Twice: the session learns the token epoch, then prepares the hot statements
        # (pgcoord/_prepared.py), so the acquisition below is one statement, one reply.
        for _ in range(2):
            await a.lock_manager.run_exclusive("k", lambda: None)
        work_gate = proxy.replies[1]
        work_gate.clear()  # the server's replies on the work connection are held back
        acquiring = asyncio.create_task(a.lock_manager.acquire("k", ttl=None))
        # The server granted the lock; the reply saying so has not reached the client yet.
        await wait_until_granted(dsn)
        stopping = asyncio.create_task(a.stop())
        await asyncio.sleep(0.2)
        work_gate.set()  # the grant now arrives, after stop() began
        with pytest.raises(pgcoord.NotRunningError):
            await asyncio.wait_for(acquiring, 30)
        await asyncio.wait_for(stopping, 30)
        assert advisory_locks(dsn) == 0
        b = await make_coord(app=APP)
        lock = await b.lock_manager.try_acquire("k", timeout=10)
        await lock.release()
    finally:
        await proxy.close()


async def test_a_given_up_lock_session_ends_even_in_a_pool_whose_close_returns(
    make_coord: CoordFactory, dsn: str
) -> None:
    # psycopg_pool's close_returns=True makes conn.close() give the connection back to the
    # pool: a session pgcoord gives up while it may hold a lock must end for real instead,
    # or the caller's pool lends out a session that still holds the lock.
    proxy = HoldingProxy(dsn)
    via = await proxy.start()
    pool = AsyncConnectionPool(via, min_size=1, max_size=1, close_returns=True, open=False)
    await pool.open(wait=True)  # its one connection goes through gate 0
    try:
        a = await make_coord(app=APP, dsn=via, pool=pool)
        for _ in range(2):  # warm: the acquisition below is one statement, one reply
            await a.lock_manager.run_exclusive("k", lambda: None)
        work_gate = proxy.replies[0]
        work_gate.clear()
        acquiring = asyncio.create_task(a.lock_manager.acquire("k", ttl=None))
        await wait_until_granted(dsn)
        stopping = asyncio.create_task(a.stop())
        await asyncio.sleep(0.2)
        work_gate.set()  # the grant arrives after stop() began: pgcoord gives the session up
        with pytest.raises(pgcoord.NotRunningError):
            await asyncio.wait_for(acquiring, 30)
        await asyncio.wait_for(stopping, 30)
        assert advisory_locks(dsn) == 0
        async with pool.connection() as conn:  # and the pool lends a session holding nothing
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND pid = pg_backend_pid()"
            )
            assert await cur.fetchone() == (0,)
    finally:
        await pool.close()
        await proxy.close()


def advisory_locks(dsn: str) -> int:
    """Advisory locks held by any session of the test database right now."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def wait_until_granted(dsn: str) -> None:
    """Return once a session of the test database holds an advisory lock."""
    for _ in range(750):
        if await asyncio.to_thread(advisory_locks, dsn) > 0:
            return
        await asyncio.sleep(0.02)
    pytest.fail("the lock was never granted")


@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_acquire_waits_even_when_the_database_sets_a_timeout(
    make_coord: CoordFactory, dsn: str, setting: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET {} = '100ms'").format(
                sql.Identifier(conn.info.dbname), sql.Identifier(setting)
            )
        )
    a = await make_coord(app=APP)
    b = await make_coord(app=APP)
    held = await b.lock_manager.acquire("k")
    waiting = asyncio.create_task(a.lock_manager.acquire("k"))
    await asyncio.sleep(0.5)  # well past the database's 100 ms
    assert not waiting.done()
    await held.release()
    lock = await asyncio.wait_for(waiting, 15)
    assert not lock.lost
    # try_acquire with a timeout still gives up, with its own error.
    with pytest.raises(pgcoord.LockAcquireError):
        await b.lock_manager.try_acquire("k", timeout=0.3)
    await lock.release()
    again = await b.lock_manager.try_acquire("k", timeout=5)
    await again.release()
