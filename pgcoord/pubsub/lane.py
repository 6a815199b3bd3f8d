"""A publisher's fast lane: one pool connection kept between back-to-back publishes.

Borrowing from ``psycopg_pool`` and giving back costs tens of microseconds per operation, a
sizeable share of a NOTIFY round trip (~110 µs). A sequential publisher therefore keeps the
connection it borrowed for as long as it keeps publishing, and gives it back to the pool once it
has been idle for ``idle`` seconds, so an idle instance still holds no more than the pool's one
connection. Concurrent publishes that find the lane busy simply use the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

from pgcoord import _driver
from pgcoord.runtime import Runtime


class Lane:
    """See the module docstring."""

    def __init__(self, rt: Runtime, idle: float = 0.5) -> None:
        self._rt = rt
        self._idle = idle
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._busy = False
        self._last_used = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._releases: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection for one statement; errors come out as pgcoord errors."""
        if self._busy:
            async with self._rt.connection() as conn:
                yield conn
            return
        self._busy = True
        try:
            if self._conn is None:
                self._conn = await self._rt.pool.getconn()
            yield self._conn
        except (psycopg.Error, PoolTimeout) as exc:
            # The connection may be broken (server restart): let the pool judge and replace it.
            self._give_back()
            raise _driver.translate(exc, self._rt.dsn) from exc
        except BaseException:
            self._give_back()
            raise
        finally:
            self._busy = False
            loop = asyncio.get_running_loop()
            self._last_used = loop.time()
            if self._conn is not None and self._timer is None:
                self._timer = loop.call_later(self._idle, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        if self._conn is None:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_used
        if self._busy or quiet < self._idle:
            wait = self._idle if self._busy else self._idle - quiet
            self._timer = loop.call_later(wait, self._check_idle)
            return
        self._give_back()

    def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        task = asyncio.get_running_loop().create_task(self._putconn(conn))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _putconn(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await self._rt.pool.putconn(conn)
        except Exception:
            # The pool is gone (stopped while a publish was in flight): do not leak the socket.
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        """Give the connection back now (before the pool closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._busy:
            self._give_back()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
