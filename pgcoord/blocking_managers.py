"""The blocking twins of the managers: the async methods' names and parameters, plain results.

Each twin wraps one async object and the :class:`LoopThread` its Coordinator runs on; each method
is one call onto that loop, where the coroutine runs while the caller's thread waits for its
result. Two kinds of plain method differ:

- the ``*_sync`` methods (``xact_lock_sync``, ``publish_sync``, ``publish_many_sync``) run in the
  caller's thread: they wait on the caller's sync connection, and must block that caller, never
  the loop that runs the listener, the lock leases and the workers;
- the plain methods that read or build a manager's state (``create_cache``, ``subscribed()``,
  ...) run on the loop thread too, where that state is changed, so two threads never race on it
  (no I/O: the hop costs microseconds).

Written out rather than made by reflection so that ``mypy --strict`` checks the code that uses
them; tests/foundation/test_blocking.py fails when an async method has no twin here.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from pgcoord.cache import Cache, CacheManager, CacheSerializer
from pgcoord.errors import NotRunningError
from pgcoord.locks import DEFAULT_TTL, Lock, LockContext, LockHolder, LockManager
from pgcoord.locks.lock import SAME, _Same
from pgcoord.pubsub import Plugin, PubSubManager, SyncMessageManager
from pgcoord.queue import EventQueue, FailedJob
from pgcoord.runtime import Service

T = TypeVar("T")
A = TypeVar("A")
S = TypeVar("S", bound=Service)

#: A pub/sub or sync-message handler: called with the message, sync or async.
Handler = Callable[[Any], Any]


class LoopThread:
    """An event loop running forever in a daemon thread, and calls onto it from other threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name="pgcoord-blocking", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``factory()`` on the loop and wait for its result in the calling thread."""
        # A factory, not a coroutine: a refused call then leaves no never-awaited coroutine.
        if self.closed:
            raise NotRunningError("this BlockingCoordinator was closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "a blocking pgcoord call was made from a pgcoord handler; use the async API there"
            )
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result()

    def call(self, fn: Callable[[], T]) -> T:
        """Call the plain ``fn()`` on the loop thread and wait for its result."""

        async def on_loop() -> T:
            return fn()

        return self.run(on_loop)

    def close(self) -> None:
        """Stop the loop and join its thread (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class _Twin(Generic[A]):
    """The async object a twin stands for, and the loop thread it runs on."""

    def __init__(self, target: A, loop: LoopThread) -> None:
        self._async = target
        self._loop = loop

    def __repr__(self) -> str:
        return f"<blocking {self._async!r}>"


class _ServiceTwin(_Twin[S]):
    def option(self, name: str) -> Any:
        """The configured value of one of this service's options."""
        return self._async.option(name)


# -- cache ---------------------------------------------------------------------------------


class BlockingCache(_Twin[Cache]):
    """A :class:`~pgcoord.Cache` for sync code: the same methods, blocking."""

    @property
    def name(self) -> str:
        """The cache's name."""
        return self._async.name

    @property
    def prefix(self) -> str:
        """The key namespace (caches sharing a prefix share keys)."""
        return self._async.prefix

    @property
    def store_kind(self) -> str:
        """``"postgres"`` or ``"memory"``."""
        return self._async.store_kind

    @property
    def default_ttl(self) -> float | None:
        """The entries' default seconds-to-live (None: no expiry)."""
        return self._async.default_ttl

    @property
    def local_ttl(self) -> float | None:
        """The near cache's entry lifetime (None: no near cache)."""
        return self._async.local_ttl

    @property
    def max_entries(self) -> int | None:
        """The cache's size bound."""
        return self._async.max_entries

    @property
    def max_value_bytes(self) -> int:
        """The limit of one encoded value."""
        return self._async.max_value_bytes

    @property
    def serializer(self) -> CacheSerializer:
        """What encodes and decodes the values."""
        return self._async.serializer

    def get(self, key: str, default: Any = None) -> Any:
        """Blocking :meth:`Cache.get <pgcoord.Cache.get>`."""
        return self._loop.run(lambda: self._async.get(key, default))

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Blocking :meth:`Cache.set <pgcoord.Cache.set>`."""
        self._loop.run(lambda: self._async.set(key, value, ttl))

    def delete(self, key: str) -> None:
        """Blocking :meth:`Cache.delete <pgcoord.Cache.delete>`."""
        self._loop.run(lambda: self._async.delete(key))

    def mget(self, *keys: str) -> list[Any]:
        """Blocking :meth:`Cache.mget <pgcoord.Cache.mget>`."""
        return self._loop.run(lambda: self._async.mget(*keys))

    def mset(
        self, pairs: Mapping[str, Any] | Iterable[tuple[str, Any]], ttl: float | None = None
    ) -> None:
        """Blocking :meth:`Cache.mset <pgcoord.Cache.mset>`."""
        self._loop.run(lambda: self._async.mset(pairs, ttl))

    def mdel(self, *keys: str) -> None:
        """Blocking :meth:`Cache.mdel <pgcoord.Cache.mdel>`."""
        self._loop.run(lambda: self._async.mdel(*keys))

    def reset(self) -> None:
        """Blocking :meth:`Cache.reset <pgcoord.Cache.reset>`."""
        self._loop.run(self._async.reset)

    def ttl(self, key: str) -> float | None:
        """Blocking :meth:`Cache.ttl <pgcoord.Cache.ttl>`."""
        return self._loop.run(lambda: self._async.ttl(key))

    def keys(self, pattern: str | None = None) -> list[str]:
        """Blocking :meth:`Cache.keys <pgcoord.Cache.keys>`."""
        return self._loop.run(lambda: self._async.keys(pattern))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Blocking :meth:`Cache.incr <pgcoord.Cache.incr>`."""
        return self._loop.run(lambda: self._async.incr(key, amount, ttl))

    def wrap(
        self,
        key: str,
        fn: Callable[[], Any] | Callable[[], Awaitable[Any]],
        ttl: float | None = None,
    ) -> Any:
        """Blocking :meth:`Cache.wrap <pgcoord.Cache.wrap>` (``fn`` runs on the loop thread)."""
        return self._loop.run(lambda: self._async.wrap(key, fn, ttl))

    def wrap_with_condition(
        self,
        key: str,
        fn: Callable[[], Any] | Callable[[], Awaitable[Any]],
        *,
        use_cache: bool = True,
        is_cacheable: Callable[[Any], Any] | None = None,
        ttl: float | None = None,
    ) -> Any:
        """Blocking :meth:`Cache.wrap_with_condition <pgcoord.Cache.wrap_with_condition>`."""
        return self._loop.run(
            lambda: self._async.wrap_with_condition(
                key, fn, use_cache=use_cache, is_cacheable=is_cacheable, ttl=ttl
            )
        )


class BlockingCacheManager(_ServiceTwin[CacheManager]):
    """A :class:`~pgcoord.CacheManager` for sync code: the same methods, blocking."""

    def create_cache(
        self,
        name: str,
        *,
        prefix: str | None = None,
        store: str = "postgres",
        ttl: float | None = None,
        local_ttl: float | None = None,
        max_entries: int | None = None,
        max_value_bytes: int | None = None,
        serializer: CacheSerializer | None = None,
    ) -> BlockingCache:
        """:meth:`CacheManager.create_cache <pgcoord.CacheManager.create_cache>`, blocking twin."""
        cache = self._loop.call(
            lambda: self._async.create_cache(
                name,
                prefix=prefix,
                store=store,
                ttl=ttl,
                local_ttl=local_ttl,
                max_entries=max_entries,
                max_value_bytes=max_value_bytes,
                serializer=serializer,
            )
        )
        return BlockingCache(cache, self._loop)

    def get_cache(self, name: str) -> BlockingCache:
        """The cache created as ``name``; raises :class:`~pgcoord.CacheNotFoundError`."""
        return BlockingCache(self._loop.call(lambda: self._async.get_cache(name)), self._loop)

    @property
    def default_cache(self) -> BlockingCache:
        """The cache named after the app (``coord.cache``), created on first use."""
        return BlockingCache(self._loop.call(lambda: self._async.default_cache), self._loop)

    @property
    def caches(self) -> dict[str, BlockingCache]:
        """The caches created so far, by name (a copy)."""
        caches = self._loop.call(lambda: self._async.caches)
        return {name: BlockingCache(cache, self._loop) for name, cache in caches.items()}

    def flush_all(self) -> None:
        """Blocking :meth:`CacheManager.flush_all <pgcoord.CacheManager.flush_all>`."""
        self._loop.run(self._async.flush_all)

    def sweep(self) -> int:
        """Blocking :meth:`CacheManager.sweep <pgcoord.CacheManager.sweep>`."""
        return self._loop.run(self._async.sweep)


# -- pub/sub and sync messages -------------------------------------------------------------


class BlockingPubSub(_ServiceTwin[PubSubManager]):
    """A :class:`~pgcoord.PubSubManager` for sync code; handlers run on the loop thread."""

    def subscribe(self, channel: str, handler: Handler, *, debounce: float = 0.0) -> None:
        """Blocking :meth:`PubSubManager.subscribe <pgcoord.PubSubManager.subscribe>`."""
        self._loop.run(lambda: self._async.subscribe(channel, handler, debounce=debounce))

    def unsubscribe(self, channel: str, handler: Handler) -> None:
        """Blocking :meth:`PubSubManager.unsubscribe <pgcoord.PubSubManager.unsubscribe>`."""
        self._loop.run(lambda: self._async.unsubscribe(channel, handler))

    def publish(
        self,
        channel: str,
        message: object,
        *,
        skip_self: bool = False,
        only_self: bool = False,
        transaction: object = None,
    ) -> None:
        """Blocking :meth:`PubSubManager.publish <pgcoord.PubSubManager.publish>`."""
        self._loop.run(
            lambda: self._async.publish(
                channel, message, skip_self=skip_self, only_self=only_self, transaction=transaction
            )
        )

    def sweep(self) -> int:
        """Blocking :meth:`PubSubManager.sweep <pgcoord.PubSubManager.sweep>`."""
        return self._loop.run(self._async.sweep)

    @property
    def dropped(self) -> int:
        """:attr:`PubSubManager.dropped <pgcoord.PubSubManager.dropped>`."""
        return self._async.dropped


class BlockingSyncMessages(_ServiceTwin[SyncMessageManager]):
    """A :class:`~pgcoord.SyncMessageManager` for sync code; handlers run on the loop thread."""

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Blocking :meth:`SyncMessageManager.subscribe <pgcoord.SyncMessageManager.subscribe>`."""
        self._loop.run(lambda: self._async.subscribe(channel, handler))

    def unsubscribe(self, channel: str, handler: Handler) -> None:
        """Blocking :meth:`SyncMessageManager.unsubscribe <pgcoord.SyncMessageManager.unsubscribe>`."""
        self._loop.run(lambda: self._async.unsubscribe(channel, handler))

    def publish(
        self,
        channel: str,
        message: object,
        *,
        transaction: object = None,
        skip_self: bool = True,
        only_self: bool = False,
    ) -> None:
        """Blocking :meth:`SyncMessageManager.publish <pgcoord.SyncMessageManager.publish>`."""
        self._loop.run(
            lambda: self._async.publish(
                channel, message, transaction=transaction, skip_self=skip_self, only_self=only_self
            )
        )

    def register_plugin(self, plugin: Plugin) -> None:
        """Blocking :meth:`SyncMessageManager.register_plugin <pgcoord.SyncMessageManager.register_plugin>`."""
        self._loop.run(lambda: self._async.register_plugin(plugin))


# -- event queue ---------------------------------------------------------------------------


class BlockingEventQueue(_ServiceTwin[EventQueue]):
    """An :class:`~pgcoord.EventQueue` for sync code; ``process`` runs as in the async API."""

    def subscribe(
        self,
        channel: str,
        *,
        process: Callable[..., Any],
        idle: Callable[[], bool] | None = None,
        concurrency: int = 1,
        interval: float = 0.25,
    ) -> None:
        """Blocking :meth:`EventQueue.subscribe <pgcoord.EventQueue.subscribe>`."""
        self._loop.run(
            lambda: self._async.subscribe(
                channel, process=process, idle=idle, concurrency=concurrency, interval=interval
            )
        )

    def unsubscribe(self, channel: str) -> None:
        """Blocking :meth:`EventQueue.unsubscribe <pgcoord.EventQueue.unsubscribe>`."""
        self._loop.run(lambda: self._async.unsubscribe(channel))

    def subscribed(self) -> list[str]:
        """The channels this instance consumes."""
        return self._loop.call(self._async.subscribed)

    def publish(
        self,
        channel: str,
        message: Any,
        *,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
        transaction: object = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Blocking :meth:`EventQueue.publish <pgcoord.EventQueue.publish>`; the job's id."""
        return self._loop.run(
            lambda: self._async.publish(
                channel,
                message,
                timeout=timeout,
                max_retries=max_retries,
                delay=delay,
                priority=priority,
                transaction=transaction,
                idempotency_key=idempotency_key,
            )
        )

    def publish_many(
        self,
        channel: str,
        messages: Iterable[Any],
        *,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
        transaction: object = None,
    ) -> list[int]:
        """Blocking :meth:`EventQueue.publish_many <pgcoord.EventQueue.publish_many>`; the ids."""
        return self._loop.run(
            lambda: self._async.publish_many(
                channel,
                messages,
                timeout=timeout,
                max_retries=max_retries,
                delay=delay,
                priority=priority,
                transaction=transaction,
            )
        )

    def publish_sync(
        self,
        channel: str,
        message: Any,
        *,
        transaction: object,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> int:
        """:meth:`EventQueue.publish_sync <pgcoord.EventQueue.publish_sync>`, in this thread."""
        return self._async.publish_sync(
            channel,
            message,
            transaction=transaction,
            timeout=timeout,
            max_retries=max_retries,
            delay=delay,
            priority=priority,
            idempotency_key=idempotency_key,
        )

    def publish_many_sync(
        self,
        channel: str,
        messages: Iterable[Any],
        *,
        transaction: object,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
    ) -> list[int]:
        """:meth:`EventQueue.publish_many_sync <pgcoord.EventQueue.publish_many_sync>`, in this
        thread."""
        return self._async.publish_many_sync(
            channel,
            messages,
            transaction=transaction,
            timeout=timeout,
            max_retries=max_retries,
            delay=delay,
            priority=priority,
        )

    def failed_jobs(
        self, channel: str | None = None, *, ids: Iterable[int] | None = None, limit: int = 100
    ) -> list[FailedJob]:
        """Blocking :meth:`EventQueue.failed_jobs <pgcoord.EventQueue.failed_jobs>`."""
        return self._loop.run(lambda: self._async.failed_jobs(channel, ids=ids, limit=limit))

    def retry_failed(
        self, channel: str | None = None, *, ids: Iterable[int] | None = None
    ) -> list[int]:
        """Blocking :meth:`EventQueue.retry_failed <pgcoord.EventQueue.retry_failed>`."""
        return self._loop.run(lambda: self._async.retry_failed(channel, ids=ids))

    def purge_failed(
        self,
        channel: str | None = None,
        *,
        ids: Iterable[int] | None = None,
        older_than: float | None = None,
    ) -> int:
        """Blocking :meth:`EventQueue.purge_failed <pgcoord.EventQueue.purge_failed>`."""
        return self._loop.run(
            lambda: self._async.purge_failed(channel, ids=ids, older_than=older_than)
        )

    def stats(self, channel: str) -> dict[str, int]:
        """Blocking :meth:`EventQueue.stats <pgcoord.EventQueue.stats>`."""
        return self._loop.run(lambda: self._async.stats(channel))

    def flush(self) -> None:
        """Blocking :meth:`EventQueue.flush <pgcoord.EventQueue.flush>`."""
        self._loop.run(self._async.flush)


# -- locks ---------------------------------------------------------------------------------


class BlockingLock(_Twin[Lock]):
    """A held :class:`~pgcoord.Lock` for sync code; ``with lock:`` releases it at the end."""

    @property
    def key(self) -> str:
        """The lock's key."""
        return self._async.key

    @property
    def token(self) -> int:
        """The fencing token: strictly increasing per key across the cluster."""
        return self._async.token

    @property
    def ttl(self) -> float | None:
        """The current lease length in seconds (None: no lease)."""
        return self._async.ttl

    @property
    def lost(self) -> bool:
        """True once the lease ended without a release."""
        return self._async.lost

    @property
    def held(self) -> bool:
        """True while the lock is held (neither released nor lost)."""
        return self._async.held

    @property
    def remaining(self) -> float | None:
        """Seconds left on the lease (None: no lease; 0 once over)."""
        return self._async.remaining

    @property
    def promoted(self) -> bool:
        """True once the lock is held by a lease row rather than by a session."""
        return self._async.promoted

    @property
    def backend_pid(self) -> int | None:
        """The server process whose session holds the lock (None once released or lost)."""
        return self._async.backend_pid

    def release(self) -> None:
        """Blocking :meth:`Lock.release <pgcoord.Lock.release>`."""
        self._loop.run(self._async.release)

    def extend(self, ttl: float | _Same | None = SAME) -> None:
        """Blocking :meth:`Lock.extend <pgcoord.Lock.extend>`."""
        self._loop.run(lambda: self._async.extend(ttl))

    def run_exclusive(self, fn: Callable[[], Any], ttl: float | _Same | None = SAME) -> Any:
        """Blocking :meth:`Lock.run_exclusive <pgcoord.Lock.run_exclusive>` (``fn`` runs on the
        loop thread)."""
        return self._loop.run(lambda: self._async.run_exclusive(fn, ttl))

    def __enter__(self) -> BlockingLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.run(lambda: self._async.__aexit__(exc_type, exc, tb))


class BlockingLockContext(_Twin[LockContext]):
    """What :meth:`BlockingLockManager.lock` returns: ``with`` it to hold the lock."""

    def __enter__(self) -> BlockingLock:
        return BlockingLock(self._loop.run(self._async.__aenter__), self._loop)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.run(lambda: self._async.__aexit__(exc_type, exc, tb))


class BlockingLockManager(_ServiceTwin[LockManager]):
    """A :class:`~pgcoord.LockManager` for sync code: the same methods, blocking."""

    def acquire(self, key: str, ttl: float | None = DEFAULT_TTL) -> BlockingLock:
        """Blocking :meth:`LockManager.acquire <pgcoord.LockManager.acquire>` (waits)."""
        return BlockingLock(self._loop.run(lambda: self._async.acquire(key, ttl)), self._loop)

    def try_acquire(
        self, key: str, timeout: float = 0.0, ttl: float | None = DEFAULT_TTL
    ) -> BlockingLock:
        """Blocking :meth:`LockManager.try_acquire <pgcoord.LockManager.try_acquire>`."""
        lock = self._loop.run(lambda: self._async.try_acquire(key, timeout, ttl))
        return BlockingLock(lock, self._loop)

    def lock(self, key: str, ttl: float | None = DEFAULT_TTL) -> BlockingLockContext:
        """``with lock_manager.lock(key) as lock:`` holds the lock for the block."""
        return BlockingLockContext(self._async.lock(key, ttl), self._loop)

    def run_exclusive(
        self, key: str, fn: Callable[[], Any], ttl: float | None = DEFAULT_TTL
    ) -> Any:
        """Blocking :meth:`LockManager.run_exclusive <pgcoord.LockManager.run_exclusive>`
        (``fn`` runs on the loop thread)."""
        return self._loop.run(lambda: self._async.run_exclusive(key, fn, ttl))

    def xact_lock(self, key: str, *, transaction: Any) -> None:
        """:meth:`LockManager.xact_lock <pgcoord.LockManager.xact_lock>` on the loop thread; with
        a sync connection prefer :meth:`xact_lock_sync`, which waits in this thread only."""
        self._loop.run(lambda: self._async.xact_lock(key, transaction=transaction))

    def xact_lock_sync(self, key: str, *, transaction: Any) -> None:
        """:meth:`LockManager.xact_lock_sync <pgcoord.LockManager.xact_lock_sync>`, in this
        thread."""
        self._async.xact_lock_sync(key, transaction=transaction)

    def holders(self) -> list[LockHolder]:
        """Blocking :meth:`LockManager.holders <pgcoord.LockManager.holders>`."""
        return self._loop.run(self._async.holders)

    def connection_stats(self) -> dict[str, int]:
        """:meth:`LockManager.connection_stats <pgcoord.LockManager.connection_stats>`."""
        return self._loop.call(self._async.connection_stats)


__all__ = [
    "BlockingCache",
    "BlockingCacheManager",
    "BlockingEventQueue",
    "BlockingLock",
    "BlockingLockContext",
    "BlockingLockManager",
    "BlockingPubSub",
    "BlockingSyncMessages",
]
