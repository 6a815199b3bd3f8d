"""The Coordinator: one per application instance; owns the pool, the listener and the services."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
import warnings
from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgcoord import _deadline, _driver, _pooler, _shared
from pgcoord import _statements as statements
from pgcoord import migrate as migrations
from pgcoord._sources import (
    EngineSource,
    PoolSource,
    SyncEngineSource,
    WorkSource,
    engine_dsn,
    pool_dsn,
)
from pgcoord.cache import Cache, CacheManager
from pgcoord.dsn import DSN_ENV, resolve_dsn
from pgcoord.errors import (
    InvalidInputError,
    InvalidTypeError,
    NotRunningError,
    UnsupportedServerError,
)
from pgcoord.listener import ListenerView
from pgcoord.locks import LockManager
from pgcoord.pubsub import PubSubManager
from pgcoord.pubsub.engine import Engine as MessageEngine
from pgcoord.queue import EventQueue
from pgcoord.runtime import Runtime, Service
from pgcoord.sync_messages import Plugin, SyncMessageManager
from pgcoord.validation import check_identifier, check_int, check_positive, check_schema

log = logging.getLogger("pgcoord")

#: The oldest server pgcoord runs on (PostgreSQL 15).
MIN_SERVER_VERSION = 150000
#: Default bound on the server connections one process's pgcoord opens on one server.
DEFAULT_MAX_CONNECTIONS = 4
#: The smallest budget that works: the listener and one work connection.
MIN_CONNECTIONS = 2

_SERVICE_CLASSES: tuple[type[Service], ...] = (
    LockManager,
    CacheManager,
    PubSubManager,
    SyncMessageManager,
    EventQueue,
)


def new_instance_id() -> str:
    """A readable id unique to one Coordinator: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:10]}"


class Coordinator:
    """Gives one application instance the cluster services, through PostgreSQL.

    ``dsn``: a libpq connection string or URI; None falls back to ``$PGCOORD_DSN``, then to the
    embedded server. ``app`` namespaces everything (two apps on one database never meet);
    ``schema`` is where pgcoord's tables live. ``migrate=True`` upgrades the schema at start
    (exactly once when many instances start together); otherwise an outdated schema is refused
    with :class:`~pgcoord.errors.SchemaOutdatedError`.

    ``max_connections`` (default 4, at least 2) bounds the server connections pgcoord opens in
    this process on this server: the listener plus a work pool of ``max_connections - 1``.
    Every Coordinator of one event loop on one server shares that listener and that pool
    (the pool is as large as the largest budget among them), so 50 apps in one process hold
    two connections when idle. ``pool_size`` is the deprecated spelling of the pool's part
    (``max_connections = pool_size + 1``).

    ``pool`` shares a caller's ``AsyncConnectionPool``, ``engine`` borrows from a SQLAlchemy
    ``AsyncEngine`` or ``Engine`` (driver ``postgresql+psycopg``; at most ``max_connections - 1`` of its
    connections at once); either way pgcoord adds only the shared listener, whose DSN is
    ``dsn`` or else what the pool (its ``conninfo`` and ``kwargs``) or the engine (its URL)
    connects with, never ``$PGCOORD_DSN``. Given both, ``start()`` refuses a ``dsn`` that
    reaches another database than the pool's or engine's connections (InvalidInputError:
    NOTIFY is per database). Both are left open at stop. ``connect_timeout`` bounds
    every connection attempt (a server refusing for lack of slots is retried within it),
    ``heartbeat`` is how often a quiet listener proves its connection (the first Coordinator
    of a shared listener sets both for it). ``command_timeout`` (default 10 s) bounds each
    database step of a call that has no ``timeout=`` of its own, the wait for a connection
    included: past it the statement's connection is closed and
    :class:`~pgcoord.errors.CommandTimeoutError` raised (see docs/operations.md, "Bounded
    calls"). Service options (``**options``) are listed by
    ``Coordinator.option_defaults()``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        app: str = "main",
        schema: str = "pgcoord",
        migrate: bool = False,
        pool: AsyncConnectionPool | None = None,
        engine: Any = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_size: int | None = None,
        connect_timeout: float = _driver.DEFAULT_CONNECT_TIMEOUT,
        heartbeat: float = 5.0,
        command_timeout: float = _deadline.DEFAULT_COMMAND_TIMEOUT,
        **options: Any,
    ) -> None:
        if dsn is not None and not isinstance(dsn, str):
            raise InvalidTypeError(f"dsn must be a str or None, not {type(dsn).__name__}")
        check_identifier(app, "app")
        check_schema(schema)
        if pool is not None and not isinstance(pool, AsyncConnectionPool):
            raise InvalidTypeError("pool must be a psycopg_pool.AsyncConnectionPool")
        if pool is not None and engine is not None:
            raise InvalidInputError(
                "give pool= or engine=, not both: pgcoord borrows its work connections from one"
            )
        self._engine_dsn = engine_dsn(engine) if engine is not None else None
        # The listener, lock sessions and migrations must reach the database the caller's pool
        # reaches, or notifications sent from one are never heard on the other.
        self._pool_dsn = pool_dsn(pool) if pool is not None else None
        if pool is not None and not dsn and self._pool_dsn is None:
            raise InvalidInputError(
                "pool= computes its conninfo or kwargs per connection (a callable), so pgcoord "
                "cannot tell which database it reaches: give dsn= too, naming that database "
                "(pgcoord's listener and lock sessions connect with it)"
            )
        check_int(max_connections, "max_connections")
        if pool_size is not None:
            warnings.warn(
                "Coordinator(pool_size=N) is deprecated; use max_connections=N + 1 "
                "(the listener plus the pool)",
                DeprecationWarning,
                stacklevel=2,
            )
            max_connections = check_int(pool_size, "pool_size", minimum=1) + 1
        if max_connections < MIN_CONNECTIONS:
            raise InvalidInputError(
                f"max_connections must be at least {MIN_CONNECTIONS} (the listener and one "
                f"work connection); got {max_connections!r}"
            )
        check_positive(connect_timeout, "connect_timeout", finite=True)
        check_positive(heartbeat, "heartbeat")
        check_positive(command_timeout, "command_timeout")
        defaults = self.option_defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise InvalidTypeError(
                f"unknown Coordinator option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}"
            )
        self._dsn = dsn
        self._migrate = bool(migrate)
        self._external_pool = pool
        self._engine = engine
        self._max_connections = max_connections
        self._heartbeat = heartbeat
        self._started = False
        self._start_lock = asyncio.Lock()
        # What this start() took from the process's shared connections (undone at stop).
        self._link: _shared.ServerLink | None = None
        self._holds_listener = False
        self._holds_pool = False
        self._source_open = False
        # Whether this start() got as far as starting services (only then are they stopped).
        self._services_started = False
        self._rt = Runtime(
            app=app,
            schema=schema,
            instance_id=new_instance_id(),
            options=options,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
        )
        self.lock_manager = LockManager(self._rt)
        self.cache_manager = CacheManager(self._rt)
        # One engine carries pub/sub and sync messages (durable pub/sub), built once from the
        # options of both (the spill and the sync-log retention) and shared by the two managers.
        messages = MessageEngine.from_options(
            self._rt, {**PubSubManager.OPTIONS, **SyncMessageManager.OPTIONS}
        )
        self.pubsub_manager = PubSubManager(self._rt, messages)
        self.sync_message_manager = SyncMessageManager(self._rt, messages)
        self.event_queue = EventQueue(self._rt)
        self._services: list[Service] = [
            self.lock_manager,
            self.cache_manager,
            self.pubsub_manager,
            self.sync_message_manager,
            self.event_queue,
        ]

    @staticmethod
    def option_defaults() -> dict[str, Any]:
        """Every service option ``Coordinator(**options)`` accepts, with its default."""
        merged: dict[str, Any] = {}
        for cls in _SERVICE_CLASSES:
            merged.update(cls.OPTIONS)
        return merged

    # -- identity --------------------------------------------------------------------------

    @property
    def app(self) -> str:
        """The application namespace."""
        return self._rt.app

    @property
    def schema(self) -> str:
        """The schema holding pgcoord's tables."""
        return self._rt.schema

    @property
    def instance_id(self) -> str:
        """This instance's unique id."""
        return self._rt.instance_id

    @property
    def dsn(self) -> str | None:
        """The DSN in use (known once started; the embedded server's when none was given)."""
        return self._rt.dsn

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._rt.running

    @property
    def max_connections(self) -> int:
        """The bound on the server connections pgcoord opens in this process on this server."""
        return self._max_connections

    @property
    def listener(self) -> ListenerView:
        """This Coordinator's view of the process's shared LISTEN connection (diagnostics)."""
        return self._rt.listener

    @property
    def cache(self) -> Cache:
        """The default cache, named after ``app``."""
        return self.cache_manager.default_cache

    @property
    def pool(self) -> AsyncConnectionPool:
        """The psycopg work pool, shared by this process's Coordinators on this server (or
        ``pool=``); raises :class:`NotRunningError` when not running, InvalidTypeError with
        ``engine=``."""
        return self._rt.pool

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check (or migrate) the schema, start listening, then start the services."""
        async with self._start_lock:
            if self._started:
                return
            try:
                await self._start()
            except BaseException:
                await self._teardown()
                raise
            self._started = True

    async def _start(self) -> None:
        rt = self._rt
        dsn = self._server_dsn()
        if dsn is None:
            from pgcoord.embedded import ensure_server

            dsn = await asyncio.to_thread(ensure_server)
        rt.dsn = dsn
        self._link = link = _shared.link_for(dsn)
        # The listener connects first: a bad DSN fails here, fast, naming the host.
        listener = await link.open_listener(
            connect_timeout=rt.connect_timeout, heartbeat=self._heartbeat
        )
        self._holds_listener = True
        version = listener.server_version or 0
        if version < MIN_SERVER_VERSION:
            raise UnsupportedServerError(
                f"pgcoord needs PostgreSQL >= 15 (UNLOGGED sequences for lock tokens, "
                f"idle_session_timeout for lock leases); {_driver.describe_server(dsn)} runs "
                f"{version // 10000}.{version % 10000}"
            )
        view = ListenerView(listener)
        rt.attach(view, await self._open_source(link, dsn))
        self._source_open = True
        if self._external_pool is not None or self._engine is not None:
            await self._check_same_database()
        await _pooler.refuse_transaction_pooling(rt)
        await self._check_schema(dsn)
        self._services_started = True
        for service in self._services:
            view.add_reconnect_hook(service.on_reconnect)
        for service in self._services:
            await service.start()
        log.info(
            "pgcoord instance %s started (app=%s, schema=%s)", rt.instance_id, rt.app, rt.schema
        )

    def _server_dsn(self) -> str | None:
        """The DSN of everything pgcoord connects itself (listener, lock sessions, migrations):
        ``dsn=``, else the one ``pool=`` or ``engine=`` connects with, else ``$PGCOORD_DSN``;
        None means the embedded server. (A caller's pool or engine comes before the
        environment: a listener elsewhere than the work connections would hear nothing.)"""
        if self._dsn:
            return self._dsn
        if self._pool_dsn is not None:
            return self._pool_dsn  # "" is libpq's defaults, exactly what the pool uses
        if self._engine_dsn is not None:
            return self._engine_dsn
        return resolve_dsn(None)

    async def _check_same_database(self) -> None:
        """Refuse work connections (``pool=``/``engine=``) that reach another database than the
        listener (``dsn=``): pub/sub messages, wake-ups and lock releases would all be lost."""
        rt = self._rt
        identity = rt.listener.identity
        if identity is None:
            return  # the listener is reconnecting: start() fails elsewhere if it stays down
        pid, backend_start = identity
        what = "start: the work connections' database"
        async with rt.connection(what, rt.connect_timeout) as conn:
            cur = await conn.execute(statements.LISTENER_DATABASE, (backend_start, pid))
            row = await cur.fetchone()
            work = conn.info.dbname
        if row is None or not row[0] or not row[1]:
            given = "pool=" if self._external_pool is not None else "engine="
            where = f"database {work!r}" + (" on another server" if row is None else "")
            raise InvalidInputError(
                f"dsn= and {given} must reach the same database: the listener connected with "
                f"dsn= to {_driver.describe_server(rt.dsn or '')}, but {given}'s connections "
                f"reach {where}. NOTIFY is per database, so messages would be lost; drop dsn= "
                f"(pgcoord then uses {given}'s own conninfo) or make it name that database"
            )

    async def _open_source(self, link: _shared.ServerLink, dsn: str) -> WorkSource:
        rt = self._rt
        if self._external_pool is not None:
            return PoolSource(self._external_pool, dsn, owned=False)
        if self._engine is not None:
            size = getattr(self._engine.pool, "size", None)
            limit = self._max_connections - 1
            if callable(size):
                limit = max(1, min(limit, int(size())))
            import sqlalchemy as sa

            kind = SyncEngineSource if isinstance(self._engine, sa.Engine) else EngineSource
            return kind(self._engine, dsn, limit=limit, timeout=rt.connect_timeout)
        source = await link.open_pool(
            max_size=self._max_connections - 1, connect_timeout=rt.connect_timeout
        )
        self._holds_pool = True
        return source

    async def _check_schema(self, dsn: str) -> None:
        rt = self._rt
        if self._migrate:
            async with rt.connection("start: schema check") as conn:
                current = await migrations.current_revision(conn, rt.schema)
            # At head already (the usual restart, or a second app in this process): no
            # migration connection beyond the budget is opened at all.
            if current != migrations.head_revision():
                await _driver.patiently(
                    lambda: asyncio.to_thread(
                        migrations.upgrade, dsn, rt.schema, connect_timeout=rt.connect_timeout
                    ),
                    timeout=rt.connect_timeout,
                )
        async with rt.connection("start: schema check") as conn:
            await migrations.check(conn, rt.schema)

    async def stop(self) -> None:
        """Stop the services (queue first, so running jobs finish), then let go of the listener
        and the pool (closed when no other Coordinator of this process uses them).

        Idempotent; leaves no task or connection behind. Ends within ``queue_grace`` (running
        jobs) plus ``command_timeout`` (every database step left) plus about a second (closing
        the connections), however the network behaves.
        """
        async with self._start_lock:
            if not self._started:
                return
            self._started = False
            await self._teardown()

    async def _teardown(self) -> None:
        rt = self._rt
        # Every database step left (freeing lease rows, the queue's waiter row, ...) shares
        # one command_timeout after the running jobs' grace, so a stop over a stalled network
        # ends within queue_grace + command_timeout.
        grace = float(self.event_queue.option("queue_grace"))
        rt.begin_stop(grace + rt.command_timeout)
        try:
            await self._stop_all(rt)
        finally:
            rt.end_stop()

    async def _stop_all(self, rt: Runtime) -> None:
        if self._source_open and self._services_started:
            self._services_started = False
            for service in reversed(self._services):
                try:
                    await service.stop()
                except Exception:
                    log.exception("pgcoord: stopping %s failed", type(service).__name__)
        await rt.detach()
        link, self._link = self._link, None
        # The work source stays attached: a connection still out comes back to where it came from.
        if self._holds_pool and link is not None:
            self._holds_pool = False
            await link.close_pool(max_size=self._max_connections - 1)
        elif self._source_open and rt.source is not None:
            await rt.source.close()
        self._source_open = False
        if self._holds_listener and link is not None:
            self._holds_listener = False
            await link.close_listener()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- plugins ---------------------------------------------------------------------------

    async def add_plugin(self, plugin: Plugin) -> None:
        """Wire a :class:`~pgcoord.Plugin`: sets ``plugin.coord`` and routes its sync messages."""
        if not isinstance(plugin, Plugin):
            raise InvalidTypeError(
                f"add_plugin takes a pgcoord.Plugin, not {type(plugin).__name__}"
            )
        plugin.coord = self
        await self.sync_message_manager.register_plugin(plugin)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<pgcoord.Coordinator app={self.app!r} schema={self.schema!r} {self.instance_id} {state}>"


__all__ = ["DSN_ENV", "Coordinator", "NotRunningError", "resolve_dsn"]
