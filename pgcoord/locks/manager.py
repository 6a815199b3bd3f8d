"""``LockManager``: distributed locks on PostgreSQL advisory locks, with server-enforced leases.

How a lock is taken (one round trip when uncontended): this process's gate for the key (which
bounds the connections one key may use), then a dedicated connection from the lock budget, then
one statement on it that takes the session-level advisory lock (waiting in the server's FIFO
queue, no polling), arms ``idle_session_timeout`` as the lease and draws the fencing token. The
first acquisition on a session calls the ``lock_acquire`` function (it also records the holder
and reads the token epoch); re-taking the same key on a warm session is a plain statement that
writes nothing. See docs/locks.md for the decisions and their reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import psycopg

from pgcoord import _driver
from pgcoord.errors import ConnectionFailedError, LockAcquireError, NotRunningError
from pgcoord.locks import lease
from pgcoord.locks.connections import LockConnection, LockConnections
from pgcoord.locks.keygate import KeyGate, KeyGates
from pgcoord.locks.lock import Lock
from pgcoord.locks.queries import LockQueries
from pgcoord.runtime import Runtime, Service
from pgcoord.transaction import check_transaction, execute, execute_sync
from pgcoord.validation import check_callable, check_int, check_key, check_positive

log = logging.getLogger("pgcoord.locks")

#: The service tag in the advisory key mapping (``Runtime.advisory_key``).
SERVICE_TAG = "locks"

_ADVISORY_CACHE = 4096

# Backoff while the server comes back after a waiting session was lost.
_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0

# How long stop() waits for acquisitions it cancelled on the server to come back.
_STOP_WAIT = 5.0


@dataclass(frozen=True)
class LockHolder:
    """One held lock, as ``LockManager.holders()`` reports it."""

    #: The lock's key.
    key: str
    #: The holding Coordinator's ``instance_id``.
    instance_id: str
    #: When it was acquired (Unix time, seconds, server clock; None without the permission to
    #: read the holder's ``pg_stat_activity`` row).
    since: float | None
    #: The lease length in seconds (None: no lease).
    ttl: float | None
    #: Seconds until the server ends the lease if the holder stays silent (None: no lease, or
    #: not visible).
    expires_in: float | None
    #: The server process of the holding session.
    pid: int


class LockManager(Service):
    """Distributed locks for every instance of the app (``coord.lock_manager``).

    ``acquire`` waits, ``try_acquire`` gives up after ``timeout`` seconds (0: at once),
    ``run_exclusive`` runs a function under a lock, ``lock`` is the ``async with`` form and
    ``xact_lock`` takes a lock inside your own transaction. Every ``ttl`` is a lease the server
    enforces (default 30 s; ``None``: no lease). Options: ``lock_max_connections`` (default 10)
    bounds the connections this process uses for held and waiting locks;
    ``lock_key_connections`` (default 2) bounds those one key may use (its holder plus queued
    waiters; further tasks queue in-process); ``lock_idle_timeout`` (default 10 s) closes lock
    connections unused that long.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "lock_max_connections": 10,
        "lock_key_connections": 2,
        "lock_idle_timeout": 10.0,
    }

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._max_connections = check_int(
            self.option("lock_max_connections"), "lock_max_connections", minimum=1
        )
        key_connections = check_int(
            self.option("lock_key_connections"), "lock_key_connections", minimum=1
        )
        self._idle_timeout = check_positive(self.option("lock_idle_timeout"), "lock_idle_timeout")
        self._queries = LockQueries.for_schema(runtime.schema)
        self._gates = KeyGates(key_connections)
        self._advisory_keys: dict[str, int] = {}
        self._connections: LockConnections | None = None
        self._held: set[Lock] = set()
        self._waiting: set[LockConnection] = set()
        self._waiting_done = asyncio.Event()  # set when the last server-side wait ended
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        assert self._rt.dsn is not None
        self._stopping = False
        self._connections = LockConnections(
            self._rt.dsn,
            max_size=self._max_connections,
            idle_timeout=self._idle_timeout,
            connect_timeout=self._rt.connect_timeout,
            app=self._rt.app,
            instance_id=self._rt.instance_id,
        )
        async with self._rt.connection() as conn:
            await conn.execute(self._queries.prune)

    async def _stop(self) -> None:
        self._stopping = True
        for lock in list(self._held):
            lock._force_lost()
        # Acquisitions blocked on the server: cancel their statements so they end now.
        for lconn in list(self._waiting):
            with contextlib.suppress(Exception):
                await lconn.conn.cancel_safe(timeout=_STOP_WAIT)
        if self._waiting:
            self._waiting_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waiting_done.wait(), _STOP_WAIT)
        if self._connections is not None:
            await self._connections.close()

    def _check_running(self) -> None:
        if self._stopped():
            raise NotRunningError(
                "the pgcoord Coordinator is not running (not started yet, or stopped); "
                "its locks ended when it stopped"
            )

    # -- acquiring -------------------------------------------------------------------------

    async def acquire(self, key: str, ttl: float | None = lease.DEFAULT_TTL) -> Lock:
        """Wait until the lock for ``key`` is free, take it and return the held :class:`Lock`."""
        return await self._acquire(key, ttl, None)

    async def try_acquire(
        self, key: str, timeout: float = 0.0, ttl: float | None = lease.DEFAULT_TTL
    ) -> Lock:
        """Take the lock for ``key`` if it is had within ``timeout`` seconds (0: only try).

        Raises :class:`~pgcoord.errors.LockAcquireError` otherwise.
        """
        return await self._acquire(key, ttl, lease.check_timeout(timeout))

    def lock(self, key: str, ttl: float | None = lease.DEFAULT_TTL) -> LockContext:
        """``async with lock_manager.lock(key, ttl=...) as lock:`` — acquire, then release.

        Leaving the block raises :class:`~pgcoord.errors.LockLostError` when the lease ended
        while the block ran (unless the block raised an error of its own).
        """
        return LockContext(self, key, ttl)

    async def run_exclusive(
        self, key: str, fn: Callable[[], Any], ttl: float | None = lease.DEFAULT_TTL
    ) -> Any:
        """Acquire ``key``, run ``fn()`` (sync or async, no arguments), release; return its result.

        Raises :class:`~pgcoord.errors.LockLostError` after ``fn`` returns when the lease ended
        while it ran.
        """
        check_callable(fn, "fn")
        lock = await self._acquire(key, ttl, None)
        return await lock._run(fn)

    async def _acquire(self, key: object, ttl: object, timeout: float | None) -> Lock:
        name = check_key(key)
        ttl_s = lease.check_ttl(ttl)
        self._check_running()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        advisory_key = self._advisory(name)
        gate = self._gates.join(advisory_key)
        try:
            passed = await gate.enter(deadline)
        except BaseException:
            self._gates.leave(advisory_key, gate)
            raise
        if not passed:
            self._gates.leave(advisory_key, gate)
            raise LockAcquireError(
                f"the lock {name!r} was not acquired within {timeout:g} s: another task of "
                "this process holds it or waits for it"
            )
        try:
            return await self._acquire_on_server(name, advisory_key, gate, ttl_s, deadline)
        except BaseException:
            gate.exit()
            self._gates.leave(advisory_key, gate)
            raise

    async def _acquire_on_server(
        self,
        name: str,
        advisory_key: int,
        gate: KeyGate,
        ttl: float | None,
        deadline: float | None,
    ) -> Lock:
        connections = self._connections
        assert connections is not None
        loop = asyncio.get_running_loop()
        recovering_since: float | None = None  # when a waiting session was lost (restart?)
        backoff = _RETRY_FIRST
        while True:
            try:
                lconn = await connections.get(deadline)
            except ConnectionFailedError:
                if not self._may_retry(recovering_since, deadline):
                    raise
                await asyncio.sleep(backoff)  # the server is coming back: wait for it
                backoff = min(backoff * 2, _RETRY_MAX)
                continue
            if lconn is not None and self._stopped():
                # stop() ran while this acquisition waited for or opened a connection.
                connections.discard(lconn)
                raise self._stopped_error(name)
            if lconn is None:
                raise LockAcquireError(
                    f"the lock {name!r} was not acquired in time: all {connections.max_size} "
                    "lock connections of this process are in use (raise lock_max_connections)"
                )
            ttl_ms = lease.server_ttl_ms(ttl)
            # The holder row is written only when this session last served another key or lease.
            registered = lconn.registered == (advisory_key, ttl_ms)
            epoch = lconn.epoch
            query: str
            params: tuple[object, ...]
            if registered and epoch is not None and deadline is None:
                # The common case (re-taking a key, waiting as long as it takes): one plain
                # statement, cheaper than the lock_acquire function.
                query, params = self._queries.acquire_fast, (advisory_key, str(ttl_ms))
            else:
                epoch = None
                remaining = None if deadline is None else deadline - loop.time()
                wait_ms = lease.server_wait_ms(remaining)
                query = self._queries.acquire
                params = (advisory_key, wait_ms, ttl_ms, None if registered else name)
            self._waiting.add(lconn)
            sent_at = lease.now()
            try:
                # Binary results: the token and the wait need no text parsing.
                cur = await lconn.conn.execute(query, params, binary=True)
                row = await cur.fetchone()
            except psycopg.errors.LockNotAvailable:
                self._not_waiting(lconn)
                await self._after_lock_timeout(lconn)
                row = None
            except psycopg.Error as exc:
                self._not_waiting(lconn)
                connections.discard(lconn)
                if self._stopped():
                    raise self._stopped_error(name) from exc
                error = _driver.translate(exc, self._rt.dsn)
                if isinstance(error, ConnectionFailedError):
                    # The session died (server restart?) before it got the lock, and its idle
                    # siblings most likely with it: go on waiting on a fresh connection, for as
                    # long as the connect timeout allows the server to come back.
                    connections.drop_idle()
                    if recovering_since is None:
                        recovering_since = loop.time()
                        continue
                    if self._may_retry(recovering_since, deadline):
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, _RETRY_MAX)
                        continue
                raise error from exc
            except BaseException:
                # Cancelled mid-statement: the lock may or may not have been granted. Closing
                # the session settles it (a closed session holds nothing).
                self._not_waiting(lconn)
                connections.discard(lconn)
                raise
            self._not_waiting(lconn)
            if self._stopped():
                # stop() ran while the statement was under way and the lock was granted all
                # the same: a Lock handed out now would outlive the Coordinator. Closing the
                # session frees it.
                connections.discard(lconn)
                raise self._stopped_error(name)
            if row is None or row[0] is None:
                if row is not None:
                    connections.put(lconn)
                raise LockAcquireError(f"the lock {name!r} is held by another holder")
            token: int = row[0]
            if epoch is not None:
                token += epoch << lease.TOKEN_EPOCH_SHIFT
            lconn.registered = (advisory_key, ttl_ms)
            lconn.epoch = token >> lease.TOKEN_EPOCH_SHIFT
            # The lease runs from the end of the statement, which was at least `waited` after
            # it was sent: counting from there keeps the client's deadline before the server's.
            # (Capped by the client's own elapsed time, in case the server's clock was stepped.)
            waited = min(float(row[1]), lease.now() - sent_at)
            lock = Lock(self, name, advisory_key, gate, lconn, token, ttl, sent_at + waited)
            self._held.add(lock)
            return lock

    def _stopped(self) -> bool:
        return self._stopping or not self._rt.running

    @staticmethod
    def _stopped_error(name: str) -> NotRunningError:
        return NotRunningError(f"the pgcoord Coordinator stopped while acquiring the lock {name!r}")

    def _may_retry(self, recovering_since: float | None, deadline: float | None) -> bool:
        """Whether an acquisition that lost its session may try again after a connection error."""
        if recovering_since is None or self._stopped():
            return False  # a first failure to connect is the caller's to see, at once
        now = asyncio.get_running_loop().time()
        if deadline is not None and now >= deadline:
            return False
        return now - recovering_since < self._rt.connect_timeout

    async def _after_lock_timeout(self, lconn: LockConnection) -> None:
        """Make a session whose wait hit ``lock_timeout`` fit for reuse, or drop it.

        ``lock_timeout`` can fire just as the lock is granted; PostgreSQL then reports the
        timeout but keeps the lock, and a session-level lock survives the failed statement. So
        the session lets go of whatever it may hold before it goes back to the pool.
        """
        connections = self._connections
        assert connections is not None
        try:
            await lconn.conn.execute(self._queries.unlock_all)
        except psycopg.Error:
            connections.discard(lconn)  # closing the session frees its locks too
            return
        except BaseException:
            connections.discard(lconn)
            raise
        connections.put(lconn)

    def _not_waiting(self, lconn: LockConnection) -> None:
        self._waiting.discard(lconn)
        if not self._waiting:
            self._waiting_done.set()

    # -- called by Lock --------------------------------------------------------------------

    def _connection_done(self, lconn: LockConnection, *, reuse: bool) -> None:
        connections = self._connections
        if connections is None:  # pragma: no cover - a Lock exists only after _start
            return
        if reuse:
            connections.put(lconn)
        else:
            connections.discard(lconn)

    def _lock_done(self, lock: Lock) -> None:
        self._held.discard(lock)
        gate = lock._gate
        gate.exit()
        self._gates.leave(lock.advisory_key, gate)

    # -- transaction-scoped locks ----------------------------------------------------------

    async def xact_lock(self, key: str, *, transaction: Any) -> None:
        """Take ``key``'s lock inside the caller's transaction (``pg_advisory_xact_lock``).

        Waits until it is free; it is released when that transaction commits or rolls back.
        It excludes holders of ``acquire``/``lock`` on the same key too. A sync connection would
        block the event loop while it waits: use :meth:`xact_lock_sync` for those.
        """
        name = check_key(key)
        check_transaction(transaction)
        self._check_running()
        await execute(transaction, self._queries.xact_lock, (self._advisory(name),))

    def xact_lock_sync(self, key: str, *, transaction: Any) -> None:
        """Blocking twin of :meth:`xact_lock`, for a sync connection or session.

        A plain method: it waits in the calling thread (the blocking API runs it there too, not
        on the Coordinator's loop), so it blocks that thread only.
        """
        name = check_key(key)
        check_transaction(transaction)
        self._check_running()
        execute_sync(transaction, self._queries.xact_lock, (self._advisory(name),))

    def _advisory(self, name: str) -> int:
        # Hot keys are re-taken constantly; the hash is cached (bounded: cleared when full).
        key = self._advisory_keys.get(name)
        if key is None:
            if len(self._advisory_keys) >= _ADVISORY_CACHE:
                self._advisory_keys.clear()
            key = self._advisory_keys[name] = self._rt.advisory_key(SERVICE_TAG, name)
        return key

    # -- observability ---------------------------------------------------------------------

    async def holders(self) -> list[LockHolder]:
        """Every lock of this app held right now, by any instance (oldest first).

        Only live holders are listed: a row is shown only while the holding session still holds
        the advisory lock in ``pg_locks``.
        """
        self._check_running()
        async with self._rt.connection() as conn:
            cur = await conn.execute(self._queries.holders, (self._rt.app,))
            rows = await cur.fetchall()
        holders = []
        for name, instance_id, pid, ttl_ms, since, idle_for in rows:
            ttl = ttl_ms / 1000.0 if ttl_ms else None  # 0 ms is "no lease"
            expires_in = None
            if ttl is not None and idle_for is not None:
                expires_in = max(0.0, ttl - float(idle_for))
            holders.append(
                LockHolder(
                    key=name,
                    instance_id=instance_id,
                    since=None if since is None else float(since),
                    ttl=ttl,
                    expires_in=expires_in,
                    pid=int(pid),
                )
            )
        return holders

    def connection_stats(self) -> dict[str, int]:
        """This process's lock connections: ``open``, ``idle``, ``max`` and ``held`` locks."""
        connections = self._connections
        return {
            "open": connections.size if connections else 0,
            "idle": connections.idle if connections else 0,
            "max": self._max_connections,
            "held": len(self._held),
        }


class LockContext:
    """What :meth:`LockManager.lock` returns: an async context manager yielding the Lock."""

    def __init__(self, manager: LockManager, key: object, ttl: object) -> None:
        # Validate now, so a bad argument fails where it was written, before any I/O.
        self._manager = manager
        self._key = check_key(key)
        self._ttl = lease.check_ttl(ttl)
        self._lock: Lock | None = None

    async def __aenter__(self) -> Lock:
        self._lock = await self._manager.acquire(self._key, self._ttl)
        return self._lock

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            await lock.__aexit__(exc_type, exc, tb)
