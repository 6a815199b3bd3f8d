"""Recently returned work connections, kept out of their pool for a moment (last in, first out).

Borrowing from psycopg_pool and giving back costs about as much CPU as a small statement
(measured by the services: ~60 us against ~130 us for an INSERT), and the pool hands its idle
connections out first-in first-out, so a caller issuing statements back to back wakes a
different backend each time. Keeping the few most recently used connections on a stack fixes
both: a busy process reuses warm connections without touching the pool, and a connection that
sat on the stack unused for ``hold`` seconds goes back, so an idle instance holds nothing extra.
Aging each connection on its own matters: a burst leaves several on the stack, and steady light
traffic afterwards reuses only the top one; were they released only after the whole stack was
quiet, the burst's surplus would stay out of the pool as long as any traffic went on, and the pool
(which closes only connections that stay unused in it) could never shrink back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from pgcoord._driver import end_session, went_away
from pgcoord._retry import TaskSet

Conn = psycopg.AsyncConnection[Any]

#: How many connections a process keeps out of the pool at most.
KEEP = 4
#: Seconds of quiet after which kept connections go back to the pool.
HOLD = 1.0


class KeptConnections:
    """A LIFO stack of up to ``keep`` healthy, idle connections borrowed from one source.

    ``give_back(conn)`` returns a connection to where it came from; ``waiting()`` says whether
    someone is queued there for a connection.
    """

    def __init__(
        self,
        give_back: Callable[[Conn], Awaitable[None]],
        waiting: Callable[[], bool],
        *,
        keep: int = KEEP,
        hold: float = HOLD,
    ) -> None:
        self._give_back = give_back
        self._waiting = waiting
        self._keep = keep
        self._hold = hold
        # (connection, when it was kept): the bottom is the oldest, as pushes only go on top.
        self._stack: list[tuple[Conn, float]] = []
        self._reaper: asyncio.TimerHandle | None = None
        self._closing = TaskSet("kept connections")

    def take(self) -> Conn | None:
        """The most recently kept healthy connection, or None (then borrow)."""
        while self._stack:
            conn, _ = self._stack.pop()
            if not went_away(conn):
                return conn
            # Broken while kept: closed first, so that the source discards it.
            self._give_back_later(conn, close=True)
        return None

    def keep(self, conn: Conn) -> bool:
        """Keep ``conn`` for the next borrower when there is room and it is healthy and idle."""
        if (
            len(self._stack) >= self._keep
            or conn.pgconn.status != ConnStatus.OK
            or conn.info.transaction_status != TransactionStatus.IDLE
            # Someone is blocked at the source (its borrow found this stack empty): a kept
            # connection would sit idle while they starve, so the source gets it at once.
            or self._waiting()
        ):
            return False
        self._stack.append((conn, time.monotonic()))
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(self._hold, self._reap)
        return True

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        aged = 0
        while aged < len(self._stack) and now - self._stack[aged][1] >= self._hold:
            aged += 1
        stale, self._stack = self._stack[:aged], self._stack[aged:]
        for conn, _ in stale:
            self._give_back_later(conn)
        if self._stack:
            wait = self._hold - (now - self._stack[0][1])
            self._reaper = asyncio.get_running_loop().call_later(wait, self._reap)

    def _give_back_later(self, conn: Conn, *, close: bool = False) -> None:
        self._closing.spawn(self._put(conn, close=close))

    async def _put(self, conn: Conn, *, close: bool = False) -> None:
        # The source checks the connection and discards it if broken; a closed one closes it.
        with contextlib.suppress(Exception):
            if close:
                end_session(conn)
            await self._give_back(conn)

    async def close(self) -> None:
        """Give every kept connection back (before the source closes)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        stack, self._stack = self._stack, []
        for conn, _ in stack:
            await self._put(conn)
        await self._closing.wait()
