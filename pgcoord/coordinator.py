"""The Coordinator: one per application instance; owns the pool, the listener and the services."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from types import TracebackType
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgcoord import _driver
from pgcoord import migrate as migrations
from pgcoord.cache import CacheManager
from pgcoord.errors import InvalidTypeError, NotRunningError, UnsupportedServerError
from pgcoord.listener import Listener
from pgcoord.locks import LockManager
from pgcoord.pubsub import Plugin, PubSubManager, SyncMessageManager
from pgcoord.queue import EventQueue
from pgcoord.runtime import Runtime, Service
from pgcoord.validation import check_identifier, check_int, check_positive

log = logging.getLogger("pgcoord")

DSN_ENV = "PGCOORD_DSN"
#: The oldest server pgcoord runs on (PostgreSQL 15).
MIN_SERVER_VERSION = 150000

_SERVICE_CLASSES: tuple[type[Service], ...] = (
    LockManager,
    CacheManager,
    PubSubManager,
    SyncMessageManager,
    EventQueue,
)


def resolve_dsn(dsn: str | None) -> str | None:
    """The DSN to use: the argument, else ``$PGCOORD_DSN``; None means the embedded server."""
    return dsn or os.environ.get(DSN_ENV) or None


def new_instance_id() -> str:
    """A readable id unique to one Coordinator: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:10]}"


class Coordinator:
    """Gives one application instance the cluster services, through PostgreSQL.

    ``dsn``: a libpq connection string or URI; None falls back to ``$PGCOORD_DSN``, then to the
    embedded server. ``app`` namespaces everything (two apps on one database never meet);
    ``schema`` is where pgcoord's tables live. ``migrate=True`` upgrades the schema at start
    (exactly once when many instances start together); otherwise an outdated schema is refused
    with :class:`~pgcoord.errors.SchemaOutdatedError`. ``pool`` shares a caller's
    ``AsyncConnectionPool`` (it must hand out autocommit connections; pgcoord does not close it).
    ``pool_size`` bounds pgcoord's own pool, ``connect_timeout`` bounds every connection attempt,
    ``heartbeat`` is how often a quiet listener proves its connection. Service options
    (``**options``) are listed by ``Coordinator.option_defaults()``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        app: str = "main",
        schema: str = "pgcoord",
        migrate: bool = False,
        pool: AsyncConnectionPool | None = None,
        pool_size: int = 10,
        connect_timeout: float = _driver.DEFAULT_CONNECT_TIMEOUT,
        heartbeat: float = 5.0,
        **options: Any,
    ) -> None:
        if dsn is not None and not isinstance(dsn, str):
            raise InvalidTypeError(f"dsn must be a str or None, not {type(dsn).__name__}")
        check_identifier(app, "app")
        check_identifier(schema, "schema")
        if pool is not None and not isinstance(pool, AsyncConnectionPool):
            raise InvalidTypeError("pool must be a psycopg_pool.AsyncConnectionPool")
        check_int(pool_size, "pool_size", minimum=1)
        check_positive(connect_timeout, "connect_timeout")
        check_positive(heartbeat, "heartbeat")
        defaults = self.option_defaults()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise InvalidTypeError(
                f"unknown Coordinator option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}"
            )
        self._dsn = dsn
        self._migrate = bool(migrate)
        self._external_pool = pool
        self._pool_size = pool_size
        self._heartbeat = heartbeat
        self._started = False
        self._start_lock = asyncio.Lock()
        self._rt = Runtime(
            app=app,
            schema=schema,
            instance_id=new_instance_id(),
            options=options,
            connect_timeout=connect_timeout,
        )
        self.lock_manager = LockManager(self._rt)
        self.cache_manager = CacheManager(self._rt)
        self.pubsub_manager = PubSubManager(self._rt)
        self.sync_message_manager = SyncMessageManager(self._rt, self.pubsub_manager)
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
    def listener(self) -> Listener:
        """The process's shared LISTEN connection (for services and diagnostics)."""
        return self._rt.listener

    @property
    def cache(self) -> Any:
        """The default cache, named after ``app``."""
        return self.cache_manager.default_cache

    @property
    def pool(self) -> AsyncConnectionPool:
        """The work pool (raises :class:`NotRunningError` when not running)."""
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
        dsn = resolve_dsn(self._dsn)
        if dsn is None:
            from pgcoord.embedded import ensure_server

            dsn = await asyncio.to_thread(ensure_server)
        rt.dsn = dsn
        # The listener connects first: a bad DSN fails here, fast, naming the host.
        listener = Listener(dsn, connect_timeout=rt.connect_timeout, heartbeat=self._heartbeat)
        rt._listener = listener
        await listener.connect()
        version = listener.server_version or 0
        if version < MIN_SERVER_VERSION:
            raise UnsupportedServerError(
                f"pgcoord needs PostgreSQL >= 15 (UNLOGGED sequences for lock tokens, "
                f"idle_session_timeout for lock leases); {_driver.describe_server(dsn)} runs "
                f"{version // 10000}.{version % 10000}"
            )
        if self._external_pool is not None:
            pool = self._external_pool
        else:
            pool = _driver.make_pool(
                dsn,
                max_size=self._pool_size,
                connect_timeout=rt.connect_timeout,
                name=f"pgcoord-{rt.app}",
            )
            try:
                await pool.open(wait=True, timeout=rt.connect_timeout)
            except Exception as exc:
                await pool.close()
                raise _driver.translate(exc, dsn) from exc
        rt._pool = pool
        rt.running = True
        if self._migrate:
            await asyncio.to_thread(
                migrations.upgrade, dsn, rt.schema, connect_timeout=rt.connect_timeout
            )
        async with rt.connection() as conn:
            await migrations.check(conn, rt.schema)
        for service in self._services:
            listener.add_reconnect_hook(service._on_reconnect)
        await listener.start()
        for service in self._services:
            await service._start()
        log.info(
            "pgcoord instance %s started (app=%s, schema=%s)", rt.instance_id, rt.app, rt.schema
        )

    async def stop(self) -> None:
        """Stop the services (queue first, so running jobs finish), then the listener and pool.

        Idempotent; leaves no task or connection behind.
        """
        async with self._start_lock:
            if not self._started:
                return
            self._started = False
            await self._teardown()

    async def _teardown(self) -> None:
        rt = self._rt
        for service in reversed(self._services):
            if rt._pool is None:
                break
            try:
                await service._stop()
            except Exception:
                log.exception("pgcoord: stopping %s failed", type(service).__name__)
        rt.running = False
        await rt.close_kept()
        if rt._listener is not None:
            await rt._listener.stop()
            rt._listener = None
        if rt._pool is not None and self._external_pool is None:
            await rt._pool.close()
        rt._pool = None

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
