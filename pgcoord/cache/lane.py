"""Pool connections for the cache's one-statement operations, reusing the last one returned.

psycopg_pool hands its idle connections out first-in first-out, so one task issuing statements
back to back visits every pooled backend in turn; on a small machine that costs locality (each
statement wakes a different server process) — measured up to a third of a cache hit's time. The
lane keeps the most recently released connection (one) out of the pool and gives it to the next
operation, so a sequential caller keeps talking to one backend, as it would with its own
connection. A janitor gives it back to the pool once it went unused for ``HOLD`` seconds, so an
idle instance holds no extra connection, and ``close()`` gives it back at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

from pgcoord.runtime import Runtime

#: Seconds an unused kept connection stays out of the pool.
HOLD = 0.5


class ConnectionLane:
    """``acquire()``/``release()`` pool connections with a LIFO slot of one (see module doc)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._kept: psycopg.AsyncConnection[Any] | None = None
        self._used = False
        self._janitor: asyncio.Task[None] | None = None
        # The pool the connections came from (still usable in release() after a stop began).
        self._pool: AsyncConnectionPool | None = None

    async def acquire(self) -> psycopg.AsyncConnection[Any]:
        """A connection for one operation (raises NotRunningError when stopped)."""
        conn = self._kept
        if conn is not None and self._rt.running:
            self._kept = None
            self._used = True
            return conn
        pool = self._pool = self._rt.pool
        return await pool.getconn()

    async def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Keep ``conn`` for the next operation if the slot is free and ``conn`` is healthy."""
        if (
            self._kept is None
            and self._janitor is not None
            and self._rt.running
            and not conn.closed
            and conn.info.transaction_status == TransactionStatus.IDLE
        ):
            self._kept = conn
            self._used = True
            return
        # Broken, cancelled mid-statement or surplus: the pool checks and recycles it.
        assert self._pool is not None
        await self._pool.putconn(conn)

    def start(self) -> None:
        """Start the janitor (at the Coordinator's start)."""
        if self._janitor is None:
            self._janitor = asyncio.create_task(self._sweep(), name="pgcoord-cache-lane")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(HOLD)
            if self._used:
                self._used = False
            elif self._kept is not None:
                await self._give_back()

    async def _give_back(self) -> None:
        conn, self._kept = self._kept, None
        if conn is not None:
            assert self._pool is not None
            with contextlib.suppress(Exception):
                await self._pool.putconn(conn)

    async def close(self) -> None:
        """Stop the janitor and return the kept connection (before the pool closes)."""
        janitor, self._janitor = self._janitor, None
        if janitor is not None:
            janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await janitor
        await self._give_back()
