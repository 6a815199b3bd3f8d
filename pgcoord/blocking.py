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
them quick, or hand work to your own threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from pgcoord.coordinator import Coordinator
from pgcoord.errors import NotRunningError

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pgcoord-blocking", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``factory()`` on the loop and wait for its result in the calling thread."""
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "a blocking pgcoord call was made from a pgcoord handler; use the async API there"
            )
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            factory(), self.loop
        )
        return future.result()

    def close(self) -> None:
        """Stop the loop and join its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _has_coroutine_methods(obj: object) -> bool:
    cls = type(obj)
    return any(
        inspect.iscoroutinefunction(getattr(cls, name, None))
        for name in dir(cls)
        if not name.startswith("__")
    )


async def _await(awaitable: Any) -> Any:
    return await awaitable


class BlockingProxy:
    """Wraps a pgcoord object: coroutine methods block, async context managers become sync ones,
    returned pgcoord service objects (caches, locks) are wrapped the same way, and plain
    attributes pass through."""

    def __init__(self, target: Any, loop: _LoopThread) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_loop", loop)

    def _wrap(self, value: Any) -> Any:
        if (
            hasattr(value, "__aenter__")
            and hasattr(value, "__aexit__")
            and not _has_coroutine_methods(value)
        ):
            return _BlockingContext(value, self._loop)
        if _has_coroutine_methods(value) and type(value).__module__.startswith("pgcoord"):
            return BlockingProxy(value, self._loop)
        return value

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return self._wrap(attr)

        if not inspect.iscoroutinefunction(attr):
            # Plain methods (create_cache, xact_lock_sync, publish_sync...) run in the caller's
            # thread: one that waits on a sync connection must block its caller, never the
            # loop that runs the listener, leases and workers.
            @functools.wraps(attr)
            def call_here(*args: Any, **kwargs: Any) -> Any:
                result = attr(*args, **kwargs)
                if inspect.isawaitable(result):
                    awaitable = result
                    result = self._loop.run(lambda: _await(awaitable))
                return self._wrap(result)

            return call_here

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            async def on_loop() -> Any:
                # Called on the loop thread: methods that start tasks find a running loop.
                return await attr(*args, **kwargs)

            return self._wrap(self._loop.run(on_loop))

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __enter__(self) -> Any:
        if hasattr(self._target, "__aenter__"):
            return self._wrap(self._loop.run(self._target.__aenter__))
        raise TypeError(f"{type(self._target).__name__} is not a context manager")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        target = self._target
        return self._loop.run(lambda: target.__aexit__(exc_type, exc, tb))

    def __repr__(self) -> str:
        return f"<blocking {self._target!r}>"


class _BlockingContext:
    """A sync ``with`` over an async context manager."""

    def __init__(self, manager: Any, loop: _LoopThread) -> None:
        self._manager = manager
        self._loop = loop

    def __enter__(self) -> Any:
        value = self._loop.run(self._manager.__aenter__)
        if _has_coroutine_methods(value):
            return BlockingProxy(value, self._loop)
        return value

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        manager = self._manager
        return self._loop.run(lambda: manager.__aexit__(exc_type, exc, tb))


class BlockingCoordinator:
    """A :class:`~pgcoord.Coordinator` for sync code; takes the same arguments.

    ``start()``/``stop()`` (or ``with coord:``) run the Coordinator on a background event loop.
    The managers (``cache``, ``cache_manager``, ``pubsub_manager``, ``sync_message_manager``,
    ``event_queue``, ``lock_manager``) have the async API's methods, blocking.
    """

    def __init__(self, dsn: str | None = None, **kwargs: Any) -> None:
        # Validate on the caller's thread, so bad arguments fail here, before any thread starts.
        self._loop = _LoopThread()
        try:
            self._coord: Coordinator = self._loop.run(lambda: self._build(dsn, kwargs))
        except BaseException:
            self._loop.close()
            raise

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
        """Stop the Coordinator and end the background thread."""
        self.stop()
        self._loop.close()

    def _proxy(self, target: Any) -> Any:
        if not self._loop.loop.is_running():
            raise NotRunningError("this BlockingCoordinator was closed")
        return BlockingProxy(target, self._loop)

    @property
    def cache(self) -> Any:
        """The default cache (blocking)."""
        return self._proxy(self._loop.run(self._default_cache))

    async def _default_cache(self) -> Any:
        return self._coord.cache

    @property
    def cache_manager(self) -> Any:
        """The CacheManager (blocking)."""
        return self._proxy(self._coord.cache_manager)

    @property
    def pubsub_manager(self) -> Any:
        """The PubSubManager (blocking)."""
        return self._proxy(self._coord.pubsub_manager)

    @property
    def sync_message_manager(self) -> Any:
        """The SyncMessageManager (blocking)."""
        return self._proxy(self._coord.sync_message_manager)

    @property
    def event_queue(self) -> Any:
        """The EventQueue (blocking)."""
        return self._proxy(self._coord.event_queue)

    @property
    def lock_manager(self) -> Any:
        """The LockManager (blocking)."""
        return self._proxy(self._coord.lock_manager)

    def add_plugin(self, plugin: Any) -> None:
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


__all__ = ["BlockingCoordinator"]
