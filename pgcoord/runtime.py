"""What every service gets from its Coordinator, and the base class services derive from.

Services are built when the Coordinator is constructed (so ``subscribe`` before ``start()``
works) and reach the pool and the listener through :class:`Runtime`, which raises
:class:`NotRunningError` while the Coordinator is not running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any, ClassVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgcoord import _driver, names
from pgcoord._kept import KeptConnections
from pgcoord.errors import NotRunningError
from pgcoord.listener import Listener


class Runtime:
    """Shared state of one Coordinator: names, options, and (while running) pool and listener."""

    def __init__(
        self,
        *,
        app: str,
        schema: str,
        instance_id: str,
        options: Mapping[str, Any],
        connect_timeout: float,
    ) -> None:
        self.app = app
        self.schema = schema
        self.instance_id = instance_id
        self.options = dict(options)
        self.connect_timeout = connect_timeout
        self.dsn: str | None = None
        self._pool: AsyncConnectionPool | None = None
        self._listener: Listener | None = None
        self.running = False
        self._kept = KeptConnections()
        self._switched: set[int] = set()  # ids of borrowed connections switched to autocommit

    @property
    def pool(self) -> AsyncConnectionPool:
        """The work pool (autocommit connections)."""
        if self._pool is None or not self.running:
            raise NotRunningError(
                "the pgcoord Coordinator is not running; use `async with coord:` or await coord.start()"
            )
        return self._pool

    @property
    def listener(self) -> Listener:
        """The process's LISTEN connection (exists from start until stop)."""
        if self._listener is None:
            raise NotRunningError(
                "the pgcoord Coordinator is not running; use `async with coord:` or await coord.start()"
            )
        return self._listener

    @property
    def work_capacity(self) -> int:
        """How many work connections pgcoord may hold at once (the pool's maximum)."""
        pool = self._pool
        return pool.max_size if pool is not None else 1

    def check_running(self) -> None:
        """Raise :class:`NotRunningError` unless the Coordinator is running."""
        if not self.running:
            raise NotRunningError(
                "the pgcoord Coordinator is not running (not started yet, or stopped)"
            )

    async def acquire(self) -> psycopg.AsyncConnection[Any]:
        """Borrow an autocommit connection (a kept warm one when there is); give it back with
        :meth:`release`. Prefer :meth:`connection`; this pair is for the hottest paths."""
        pool = self.pool
        conn = self._kept.take(pool)
        if conn is None:
            with _driver.translated(self.dsn):
                conn = await pool.getconn()
                if not conn.autocommit:
                    # A caller's shared pool may hand out non-autocommit connections; pgcoord's
                    # statements must commit on their own (else the pool would roll them back
                    # on return), so switch while pgcoord has it and restore on the way back.
                    try:
                        await conn.set_autocommit(True)
                    except BaseException:
                        await pool.putconn(conn)
                        raise
                    self._switched.add(id(conn))
        return conn

    async def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give back a connection from :meth:`acquire` (kept warm for a moment, or pooled)."""
        pool = self._pool
        if pool is None:
            # Returned after stop() let go of the pool: nobody can take it back, so close it.
            self._switched.discard(id(conn))
            await conn.close()
            return
        if conn.closed:
            self._switched.discard(id(conn))
            await pool.putconn(conn)
            return
        # A connection switched to autocommit is never kept: only _put_back restores it.
        if self.running and id(conn) not in self._switched and self._kept.keep(pool, conn):
            return
        await self._put_back(pool, conn)

    async def _put_back(
        self, pool: AsyncConnectionPool, conn: psycopg.AsyncConnection[Any]
    ) -> None:
        if id(conn) in self._switched:
            self._switched.discard(id(conn))
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    await conn.set_autocommit(False)
        await pool.putconn(conn)

    def connection(self) -> Borrowed:
        """``async with rt.connection() as conn``: borrow an autocommit connection (a kept
        warm one when there is); psycopg errors inside the block come out as pgcoord errors."""
        return Borrowed(self)

    async def close_kept(self) -> None:
        """Give kept connections back to the pool (the Coordinator calls it before closing it)."""
        await self._kept.close()

    def table(self, name: str) -> sql.Identifier:
        """A schema-qualified table identifier for SQL composed with ``psycopg.sql``."""
        return sql.Identifier(self.schema, name)

    def channel(self, service: str, name: str) -> str:
        """The Postgres channel carrying ``name`` for ``service`` in this app."""
        return names.pg_channel(self.schema, self.app, service, name)

    def advisory_key(self, service: str, name: str) -> int:
        """The 64-bit advisory lock key for ``name`` in ``service`` of this app."""
        return names.advisory_key(self.schema, self.app, service, name)


class Service:
    """Base of the managers: lifecycle hooks the Coordinator calls, and per-service options.

    ``OPTIONS`` maps each option a service accepts (as a ``Coordinator(**options)`` keyword) to
    its default; the Coordinator refuses unknown keywords.
    """

    OPTIONS: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def option(self, name: str) -> Any:
        """The configured value of one of this service's ``OPTIONS``."""
        return self._rt.options.get(name, self.OPTIONS[name])

    async def _start(self) -> None:
        """Called by ``Coordinator.start()`` once the pool and listener are up."""

    async def _stop(self) -> None:
        """Called by ``Coordinator.stop()`` before the pool and listener close."""

    async def _on_reconnect(self) -> None:
        """Called after the listener reconnected: notifications may have been missed."""


class Borrowed:
    """The context manager :meth:`Runtime.connection` returns.

    A plain class rather than ``@asynccontextmanager``: it sits on every service's hot path
    (each cache get, each publish), where a generator-based context manager nested with
    :func:`~pgcoord._driver.translated` cost a measurable share of the client CPU.
    """

    __slots__ = ("_conn", "_rt")

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self._conn = await self._rt.acquire()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        await self._rt.release(conn)
        if isinstance(exc, psycopg.Error | PoolTimeout):
            raise _driver.translate(exc, self._rt.dsn) from exc
