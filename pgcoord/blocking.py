"""The blocking API, for sync applications (Flask, Django, sync SQLAlchemy).

``BlockingCoordinator`` runs a regular :class:`~pgcoord.Coordinator` on an event loop in a
background thread and exposes the same managers with every coroutine method turned into a plain
blocking call. ``transaction=`` accepts sync psycopg connections and SQLAlchemy
``Connection``/``Session`` objects: the statement runs on your connection while your thread waits,
so it joins your transaction exactly as in the async API.

    coord = pgcoord.BlockingCoordinator(app="shop")
    with coord:
        coord.cache.set("k", 1)
        coord.pubsub_manager.publish("orders", {"id": 1}, transaction=django_connection.connection)
        with coord.lock_manager.lock("report", ttl=30) as lock:
            ...

Handlers and job processors given to ``subscribe`` run on the background loop's thread: keep
them quick, or hand work to your own threads. The managers are typed twins of the async ones
(:mod:`pgcoord.blocking_managers`), so ``mypy --strict`` checks the code that calls them.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from pgcoord.blocking_managers import (
    BlockingCache,
    BlockingCacheManager,
    BlockingEventQueue,
    BlockingLock,
    BlockingLockContext,
    BlockingLockManager,
    BlockingPubSub,
    BlockingSyncMessages,
    LoopThread,
)
from pgcoord.coordinator import Coordinator
from pgcoord.pubsub import Plugin


class BlockingCoordinator:
    """A :class:`~pgcoord.Coordinator` for sync code; takes the same arguments.

    ``start()``/``stop()`` (or ``with coord:``) run the Coordinator on a background event loop.
    The managers (``cache``, ``cache_manager``, ``pubsub_manager``, ``sync_message_manager``,
    ``event_queue``, ``lock_manager``) have the async API's methods, blocking.
    """

    def __init__(self, dsn: str | None = None, **kwargs: Any) -> None:
        # Validate on the caller's thread, so bad arguments fail here, before any thread starts.
        self._loop = LoopThread()
        try:
            self._coord: Coordinator = self._loop.run(lambda: self._build(dsn, kwargs))
        except BaseException:
            self._loop.close()
            raise
        coord, loop = self._coord, self._loop
        self._cache_manager = BlockingCacheManager(coord.cache_manager, loop)
        self._pubsub_manager = BlockingPubSub(coord.pubsub_manager, loop)
        self._sync_message_manager = BlockingSyncMessages(coord.sync_message_manager, loop)
        self._event_queue = BlockingEventQueue(coord.event_queue, loop)
        self._lock_manager = BlockingLockManager(coord.lock_manager, loop)

    @staticmethod
    async def _build(dsn: str | None, kwargs: dict[str, Any]) -> Coordinator:
        return Coordinator(dsn, **kwargs)

    @property
    def coordinator(self) -> Coordinator:
        """The async Coordinator underneath (use it only from its loop's thread)."""
        return self._coord

    @property
    def instance_id(self) -> str:
        """This instance's unique id."""
        return self._coord.instance_id

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._coord.running

    def start(self) -> None:
        """Start the Coordinator (connect, check the schema, start the services)."""
        self._loop.run(self._coord.start)

    def stop(self) -> None:
        """Stop the Coordinator; idempotent. The background thread stays for a later start()."""
        self._loop.run(self._coord.stop)

    def close(self) -> None:
        """Stop the Coordinator and end the background thread; idempotent. Every manager call
        made after it raises :class:`~pgcoord.errors.NotRunningError`."""
        if not self._loop.closed:
            self.stop()
            self._loop.close()

    @property
    def cache(self) -> BlockingCache:
        """The default cache (blocking)."""
        return self._cache_manager.default_cache

    @property
    def cache_manager(self) -> BlockingCacheManager:
        """The CacheManager (blocking)."""
        return self._cache_manager

    @property
    def pubsub_manager(self) -> BlockingPubSub:
        """The PubSubManager (blocking)."""
        return self._pubsub_manager

    @property
    def sync_message_manager(self) -> BlockingSyncMessages:
        """The SyncMessageManager (blocking)."""
        return self._sync_message_manager

    @property
    def event_queue(self) -> BlockingEventQueue:
        """The EventQueue (blocking)."""
        return self._event_queue

    @property
    def lock_manager(self) -> BlockingLockManager:
        """The LockManager (blocking)."""
        return self._lock_manager

    def add_plugin(self, plugin: Plugin) -> None:
        """Wire a plugin (its handler runs on the background loop's thread)."""
        self._loop.run(lambda: self._coord.add_plugin(plugin))

    def __enter__(self) -> BlockingCoordinator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "BlockingCache",
    "BlockingCacheManager",
    "BlockingCoordinator",
    "BlockingEventQueue",
    "BlockingLock",
    "BlockingLockContext",
    "BlockingLockManager",
    "BlockingPubSub",
    "BlockingSyncMessages",
]
