"""Cluster-wide per-key locks for ``wrap``: session advisory locks on ONE borrowed connection.

Why one dedicated connection and only try-locks: a leader holds its key's lock while ``fn`` runs,
possibly for seconds. Holding a pool connection per computing key would let many cold keys
exhaust the pool (and deadlock a ``fn`` that itself needs the pool). A session advisory lock
belongs to a connection, so every key this process computes is locked on the same connection;
because that connection is shared it only ever runs ``pg_try_advisory_lock``/``unlock``, never a
blocking wait. Waiters in other processes poll with backoff and are woken early by a NOTIFY when
the leader finishes.

The connection is borrowed from the work pool on first use (so it counts in the process's one
connection budget) and given back after ``IDLE_CLOSE`` seconds without a held lock, so an idle
instance keeps its two connections. With ``max_connections=2`` (one work connection) a leader's
``fn`` that itself uses the database waits for that connection until the pool's timeout: give
``wrap`` users a budget of 3 or more. If it breaks while a key is locked, the lock is
gone with it: another instance may then compute the same key concurrently (single flight is
best effort across connection loss, never a deadlock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from pgcoord import _driver
from pgcoord._deadline import Bounded
from pgcoord._retry import TaskSet
from pgcoord.cache.queries import Queries, build
from pgcoord.errors import PgcoordError
from pgcoord.runtime import Runtime

log = logging.getLogger("pgcoord.cache")

#: Seconds without any held lock after which the connection goes back to the pool.
IDLE_CLOSE = 1.0


class ClusterLocks:
    """Try-lock / unlock of 64-bit advisory keys on one lazily opened connection."""

    def __init__(self, runtime: Runtime, queries: Queries | None = None) -> None:
        self._rt = runtime
        # Default: the statements for the runtime's schema (built once per schema, shared).
        self._q = build(runtime.schema) if queries is None else queries
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._open_lock = asyncio.Lock()
        self._held: set[int] = set()
        # try_lock/unlock calls using the connection right now (not yet counted in _held): the
        # idle close must not pull the connection from under a statement in flight.
        self._busy = 0
        self._idle: asyncio.TimerHandle | None = None
        self._closing = TaskSet("cache wrap")

    async def _connection(self, deadline: float) -> psycopg.AsyncConnection[Any]:
        async with self._open_lock:
            if self._conn is None or self._conn.closed:
                self._rt.check_running()
                assert self._rt.dsn is not None
                if self._conn is not None:
                    await self._give_back(self._conn)
                self._held.clear()  # locks of a lost connection are gone with it
                left = deadline - asyncio.get_running_loop().time()
                self._conn = await self._rt.acquire(max(0.0, left))
            return self._conn

    async def try_lock(self, key: int) -> bool:
        """Take ``key`` if free; never waits for another holder."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._busy += 1
        try:
            deadline = self._rt.step_deadline()  # one bound for the connection and the try
            conn = await self._connection(deadline)
            try:
                async with Bounded(conn, deadline, "cache wrap: lock", self._rt.dsn):
                    cur = await conn.execute(self._q.wrap_try_lock, (key,))
                    row = await cur.fetchone()
            except (psycopg.Error, PgcoordError) as exc:
                await self._discard(conn)
                raise _driver.translate(exc, self._rt.dsn) from exc
            got = bool(row and row[0])
            if got:
                self._held.add(key)
        finally:
            self._busy -= 1
        if not got:
            self._schedule_idle_close()
        return got

    async def unlock(self, key: int) -> None:
        """Release ``key`` (a lost connection already released it)."""
        self._held.discard(key)
        conn = self._conn
        if conn is not None and not conn.closed:
            self._busy += 1
            try:
                async with self._bound(conn, "cache wrap: unlock"):
                    await conn.execute(self._q.wrap_unlock, (key,))
            except (psycopg.Error, PgcoordError) as exc:
                log.warning(
                    "pgcoord cache: wrap's lock connection to %s failed on unlock (%s); "
                    "closing it, which releases the lock",
                    _driver.describe_server(self._rt.dsn or ""),
                    exc,
                )
                await self._discard(conn)
            finally:
                self._busy -= 1
        self._schedule_idle_close()

    def _bound(self, conn: psycopg.AsyncConnection[Any], what: str) -> Bounded:
        deadline = self._rt.step_deadline()
        return Bounded(conn, deadline, what, self._rt.dsn)

    def _schedule_idle_close(self) -> None:
        if self._held or self._conn is None or self._idle is not None:
            return
        self._idle = asyncio.get_running_loop().call_later(IDLE_CLOSE, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle = None
        if not self._held and not self._busy and self._conn is not None:
            self._closing.spawn(self._discard(self._conn, only_if_idle=True))

    async def _discard(
        self, expected: psycopg.AsyncConnection[Any] | None = None, *, only_if_idle: bool = False
    ) -> None:
        """Close the connection; with ``expected``, only if it is still that one."""
        async with self._open_lock:
            # Re-checked here, not when scheduled: a try_lock may have started using the
            # connection (or replaced it) between the timer firing and this task running.
            if expected is not None and self._conn is not expected:
                return
            if only_if_idle and (self._held or self._busy):
                return
            conn, self._conn = self._conn, None
            held, self._held = self._held, set()
            if conn is not None:
                if held or not only_if_idle:
                    # Locks may still be held (a failed statement, or stop): closing the session
                    # is the one sure way to let go of them before the pool sees it again.
                    _driver.end_session(conn)
                await self._give_back(conn)

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(Exception):
            await self._rt.release(conn)

    async def close(self) -> None:
        """Close the connection (releasing every lock); at stop."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        await self._closing.wait()
        await self._discard()
