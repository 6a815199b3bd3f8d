"""``CacheManager``: creates named caches, sweeps expired rows, routes invalidations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable
from typing import Any, ClassVar

import psycopg

from pgcoord import names
from pgcoord._retry import Backoff
from pgcoord.cache import messages, queries
from pgcoord.cache.cache import Cache, check_ttl
from pgcoord.cache.cluster_lock import ClusterLocks
from pgcoord.cache.memory import MemoryStore
from pgcoord.cache.near import MISSING, NearCache
from pgcoord.cache.notifier import Notifier
from pgcoord.cache.postgres import PostgresStore
from pgcoord.cache.registration import Registrations, marker_ns
from pgcoord.cache.serializer import CacheSerializer, JsonCacheSerializer
from pgcoord.cache.store import Store
from pgcoord.errors import CacheNotFoundError, InvalidInputError, InvalidTypeError
from pgcoord.runtime import Runtime, Service
from pgcoord.validation import check_int, check_key, check_positive

log = logging.getLogger("pgcoord.cache")

STORES = ("postgres", "memory")

# wrap waiters in other processes re-check at least this often (NOTIFY usually wakes them first).
_WRAP_POLL_FIRST = 0.01
_WRAP_POLL_MAX = 0.25
# At most this many sweep batches per round, so a large backlog cannot monopolise a connection.
_SWEEP_MAX_BATCHES = 50


def _check_optional_int(value: object, what: str) -> int | None:
    return None if value is None else check_int(value, what, minimum=1)


#: The invalidation ops this version applies, with their sizes: key, namespace, everything.
_OP_SIZES: dict[str | None, int] = {"k": 3, "n": 2, "a": 1}


class CacheManager(Service):
    """Named caches of this app (``coord.cache_manager``); ``coord.cache`` is the default one.

    Options (``Coordinator(**options)``): ``cache_sweep_interval`` (seconds between expiry
    sweeps and size-bound checks), ``cache_sweep_batch`` (rows deleted per statement),
    ``cache_max_entries`` (default size bound of Postgres caches; None: unbounded),
    ``cache_memory_max_entries`` (default bound of memory caches), ``cache_max_value_bytes``
    (default size limit of one encoded value), ``cache_near_max_entries`` (bound of each near
    cache), ``cache_wrap_timeout`` (seconds ``wrap`` waits for another instance's computation
    before computing itself).
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "cache_sweep_interval": 10.0,
        "cache_sweep_batch": 1000,
        "cache_max_entries": None,
        "cache_memory_max_entries": 10_000,
        "cache_max_value_bytes": 1_048_576,
        "cache_near_max_entries": 10_000,
        "cache_wrap_timeout": 30.0,
    }

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._port = _CachePort(self)  # what each Cache may call back
        # Options are checked at construction, so Coordinator(...) refuses bad ones at once.
        self._sweep_interval = check_positive(
            self.option("cache_sweep_interval"), "cache_sweep_interval"
        )
        self._sweep_batch = check_int(
            self.option("cache_sweep_batch"), "cache_sweep_batch", minimum=1
        )
        self._max_entries = _check_optional_int(
            self.option("cache_max_entries"), "cache_max_entries"
        )
        self._memory_max = check_int(
            self.option("cache_memory_max_entries"), "cache_memory_max_entries", minimum=1
        )
        self._max_value_bytes = check_int(
            self.option("cache_max_value_bytes"), "cache_max_value_bytes", minimum=1
        )
        self._near_max = check_int(
            self.option("cache_near_max_entries"), "cache_near_max_entries", minimum=1
        )
        self._wrap_timeout = check_positive(self.option("cache_wrap_timeout"), "cache_wrap_timeout")
        self._queries = queries.build(runtime.schema)
        self._caches: dict[str, Cache] = {}
        self._memory: dict[str, MemoryStore] = {}
        self._near: dict[str, list[NearCache]] = {}
        self._flights: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._wrap_events: dict[tuple[str, str], asyncio.Event] = {}
        self._channel = runtime.channel("cache", "invalidate")
        self._notifier = Notifier(runtime, self._channel, self._queries)
        self._locks = ClusterLocks(runtime, self._queries)
        # Which namespaces this instance near-caches, as writers everywhere see it.
        self._registrations = Registrations(
            runtime, self._queries, lambda: list(self._near), self._drop_ns
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._listening = False
        self._seen_reconnects = 0
        # One sweeper per schema (all apps share the table, and expired rows are garbage to all).
        self._sweep_key = names.advisory_key(runtime.schema, "*", "cache", "sweep")

    # -- caches ----------------------------------------------------------------------------

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
    ) -> Cache:
        """Create the cache ``name`` (a plain call, no I/O).

        ``prefix`` (default: ``name``) is the key namespace; caches sharing a prefix share keys.
        ``store``: ``"postgres"`` (shared by every instance) or ``"memory"`` (this process only).
        ``ttl``: default seconds-to-live of entries (None or ``math.inf``: no expiry).
        ``local_ttl``: opt-in near cache (Postgres store only) holding entries in-process for at
        most that long (``math.inf``: until invalidated or expired in Postgres), invalidated
        across instances by NOTIFY on any write to the prefix, from any cache of any instance. ``max_entries``: size bound (default: the ``cache_max_entries`` or
        ``cache_memory_max_entries`` option). ``max_value_bytes``: limit of one encoded value.
        ``serializer``: an object with ``dumps``/``loads`` (default: strict JSON).
        Raises ``ValueError`` when ``name`` exists already (use :meth:`get_cache`).
        """
        check_key(name, "cache name")
        prefix = name if prefix is None else check_key(prefix, "prefix")
        if store not in STORES:
            raise InvalidInputError(f"store must be 'postgres' or 'memory'; got {store!r}")
        default_ttl = check_ttl(ttl)
        if default_ttl is not None and math.isinf(default_ttl):
            default_ttl = None  # inf: entries never expire, as with None
        near_ttl = check_ttl(local_ttl, "local_ttl")
        if near_ttl is not None and store != "postgres":
            raise InvalidInputError("local_ttl (near cache) applies to the postgres store only")
        bound = _check_optional_int(max_entries, "max_entries")
        limit = _check_optional_int(max_value_bytes, "max_value_bytes") or self._max_value_bytes
        if serializer is None:
            serializer = JsonCacheSerializer()
        elif not isinstance(serializer, CacheSerializer):
            raise InvalidTypeError(
                "serializer must have dumps(value) -> str and loads(str) methods"
            )
        if name in self._caches:
            raise InvalidInputError(f"cache {name!r} exists already; use get_cache({name!r})")
        ns = f"{self._rt.app}:{prefix}"
        backend: Store
        near: NearCache | None = None
        if store == "memory":
            bound = bound or self._memory_max
            memory = self._memory.get(ns)
            if memory is None:
                memory = self._memory[ns] = MemoryStore(bound)
            backend = memory
        else:
            bound = bound or self._max_entries
            backend = PostgresStore(self._rt, self._queries, ns)
            if near_ttl is not None:
                near = NearCache(near_ttl, self._near_max, serializer.loads)
                self._near.setdefault(ns, []).append(near)
        cache = Cache(
            self._port,
            name=name,
            prefix=prefix,
            ns=ns,
            store_kind=store,
            store=backend,
            ttl=default_ttl,
            serializer=serializer,
            max_value_bytes=limit,
            max_entries=bound,
            near=near,
        )
        self._caches[name] = cache
        return cache

    def get_cache(self, name: str) -> Cache:
        """The cache created as ``name``; raises :class:`CacheNotFoundError` (a ``KeyError``)."""
        if name == self._rt.app and name not in self._caches:
            return self.default_cache
        try:
            return self._caches[name]
        except KeyError:
            raise CacheNotFoundError(
                f"no cache named {name!r}; create it with create_cache"
            ) from None

    @property
    def default_cache(self) -> Cache:
        """The cache named after the app (``coord.cache``), created on first use."""
        cache = self._caches.get(self._rt.app)
        if cache is None:
            cache = self.create_cache(self._rt.app)
        return cache

    @property
    def caches(self) -> dict[str, Cache]:
        """The caches created so far, by name (a copy)."""
        return dict(self._caches)

    async def flush_all(self) -> None:
        """Empty every cache of this app: all its Postgres rows (whichever instance created the
        cache), this process's memory caches, and every instance's near caches."""
        for memory in self._memory.values():
            await memory.reset()
        app = self._rt.app
        async with self._rt.connection("cache flush_all") as conn:
            # ':' < ';' in the C collation, so this is exactly the namespaces "<app>:...".
            await conn.execute(self._queries.flush_app, (f"{app}:", f"{app};"))
        self._clear_near()
        await self._notifier.send([("a",)])

    # -- near cache plumbing ---------------------------------------------------------------

    def _listening_ok(self) -> bool:
        """Can invalidations reach this instance now? Only while LISTEN is up and no reconnect
        went unseen."""
        rt = self._rt
        if not self._listening or not rt.running:
            return False
        listener = rt.listener
        if not listener.connected:
            return False
        if listener.reconnects != self._seen_reconnects:
            # Notifications sent while the listener was down are lost: start afresh. Done here
            # too (not only in on_reconnect) so nothing is served between reconnect and hook.
            self._seen_reconnects = listener.reconnects
            self._clear_near()
            self._registrations.forget()  # a crash may have emptied the table: confirm again
        return True

    def _near_usable(self, ns: str) -> bool:
        """May near caches of ``ns`` serve now (no I/O)?"""
        # In this order: a reconnect noticed by _listening_ok withdraws every registration.
        return self._listening_ok() and self._registrations.valid(ns)

    async def _near_ready(self, ns: str) -> bool:
        """May near caches of ``ns`` serve now? Also registers ``ns`` first when needed."""
        if not self._listening_ok():
            return False
        return await self._registrations.ready(ns) and self._listening_ok()

    def _near_marker_ns(self, ns: str) -> str:
        """The namespace of ``ns``'s near-cache registrations (for tests and operators)."""
        return marker_ns(ns)

    def _drop_ns(self, ns: str) -> None:
        self._invalidate_local(ns, None)

    def _clear_near(self) -> None:
        for nears in self._near.values():
            for near in nears:
                near.clear()

    def _invalidate_local(self, ns: str, keys: list[str] | None) -> None:
        for near in self._near.get(ns, ()):
            if keys is None:
                near.clear()
            else:
                near.invalidate(keys)

    async def _invalidate(self, ns: str, keys: list[str], remote: bool) -> None:
        self._invalidate_local(ns, keys)
        if remote:
            await self._notifier.send([("k", ns, key) for key in keys])

    async def _invalidate_ns(self, ns: str, remote: bool) -> None:
        self._invalidate_local(ns, None)
        if remote:
            await self._notifier.send([("n", ns)])

    def _on_notify(self, channel: str, payload: str) -> None:
        try:
            message = messages.unpack(payload)
        except ValueError:
            log.warning("pgcoord cache: ignoring a malformed notification on %s", channel)
            return
        own = message.instance == self._rt.instance_id
        for op in message.ops:
            kind = op[0] if op else None
            if kind == "w" and len(op) == 3:
                event = self._wrap_events.get((op[1], op[2]))
                if event is not None:
                    event.set()
            elif _OP_SIZES.get(kind) != len(op):
                # A newer version's op or a forgery: say so, and apply the rest.
                log.warning(
                    "pgcoord cache: ignoring an unknown operation on %s: %.200r", channel, op
                )
            elif own:
                continue  # this instance already applied its own writes locally
            elif kind == "k":
                self._invalidate_local(op[1], [op[2]])
            elif kind == "n":
                self._invalidate_local(op[1], None)
            else:
                self._clear_near()

    # -- single flight -----------------------------------------------------------------------

    async def _single_flight(
        self, cache: Cache, key: str, fn: Callable[[], Any], ttl: float | None
    ) -> Any:
        flight = (cache.ns, key)
        task = self._flights.get(flight)
        if task is None:
            task = asyncio.create_task(self._lead(cache, key, fn, ttl))
            self._flights[flight] = task
            task.add_done_callback(lambda t: self._flight_done(flight, t))
        # Shielded: one caller giving up must not cancel the computation the others wait for.
        return await asyncio.shield(task)

    def _flight_done(self, flight: tuple[str, str], task: asyncio.Task[Any]) -> None:
        if self._flights.get(flight) is task:
            del self._flights[flight]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up

    async def _lead(self, cache: Cache, key: str, fn: Callable[[], Any], ttl: float | None) -> Any:
        if cache.store_kind == "memory":
            # One process: the in-process flight is the whole cluster.
            return await cache._compute(key, fn, ttl)
        lock_key = self._rt.advisory_key("cache", f"{cache.ns}\x00{key}")
        flight = (cache.ns, key)
        event = self._wrap_events.setdefault(flight, asyncio.Event())
        poll = Backoff(_WRAP_POLL_FIRST, _WRAP_POLL_MAX, jitter=0.0)
        give_up = asyncio.get_running_loop().time() + self._wrap_timeout
        try:
            while True:
                event.clear()
                if await self._locks.try_lock(lock_key):
                    try:
                        # Re-check: another instance may have stored it just before we locked.
                        value = await cache._lookup(key)
                        if value is MISSING:
                            value = await cache._compute(key, fn, ttl)
                        return value
                    finally:
                        await self._locks.unlock(lock_key)
                        with contextlib.suppress(Exception):
                            await self._notifier.send([("w", cache.ns, key)])
                # Another instance computes: wait for its NOTIFY (or poll), then re-check.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), poll.next())
                value = await cache._lookup(key)
                if value is not MISSING:
                    return value
                if asyncio.get_running_loop().time() >= give_up:
                    # The holder may be frozen (a stopped process keeps its connection, and so
                    # its lock): stay live and compute here rather than wait forever.
                    log.warning(
                        "pgcoord cache: wrap(%r) waited %.1f s for another instance; computing",
                        key,
                        self._wrap_timeout,
                    )
                    return await cache._compute(key, fn, ttl)
        finally:
            if self._wrap_events.get(flight) is event:
                del self._wrap_events[flight]

    # -- sweeping --------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete expired rows (if no other instance is sweeping) and enforce size bounds of this
        instance's Postgres caches; return the number of rows deleted. Runs on its own every
        ``cache_sweep_interval`` seconds; call it to sweep now."""
        deleted = 0
        async with self._rt.connection("cache sweep") as conn:
            deleted += await self._sweep_expired(conn)
            for cache in list(self._caches.values()):
                if cache.store_kind == "postgres" and cache.max_entries is not None:
                    deleted += await self._evict(conn, cache.ns, cache.max_entries)
        return deleted

    async def _locked(self, conn: psycopg.AsyncConnection[Any], key: int) -> bool:
        # Transaction-scoped (see try_xact_lock in queries.sql for why never session-level).
        cur = await conn.execute(self._queries.try_xact_lock, (key,))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _sweep_expired(self, conn: psycopg.AsyncConnection[Any]) -> int:
        total = 0
        for _ in range(_SWEEP_MAX_BATCHES):
            # One short transaction per batch, so deletions commit as they go; another
            # instance may take over between batches, which only shares the work.
            async with conn.transaction():
                if not await self._locked(conn, self._sweep_key):
                    break  # another instance is sweeping right now
                cur = await conn.execute(self._queries.sweep, (self._sweep_batch,))
            total += max(cur.rowcount, 0)
            if cur.rowcount < self._sweep_batch:
                break
        return total

    async def _evict(self, conn: psycopg.AsyncConnection[Any], ns: str, bound: int) -> int:
        lock = names.advisory_key(self._rt.schema, "*", "cache-evict", ns)
        total = 0
        # Count and delete under one lock: two evictors counting the same excess would each
        # delete it, evicting twice as much as needed.
        async with conn.transaction():
            if not await self._locked(conn, lock):
                return 0
            cur = await conn.execute(self._queries.count, (ns,))
            row = await cur.fetchone()
            excess = (int(row[0]) if row else 0) - bound
            while excess > 0:
                n = min(excess, self._sweep_batch)
                cur = await conn.execute(self._queries.evict, {"ns": ns, "n": n})
                if cur.rowcount <= 0:
                    break
                total += cur.rowcount
                excess -= cur.rowcount
        if total:
            # Evicted keys are unknown here: drop the namespace from every near cache.
            self._invalidate_local(ns, None)
            with contextlib.suppress(Exception):
                await self._notifier.send([("n", ns)])
        return total

    async def _sweep_loop(self) -> None:
        while True:
            # Jitter: Coordinators started together (many apps in one process, a fleet after
            # a deploy) would otherwise sweep in lockstep, each round a burst that grows the
            # shared pool to its budget and keeps it from ever shrinking back.
            await asyncio.sleep(self._sweep_interval * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pgcoord cache sweep failed (retrying next interval): %s", exc)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        listener = self._rt.listener
        await listener.listen(self._channel, self._on_notify)
        self._seen_reconnects = listener.reconnects
        self._clear_near()
        self._listening = True
        self._registrations.start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="pgcoord-cache-sweeper")

    async def stop(self) -> None:
        self._listening = False
        self._clear_near()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        flights = list(self._flights.values())
        for task in flights:
            task.cancel()
        if flights:
            await asyncio.gather(*flights, return_exceptions=True)
        await self._registrations.stop()
        await self._notifier.close()
        await self._locks.close()
        with contextlib.suppress(Exception):
            await self._rt.listener.unlisten(self._channel, self._on_notify)

    async def on_reconnect(self) -> None:
        # Invalidations sent while the listener was down were missed.
        self._seen_reconnects = self._rt.listener.reconnects
        self._clear_near()
        self._registrations.forget()


__all__ = ["CacheManager"]


class _CachePort:
    """The :class:`~pgcoord.cache.cache.CacheHost` a :class:`CacheManager` gives its caches."""

    __slots__ = ("_m",)

    def __init__(self, manager: CacheManager) -> None:
        self._m = manager

    def near_usable(self, ns: str) -> bool:
        """May near caches of ``ns`` serve now (no I/O)?"""
        return self._m._near_usable(ns)

    async def near_ready(self, ns: str) -> bool:
        """May near caches of ``ns`` serve now, registering ``ns`` first if needed?"""
        return await self._m._near_ready(ns)

    async def invalidate(self, ns: str, keys: list[str], remote: bool) -> None:
        """Drop ``keys`` of ``ns`` from near caches (other instances' too when ``remote``)."""
        await self._m._invalidate(ns, keys, remote)

    async def invalidate_ns(self, ns: str, remote: bool) -> None:
        """Drop namespace ``ns`` from near caches (other instances' too when ``remote``)."""
        await self._m._invalidate_ns(ns, remote)

    async def single_flight(
        self, cache: Cache, key: str, fn: Callable[[], Any], ttl: float | None
    ) -> Any:
        """Compute ``key`` once across the cluster."""
        return await self._m._single_flight(cache, key, fn, ttl)
