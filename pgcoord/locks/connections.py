"""The dedicated connections that hold session-level locks (never the shared work pool).

A session-level advisory lock lives as long as the session that took it, so each held lock keeps
one connection to itself; so does each key this process waits for on the server. Those
connections come from here, not from the work pool, so held locks can never starve the other
services. The budget is ``lock_max_connections`` per process: when every connection is in use,
further acquirers queue here (FIFO, without polling) until one comes back. Idle connections are
kept for reuse and closed after ``lock_idle_timeout`` seconds, so an idle instance returns to the
two connections the design allows.

The connection of a held lock is *watched* while no statement runs on it: its socket is
registered with the event loop, and since pgcoord sends nothing on it, anything the server sends
is the session ending (``idle_session_timeout``, ``pg_terminate_backend``, a server shutdown).
That is how a holder learns at once that its lease is gone, without polling. Idle pooled
connections are not watched (that would cost two system calls per lock cycle): one that died
while idle fails at its next use, and the acquisition retries once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

from pgcoord import _driver
from pgcoord.errors import NotRunningError

log = logging.getLogger("pgcoord.locks")

# Only UNLOGGED bookkeeping is written on lock connections, so their commits need not wait for a
# WAL flush (the epoch bump forces a synchronous commit for itself). The app and instance are
# session settings, read by lock_acquire when it records a holder: fewer parameters per call.
# A lock_timeout or statement_timeout that the database or role sets would cut short an
# acquire() that promises to wait as long as it takes: both are off on lock sessions (a
# try_acquire with a timeout sets its own lock_timeout, transaction-local, inside lock_acquire).
_SETUP = (
    "SELECT set_config('synchronous_commit', 'off', false),"
    " set_config('lock_timeout', '0', false),"
    " set_config('statement_timeout', '0', false),"
    " set_config('application_name', %s, false),"
    " set_config('pgcoord.app', %s, false),"
    " set_config('pgcoord.instance_id', %s, false)"
)


class LockConnection:
    """One dedicated connection, with the event-loop watch on its socket."""

    __slots__ = ("_fd", "conn", "epoch", "idle_since", "registered")

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.idle_since = 0.0
        #: The (advisory key, lease ms) this session's ``lock_holders`` row currently says, or
        #: None when the row must be (re)written at the next acquisition.
        self.registered: tuple[int, int] | None = None
        #: The token epoch this session saw (None until its first acquisition). It stays valid
        #: for the session's life: only crash recovery resets the token sequence, and a crash
        #: ends every session.
        self.epoch: int | None = None
        self._fd: int | None = None

    @property
    def backend_pid(self) -> int:
        """The server process holding this session."""
        return self.conn.info.backend_pid

    def watch(self, on_broken: Callable[[], None]) -> None:
        """Call ``on_broken`` (once) when the server ends this session while it is idle.

        Must be undone with :meth:`unwatch` before running a statement: psycopg registers the same
        socket with the loop while it waits for results.
        """
        if self._fd is not None or self.conn.closed:
            return
        loop = asyncio.get_running_loop()
        pgconn = self.conn.pgconn
        fd = self._fd = pgconn.socket

        def readable() -> None:
            try:
                # Reads what arrived: a FATAL notice keeps the status OK; the EOF that follows
                # it (or a reset) makes it BAD.
                pgconn.consume_input()
                broken = pgconn.status != pq.ConnStatus.OK
            except psycopg.Error:
                broken = True
            if broken:
                self.unwatch()
                on_broken()

        loop.add_reader(fd, readable)

    def unwatch(self) -> None:
        """Stop watching the socket (before a statement, or before closing)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)

    @property
    def healthy(self) -> bool:
        """True while the connection is open and idle (fit to be reused)."""
        pgconn = self.conn.pgconn
        return (
            not self.conn.closed
            and pgconn.status == pq.ConnStatus.OK
            and pgconn.transaction_status == pq.TransactionStatus.IDLE
        )


class LockConnections:
    """A bounded set of dedicated lock connections (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        max_size: int,
        idle_timeout: float,
        connect_timeout: float,
        app: str,
        instance_id: str,
    ) -> None:
        self._dsn = dsn
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._app = app
        self._instance_id = instance_id
        self._idle: list[LockConnection] = []  # LIFO: the warmest connection is reused first
        self._size = 0  # open, opening, or handed to a waiter to open
        # A waiter's future gets a connection, or None meaning "a slot is yours: open one".
        self._waiters: collections.deque[asyncio.Future[LockConnection | None]] = (
            collections.deque()
        )
        self._reaper: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._opening: set[asyncio.Task[psycopg.AsyncConnection[Any]]] = set()
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open (or being opened) right now."""
        return self._size

    @property
    def idle(self) -> int:
        """Connections open and unused right now."""
        return len(self._idle)

    @property
    def max_size(self) -> int:
        """The budget: at most this many lock connections at once."""
        return self._max_size

    async def get(self, deadline: float | None) -> LockConnection | None:
        """A connection for one lock; None when none is free by ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            self._check_open()
            if self._idle:
                # Only healthy connections are put back; one that died idle since then fails
                # at its next statement, and the acquisition retries on a fresh connection.
                return self._idle.pop()
            if self._size < self._max_size:
                self._size += 1
                return await self._open_slot()
            if deadline is not None and deadline <= loop.time():
                return None
            waiter: asyncio.Future[LockConnection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if deadline is None:
                    got = await waiter
                else:
                    async with asyncio.timeout_at(deadline):
                        got = await waiter
            except TimeoutError:
                self._abandon(waiter)
                return None
            except BaseException:
                self._abandon(waiter)
                raise
            if got is None:
                return await self._open_slot()
            return got

    def _abandon(self, waiter: asyncio.Future[LockConnection | None]) -> None:
        # What was handed to a waiter that gave up goes to the next one.
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            got = waiter.result()
            if got is None:
                self._free_slot()
            else:
                self.put(got)
        else:
            waiter.cancel()

    async def _open_slot(self) -> LockConnection:
        # The connecting runs in a task of its own that close() can cancel: an acquisition
        # still connecting when the Coordinator stops must not come back with a fresh session
        # afterwards (and close() must not return while a connection is still being opened).
        try:
            self._check_open()
            opening = asyncio.get_running_loop().create_task(self._connect())
            self._opening.add(opening)
            opening.add_done_callback(self._opening.discard)
            try:
                conn = await opening
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is None or not current.cancelling():
                    # close() cancelled the connecting, not our caller: say why.
                    self._check_open()
                raise
        except BaseException:
            self._free_slot()
            raise
        lconn = LockConnection(conn)
        try:
            self._check_open()  # close() ran between the connect's end and this task resuming
        except NotRunningError:
            await self._close(lconn)
            self._free_slot()
            raise
        return lconn

    def _check_open(self) -> None:
        if self._closed:
            raise NotRunningError("the pgcoord Coordinator is stopping or stopped")

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await _driver.connect(self._dsn, connect_timeout=self._connect_timeout)
        try:
            with _driver.translated(self._dsn):
                await conn.execute(_SETUP, ("pgcoord-lock", self._app, self._instance_id))
            if self._closed:
                raise NotRunningError(
                    "the pgcoord Coordinator stopped while opening a lock connection"
                )
        except BaseException:
            await conn.close()
            raise
        return conn

    def put(self, lconn: LockConnection) -> None:
        """Give a connection back (no lock held, lease disarmed)."""
        if self._closed or not lconn.healthy:
            self.discard(lconn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(lconn)
                return
        loop = asyncio.get_running_loop()
        lconn.idle_since = loop.time()
        self._idle.append(lconn)
        if self._reaper is None:
            self._reaper = loop.call_later(self._idle_timeout, self._reap)

    def discard(self, lconn: LockConnection) -> None:
        """Close a connection (ending its session frees whatever it held) and free its slot."""
        lconn.unwatch()
        task = asyncio.get_running_loop().create_task(self._close(lconn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._free_slot()

    @staticmethod
    async def _close(lconn: LockConnection) -> None:
        try:
            await lconn.conn.close()
        except Exception:  # a broken connection may complain while closing; it is gone anyway
            log.debug("pgcoord: closing a lock connection failed", exc_info=True)

    def drop_idle(self) -> None:
        """Close every idle connection (after one turned out dead: a restart kills them all)."""
        idle, self._idle = self._idle, []
        for lconn in idle:
            self.discard(lconn)

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter, which opens a connection
                return
        self._size -= 1

    def _reap(self) -> None:
        self._reaper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._idle_timeout
        for lconn in [c for c in self._idle if c.idle_since <= cutoff]:
            self._idle.remove(lconn)
            self.discard(lconn)
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._reaper = loop.call_at(oldest + self._idle_timeout, self._reap)

    async def close(self) -> None:
        """Close the idle connections, refuse new requests, and wait for pending closes."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    NotRunningError("the pgcoord Coordinator stopped while waiting for a lock")
                )
        for opening in list(self._opening):
            opening.cancel()
        idle, self._idle = self._idle, []
        for lconn in idle:
            self.discard(lconn)
        # Closes that acquisitions woken by the above start meanwhile are waited for too.
        while self._opening or self._closing:
            await asyncio.gather(*self._opening, *self._closing, return_exceptions=True)
