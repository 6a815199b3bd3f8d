"""One listener and one work pool per event loop and server, shared by its Coordinators.

A process hosting many Coordinators (one per app, as NocoBase's multi-app manager does) must
not pay a listener and a pool for each: 50 of them idle on one server hold the shared listener
and one pooled connection. The first Coordinator to start opens what it needs, the last to
stop closes it (reference counts). Sharing is per event loop, because a psycopg connection
belongs to the loop it was made on: a :class:`~pgcoord.BlockingCoordinator` runs its own loop
in a thread, so it gets connections of its own. The server is identified by the DSN's
parameters (a URI and the same key=value string are one server; a different
``application_name`` is another).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import Counter

import psycopg.conninfo

from pgcoord import _driver
from pgcoord._sources import PoolSource
from pgcoord.listener import Listener

_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ServerLink]] = (
    weakref.WeakKeyDictionary()
)


def server_key(dsn: str) -> str:
    """One string per server and connection options, however the DSN spells them."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return dsn  # unparsable: connecting will say so
    return psycopg.conninfo.make_conninfo("", **dict(sorted(params.items())))


def link_for(dsn: str) -> ServerLink:
    """The shared connections of the running loop for the server ``dsn`` points at.

    Links stay registered once made (a handful per process: one per server and loop); a loop
    that is garbage-collected takes its links with it.
    """
    per_loop = _links.setdefault(asyncio.get_running_loop(), {})
    key = server_key(dsn)
    link = per_loop.get(key)
    if link is None:
        link = per_loop[key] = ServerLink(dsn)
    return link


#: What a failed pool open was doing: its first connection includes the session setup, which
#: a pooler such as PgBouncer queues until one of its server connections is free.
_OPEN_POOL_WHAT = (
    "start: opening the work pool (a pooler such as PgBouncer queues a new connection's "
    "first statement until one of its server connections is free: is its pool full?)"
)


class ServerLink:
    """The listener and pgcoord-owned pool of one loop on one server, reference-counted."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._lock = asyncio.Lock()
        self._listener: Listener | None = None
        self._listener_users = 0
        self._pool: PoolSource | None = None
        # The pool size each user asked for: the pool is as large as the largest request.
        self._pool_sizes: Counter[int] = Counter()

    async def open_listener(self, *, connect_timeout: float, heartbeat: float) -> Listener:
        """The shared Listener, connected and listening (the first caller's timeouts apply)."""
        async with self._lock:
            if self._listener is None:
                listener = Listener(self._dsn, connect_timeout=connect_timeout, heartbeat=heartbeat)
                try:
                    await listener.start()
                except BaseException:
                    await listener.stop()
                    raise
                self._listener = listener
            self._listener_users += 1
            return self._listener

    async def close_listener(self) -> None:
        """One user is done with the listener; the last one closes it."""
        async with self._lock:
            self._listener_users -= 1
            if self._listener_users == 0 and self._listener is not None:
                listener, self._listener = self._listener, None
                await listener.stop()

    async def open_pool(self, *, max_size: int, connect_timeout: float) -> PoolSource:
        """The shared work pool, grown to ``max_size`` if it is smaller (opened on first use)."""
        async with self._lock:
            if self._pool is None:
                pool = _driver.make_pool(
                    self._dsn, max_size=max_size, connect_timeout=connect_timeout, name="pgcoord"
                )
                try:
                    await pool.open(wait=True, timeout=connect_timeout)
                except Exception as exc:
                    await pool.close()
                    raise _driver.translate(exc, self._dsn, _OPEN_POOL_WHAT) from exc
                self._pool = PoolSource(pool, self._dsn, owned=True)
            self._pool_sizes[max_size] += 1
            await self._fit_pool()
            return self._pool

    async def close_pool(self, *, max_size: int) -> None:
        """One user (who asked for ``max_size``) is done with the pool; the last one closes it."""
        async with self._lock:
            self._pool_sizes[max_size] -= 1
            if self._pool_sizes[max_size] <= 0:
                del self._pool_sizes[max_size]
            if not self._pool_sizes and self._pool is not None:
                source, self._pool = self._pool, None
                await source.close()
            else:
                await self._fit_pool()

    async def _fit_pool(self) -> None:
        if self._pool is None or not self._pool_sizes:
            return
        wanted = max(self._pool_sizes)
        if self._pool.pool.max_size != wanted:
            await self._pool.pool.resize(min_size=1, max_size=wanted)
