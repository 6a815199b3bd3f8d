"""``LockManager``: distributed locks that hold no connection, with server-decided leases.

How a lock is taken (one round trip when uncontended): this process's gate for the key (one
task per key on the server at a time; the others queue here, FIFO), then a work connection from
the process's budget, then one read-only statement that takes the session advisory lock, checks
that no lease row holds the key, arms the session's lease and draws the fencing token. After
``PROMOTE_AFTER`` the lock becomes a lease row and the connection goes back (see lock.py).

Nobody waits on the server. A contender that finds the key held marks it ``wanted`` in its
lease row and sleeps until a NOTIFY on the key's channel (sent by a release that finds the
mark), the holder's lease end, or ``lock_recheck`` seconds (which notices a holder whose process
died, or an ``xact_lock`` that committed), whichever comes first. See docs/locks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import random
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import psycopg

from pgcoord import _driver, _prepared
from pgcoord._deadline import Bounded
from pgcoord._retry import Backoff, TaskSet
from pgcoord.errors import ConnectionFailedError, LockAcquireError, LockLostError, NotRunningError
from pgcoord.locks import lease
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

#: While another instance waits for a key, this process hands it to its own next task at most
#: this many times in a row before letting it go to the cluster (bounded unfairness: local
#: hand-overs cost one round trip instead of two, and keep contended locks fast).
LOCAL_HANDOFFS = 8

#: How soon after marking a key a waiter looks once more, for a release whose check of the mark
#: ran in the instant before the mark committed (it then sent no NOTIFY).
_LATE_CHECK = 0.02
#: Seconds a try sent just before a try_acquire deadline may still take to be answered.
LAST_TRY = 0.5

#: How long a task that the local holder let go past waits for the other instance's turn.
YIELD_PAUSE = 0.02

#: The baton saying "the previous holder let the lock go to the cluster: queue like the others".
_YIELDED = object()

#: How many work connections fresh (not yet promoted) locks may use at once, by default.
DEFAULT_SESSIONS = 2

#: Every LockManager of the process, so ``holders()`` can promote this process's fresh locks.
_MANAGERS: weakref.WeakSet[LockManager] = weakref.WeakSet()

Connection = psycopg.AsyncConnection[Any]

# Parameter formats of the hot statements: (ttl text, key bigint) and (key, key).
_ACQUIRE_FORMATS = (_prepared.TEXT_FORMAT, _prepared.BINARY_FORMAT)
_UNLOCK_FORMATS = (_prepared.BINARY_FORMAT, _prepared.BINARY_FORMAT)


@dataclass(frozen=True)
class HotStatements:
    """The two statements every uncontended lock runs, sent through libpq directly
    (:mod:`pgcoord._prepared`: psycopg's cursor layer costs a third of a round trip)."""

    acquire_warm: _prepared.Statement
    unlock: _prepared.Statement

    @classmethod
    def of(cls, queries: LockQueries) -> HotStatements:
        """The hot statements of one schema's rendered queries."""
        return cls(
            acquire_warm=_prepared.Statement(
                "lock_acquire", queries.acquire_warm, (_prepared.TEXT, _prepared.INT8)
            ),
            unlock=_prepared.Statement(
                "lock_unlock", queries.unlock, (_prepared.INT8, _prepared.INT8)
            ),
        )


@dataclass(frozen=True)
class LockHolder:
    """One held lock, as ``LockManager.holders()`` reports it."""

    #: The lock's key.
    key: str
    #: The holding Coordinator's ``instance_id``.
    instance_id: str
    #: When it was acquired (Unix time, seconds, server clock).
    since: float | None
    #: The lease length in seconds (None: no lease).
    ttl: float | None
    #: Seconds until the server ends the lease if the holder stays silent (None: no lease).
    expires_in: float | None
    #: The server process of the holding process's LISTEN session.
    pid: int


class LockManager(Service):
    """Distributed locks for every instance of the app (``coord.lock_manager``).

    ``acquire`` waits, ``try_acquire`` gives up after ``timeout`` seconds (0: at once),
    ``run_exclusive`` runs a function under a lock, ``lock`` is the ``async with`` form and
    ``xact_lock`` takes a lock inside your own transaction. Every ``ttl`` is a lease the server
    decides (default 30 s; ``None``: no lease). A held lock costs no connection once it is
    ``PROMOTE_AFTER`` old. Options: ``lock_max_connections`` (default: all but one of the work
    connections, at most 2) bounds the work connections lending themselves to fresh locks at once (older
    ones are promoted to make room; default 2); ``lock_recheck`` (default 1 s) is how often a waiter
    looks again without a wake-up; ``lock_sweep_interval`` (default 60 s) is how often each
    instance deletes lease rows nobody will release (a dead or frozen holder's, a mark on a
    free key). ``lock_key_connections`` and ``lock_idle_timeout`` are
    still accepted and validated, and no longer needed.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "lock_max_connections": None,
        "lock_recheck": 1.0,
        "lock_key_connections": 1,
        "lock_idle_timeout": 10.0,
        "lock_sweep_interval": 60.0,
    }

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        cap = self.option("lock_max_connections")
        self._max_sessions = (
            None if cap is None else check_int(cap, "lock_max_connections", minimum=1)
        )
        self._recheck = check_positive(self.option("lock_recheck"), "lock_recheck")
        check_int(self.option("lock_key_connections"), "lock_key_connections", minimum=1)
        check_positive(self.option("lock_idle_timeout"), "lock_idle_timeout")
        self._sweep_interval = check_positive(
            self.option("lock_sweep_interval"), "lock_sweep_interval", finite=True
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._queries = LockQueries.for_schema(runtime.schema)
        self._hot = HotStatements.of(self._queries)
        self._port = _LockPort(self)  # what each Lock may call back
        # One task per key on the server: the session holding a key re-enters it, so tasks
        # of this process are kept apart here, FIFO.
        self._gates = KeyGates(1, self._orphaned)
        self._advisory_keys: dict[str, int] = {}
        self._channels: dict[str, str] = {}
        self._held: set[Lock] = set()
        self._sessions: dict[Lock, None] = {}  # held on a session, oldest first
        self._wakeups: dict[str, asyncio.Event] = {}  # channel -> the waiting task's event
        # The token epoch each work session saw (see acquire_warm in queries.sql).
        self._epochs: weakref.WeakKeyDictionary[Connection, int] = weakref.WeakKeyDictionary()
        self._stopping = False
        self._tasks = TaskSet("locks")
        _MANAGERS.add(self)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = False
        self._rt.listener.add_lost_hook(self._on_listener_lost)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        self._stopping = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(BaseException):
                await sweeper
        with contextlib.suppress(NotRunningError):
            self._rt.listener.remove_lost_hook(self._on_listener_lost)
        for event in self._wakeups.values():
            event.set()  # waiters see the stop and raise
        held = list(self._held)
        for lock in held:
            await lock._stop_promotion()
        for lock in held:
            lock.force_lost()  # sessions are closed, which frees their advisory locks
        # Free this instance's lease rows now rather than leaving the others to wait for the
        # ttl: all of them, also one a promotion cancelled by the stop had just committed.
        try:
            async with self._rt.connection("locks stop") as conn:
                cur = await conn.execute(self._queries.release_instance, (self._rt.instance_id,))
                wanted = [name for name, was_wanted in await cur.fetchall() if was_wanted]
                if wanted:
                    await conn.execute(
                        self._queries.notify_many, ([self._channel(n) for n in wanted],)
                    )
        except Exception:
            log.warning("pgcoord: could not free this instance's lease rows at stop")
        await self._tasks.wait()

    async def _sweep(self) -> int:
        """Delete lease rows that hold nothing any more (a dead holder's, an ended lease's, a
        mark on a free key); return how many. Runs every ``lock_sweep_interval`` seconds on
        every instance; see docs/locks.md, "Rows left behind"."""
        # Private: a public method would need its blocking twin (pgcoord/blocking_managers.py).
        self._check_running()

        async def delete(conn: Connection) -> int:
            cur = await conn.execute(self._queries.sweep)
            return max(cur.rowcount, 0)

        return await self._rt.run("locks sweep", delete, idempotent=True)

    async def _sweep_forever(self) -> None:
        while True:
            # Jittered like the cache's sweep: instances started together do not sweep in
            # lockstep, and several sweeping at once only share the work.
            await asyncio.sleep(self._sweep_interval * random.uniform(0.8, 1.2))
            if self._stopped():
                continue
            try:
                deleted = await self._sweep()
            except Exception as exc:
                log.warning("pgcoord: sweeping lock_leases failed: %s", exc)
            else:
                if deleted:
                    log.debug("pgcoord: swept %d lock_leases rows that held nothing", deleted)

    def _check_running(self) -> None:
        if self._stopped():
            raise NotRunningError(
                "the pgcoord Coordinator is not running (not started yet, or stopped); "
                "its locks ended when it stopped"
            )

    def _stopped(self) -> bool:
        return self._stopping or not self._rt.running

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
            baton = gate.take_baton()
            if isinstance(baton, psycopg.AsyncConnection):
                lock = await self._take_over(name, advisory_key, gate, ttl_s, baton)
                if lock is not None:
                    return lock
            return await self._take(
                name, advisory_key, gate, ttl_s, deadline, queue=baton is _YIELDED
            )
        except BaseException:
            gate.exit()
            self._gates.leave(advisory_key, gate)
            raise

    async def _take_over(
        self, name: str, advisory_key: int, gate: KeyGate, ttl: float | None, conn: Connection
    ) -> Lock | None:
        """Take the lock from the session the previous local holder handed over (still locked)."""
        channel = self._channel(name)
        sent_at = lease.now()
        epoch = self._epochs.get(conn)
        query = self._queries.take_over if epoch is None else self._queries.take_over_warm
        try:
            async with self._bound(conn, f"lock acquire {name!r}"):
                cur = await conn.execute(
                    query, (str(lease.server_ttl_ms(ttl)), advisory_key), binary=True
                )
                row = await cur.fetchone()
        except BaseException as exc:
            await self._discard(conn)  # closing the session lets the lock go
            if isinstance(exc, psycopg.Error | ConnectionFailedError):
                return None  # take it the ordinary way (which retries a failed connection)
            raise
        if self._stopped() or row is None:
            await self._discard(conn)
            self._check_running()
            return None
        lock = Lock(
            self._port,
            name,
            advisory_key,
            channel,
            gate,
            conn,
            self._token(conn, row[0], epoch),
            ttl,
            sent_at,
        )
        lock.wanted = bool(row[2])
        self._held.add(lock)
        self._sessions[lock] = None
        return lock

    def _token(self, conn: Connection, drawn: int, epoch: int | None) -> int:
        """The fencing token from what a statement drew: whole, or without the epoch this
        session is known to have (which a whole one teaches it)."""
        if epoch is not None:
            return (epoch << lease.TOKEN_EPOCH_SHIFT) + int(drawn)
        self._epochs[conn] = int(drawn) >> lease.TOKEN_EPOCH_SHIFT
        return int(drawn)

    def _hand_over(self, lock: Lock) -> bool:
        """Whether ``lock``'s release may pass its session to the next task of this process."""
        gate = lock._gate
        if not gate.has_waiter():
            return False
        if lock.wanted and gate.streak >= LOCAL_HANDOFFS:
            return False  # another instance has waited long enough
        gate.streak += 1
        return True

    def _handed_over(self, lock: Lock, conn: Connection) -> None:
        """``lock`` was released by passing ``conn`` (still holding the key) to the next task."""
        self._held.discard(lock)
        self._sessions.pop(lock, None)
        lock._gate.exit(conn)
        self._gates.leave(lock.advisory_key, lock._gate)

    def _orphaned(self, baton: object) -> None:
        # A session handed to a task that gave up, with nobody behind it: closing it lets go.
        if isinstance(baton, psycopg.AsyncConnection):
            task = asyncio.get_running_loop().create_task(self._discard(baton))
            task.add_done_callback(_log_failure)

    async def _take(
        self,
        name: str,
        advisory_key: int,
        gate: KeyGate,
        ttl: float | None,
        deadline: float | None,
        *,
        queue: bool = False,
    ) -> Lock:
        loop = asyncio.get_running_loop()
        only_try = deadline is not None and deadline <= loop.time()
        channel = self._channel(name)
        ttl_ms = lease.server_ttl_ms(ttl)
        # A single try (timeout 0) still waits for a connection: the budget being in use says
        # nothing about the lock.
        conn_deadline = None if only_try else deadline
        wakeup: asyncio.Event | None = None
        # Retries after connection failures: 50 ms doubling to 1 s, for connect_timeout.
        retry = Backoff(0.05, 1.0, jitter=0.0, immediate=True, budget=self._rt.connect_timeout)
        late_check = False
        try:
            if queue and not only_try:
                # The previous local holder let the lock go because another instance waits:
                # give that one its turn (its NOTIFY, then its try) instead of racing it.
                wakeup = asyncio.Event()
                self._wakeups[channel] = wakeup
                await self._listen(channel, deadline, name)
                await self._sleep(wakeup, YIELD_PAUSE, deadline, name)
            while True:
                try:
                    lock, expires_in, newly_wanted = await self._attempt(
                        name,
                        advisory_key,
                        channel,
                        gate,
                        ttl,
                        ttl_ms,
                        conn_deadline,
                        deadline,
                        wakeup is not None,
                    )
                except ConnectionFailedError:
                    # A pooled session died (server restart, terminate): the pool replaces it.
                    # Go on trying for as long as the connect timeout lets the server come back.
                    if self._stopped() or not await _pause(retry, deadline):
                        raise
                    continue
                retry.reset()
                if lock is not None:
                    gate.streak = 0  # had from the server: local hand-overs count afresh
                    return lock
                if only_try:
                    raise LockAcquireError(f"the lock {name!r} is held by another holder")
                if wakeup is None:
                    # Listen before marking the key: a release that sees the mark must find us
                    # listening. Then try again at once, this time leaving the mark.
                    wakeup = asyncio.Event()
                    self._wakeups[channel] = wakeup
                    await self._listen(channel, deadline, name)
                    continue
                if newly_wanted:
                    # A release may have run between our try and our mark (try again now), or
                    # while the mark committed (it could not see it: try again shortly).
                    late_check = True
                    continue
                if late_check:
                    late_check = False
                    expires_in = _LATE_CHECK if expires_in is None else min(expires_in, _LATE_CHECK)
                await self._sleep(wakeup, expires_in, deadline, name)
        finally:
            if wakeup is not None:
                self._wakeups.pop(channel, None)
                # Not awaited: a cancel arriving here must not undo an acquisition that has
                # already been granted (the Lock would be held with nobody to release it).
                self._background(self._rt.listener.unlisten(channel, self._on_wakeup))

    async def _attempt(
        self,
        name: str,
        advisory_key: int,
        channel: str,
        gate: KeyGate,
        ttl: float | None,
        ttl_ms: int,
        deadline: float | None,
        until: float | None,
        mark: bool,
    ) -> tuple[Lock | None, float | None, bool]:
        """One try on the server: (the lock, None, False) or (None, holder's lease left, newly
        marked). ``deadline`` bounds the wait for a connection."""
        self._check_running()
        if len(self._sessions) >= self._session_cap():  # checked here: this path is hot
            try:
                async with asyncio.timeout_at(None if until is None else until + LAST_TRY):
                    await self._make_room()
            except TimeoutError:
                raise LockAcquireError(
                    f"the lock {name!r} was not acquired in time: this process's earlier locks "
                    "were still being moved off the connections it needs"
                ) from None
        try:
            if deadline is None:
                conn = await self._rt.acquire()
            else:
                async with asyncio.timeout_at(deadline):
                    conn = await self._rt.acquire()
        except ConnectionFailedError:
            self._check_running()  # the pool closed under us because the Coordinator stopped
            raise
        except TimeoutError:
            raise LockAcquireError(
                f"the lock {name!r} was not acquired in time: no database connection came free "
                "(the process's connection budget is in use)"
            ) from None
        sent_at = lease.now()
        epoch: int | None = None
        # The try_acquire timeout bounds the statement too, not only the wait for it; a try
        # sent just before the deadline still gets a round trip's worth of time to answer.
        until = None if until is None else max(until, loop_time() + LAST_TRY)
        bound = self._bound(conn, f"lock acquire {name!r}", until)
        try:
            async with bound:
                token, expires_in, newly, epoch = await self._try_on(
                    conn, advisory_key, ttl_ms, mark
                )
        except BaseException as exc:
            # Cancelled or failed mid-statement: the lock may or may not have been granted.
            # Closing the session settles it (a closed session holds nothing).
            await self._discard(conn)
            if bound.fired and until is not None and until <= loop_time():
                raise LockAcquireError(
                    f"the lock {name!r} was not acquired in time: the server did not answer ({exc})"
                ) from exc
            if isinstance(exc, psycopg.Error):
                raise _driver.translate(exc, self._rt.dsn) from exc
            raise
        if token is None:
            await self._rt.release(conn)
            return None, None if expires_in is None else float(expires_in), bool(newly)
        if self._stopped():
            # stop() ran while the statement was under way: a Lock handed out now would outlive
            # the Coordinator. Closing the session frees it.
            await self._discard(conn)
            raise NotRunningError(f"the pgcoord Coordinator stopped while acquiring {name!r}")
        token = self._token(conn, token, epoch)
        lock = Lock(self._port, name, advisory_key, channel, gate, conn, token, ttl, sent_at)
        self._held.add(lock)
        self._sessions[lock] = None
        return lock, None, False

    async def _try_on(
        self, conn: Connection, advisory_key: int, ttl_ms: int, mark: bool
    ) -> tuple[int | None, float | None, bool, int | None]:
        """The try statement: (drawn token or None, lease left, newly marked, known epoch)."""
        if mark:
            cur = await conn.execute(
                self._queries.acquire_waiting, (advisory_key, ttl_ms), binary=True
            )
            token, expires_in, newly = await cur.fetchone() or (None, None, False)
            return token, expires_in, newly, None
        epoch = self._epochs.get(conn)
        if epoch is not None:
            # The hot path (a session that knows the epoch): straight through libpq.
            result = await _prepared.run(
                conn,
                self._hot.acquire_warm,
                (str(ttl_ms).encode(), _prepared.int8(advisory_key)),
                _ACQUIRE_FORMATS,
            )
            return _prepared.read_int8(result.get_value(0, 0)), None, False, epoch
        cur = await conn.execute(self._queries.acquire, (str(ttl_ms), advisory_key), binary=True)
        row = await cur.fetchone()
        return (row[0] if row else None), None, False, None

    async def _listen(self, channel: str, deadline: float | None, name: str) -> None:
        """LISTEN for the key's releases, within the try_acquire deadline if there is one."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._rt.listener.listen(channel, self._on_wakeup)
        except TimeoutError:
            raise LockAcquireError(
                f"the lock {name!r} was not acquired in time: it is held, and LISTEN for its "
                "release did not complete (is the listener's connection stalled?)"
            ) from None

    def _bound(self, conn: Connection, what: str, until: float | None = None) -> Bounded:
        """A bound on one step on a lock's session: ``command_timeout``, or ``until`` (event
        loop time) when sooner."""
        deadline = self._rt.step_deadline()
        if until is not None and until < deadline:
            deadline = until
        return Bounded(conn, deadline, what, self._rt.dsn)

    async def _sleep(
        self,
        wakeup: asyncio.Event,
        expires_in: float | None,
        deadline: float | None,
        name: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        wait = self._recheck if expires_in is None else min(self._recheck, max(0.0, expires_in))
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise LockAcquireError(f"the lock {name!r} was not acquired in time")
            wait = min(wait, left)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), wait)
        wakeup.clear()
        self._check_running()

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(work)

    def _on_wakeup(self, channel: str, _payload: str) -> None:
        event = self._wakeups.get(channel)
        if event is not None:
            event.set()

    async def _make_room(self) -> None:
        """Promote the oldest session-held locks while they use the connections others need."""
        cap = self._session_cap()
        while len(self._sessions) >= cap:
            oldest = next(iter(self._sessions))
            await oldest.promote_soon()
            if oldest in self._sessions:
                break  # could not promote now (listener down): wait for a connection instead

    async def _discard(self, conn: Connection) -> None:
        _driver.end_session(conn)
        with contextlib.suppress(Exception):
            await self._rt.release(conn)

    def _channel(self, name: str) -> str:
        # Hashed like the advisory key, and as hot: cached the same way.
        channel = self._channels.get(name)
        if channel is None:
            if len(self._channels) >= _ADVISORY_CACHE:
                self._channels.clear()
            channel = self._channels[name] = self._rt.channel(SERVICE_TAG, name)
        return channel

    def _advisory(self, name: str) -> int:
        # Hot keys are re-taken constantly; the hash is cached (bounded: cleared when full).
        key = self._advisory_keys.get(name)
        if key is None:
            if len(self._advisory_keys) >= _ADVISORY_CACHE:
                self._advisory_keys.clear()
            key = self._advisory_keys[name] = self._rt.advisory_key(SERVICE_TAG, name)
        return key

    # -- called by Lock --------------------------------------------------------------------

    def _holder_identity(self) -> tuple[tuple[int, datetime.datetime], int] | None:
        listener = self._rt.listener
        identity = listener.identity
        if identity is None or not listener.connected:
            return None
        return identity, listener.generation

    def _holder_identity_generation(self) -> int | None:
        listener = self._rt.listener
        return listener.generation if listener.connected else None

    def _holder_pid(self) -> int | None:
        identity = self._rt.listener.identity
        return None if identity is None else identity[0]

    async def _promote(
        self,
        lock: Lock,
        conn: Connection,
        pid: int,
        start: datetime.datetime,
        left: float | None,
    ) -> bool:
        q = self._queries
        params = (
            lock.advisory_key,
            lock.token,
            self._rt.app,
            lock.key,
            self._rt.instance_id,
            pid,
            start,
            lease.server_ttl_ms(lock.ttl),
            # Rounded up: the server evaluates expires_at after the client computed `left`, so
            # the server's lease still ends no earlier than the client's deadline.
            None if left is None else max(0, math.ceil(left * 1000.0)),
            max(0.0, lease.now() - lock._acquired),
        )
        # Two statements in one round trip: the lease row commits, then the advisory lock goes.
        # The sync between them matters: statements of a pipeline not separated by a sync run
        # in one implicit transaction, and the (session-level) unlock would take effect before
        # the row committed, letting another session in between.
        async with (
            self._bound(conn, f"lock promotion {lock.key!r}", lock._lease_end_loop_time()),
            conn.pipeline() as pipeline,
        ):
            cur = await conn.execute(q.promote, params)
            await pipeline.sync()
            unlocked = await conn.execute(q.unlock_promoted, (lock.advisory_key, lock.token))
        row = await cur.fetchone()
        promoted = bool(row and row[0])
        if promoted and await unlocked.fetchone() is None:
            # The row vanished between the two statements: the session may still hold the
            # key; raising makes the caller close it rather than pool it.
            raise LockLostError(f"the lease row of {lock.key!r} vanished while it was promoted")
        return promoted

    def _promoted(self, lock: Lock, conn: Connection) -> None:
        self._sessions.pop(lock, None)
        task = asyncio.get_running_loop().create_task(self._rt.release(conn))
        task.add_done_callback(_log_failure)

    async def _release(self, lock: Lock, conn: Connection | None) -> bool:
        q = self._queries
        if conn is not None:
            # Bounded: past it the session is closed, which lets the lock go just the same.
            async with self._bound(conn, f"lock release {lock.key!r}"):
                key = _prepared.int8(lock.advisory_key)
                result = await _prepared.run(conn, self._hot.unlock, (key, key), _UNLOCK_FORMATS)
                if _prepared.read_bool(result.get_value(0, 2)):
                    # Contended: clear the mark and NOTIFY the waiters.
                    await conn.execute(q.wake_waiters, (lock.advisory_key, lock.channel))
            return _prepared.read_bool(result.get_value(0, 0))

        async def release_lease(pooled: Connection) -> bool:
            cur = await pooled.execute(
                q.release_lease, (lock.advisory_key, lock.token, lock.channel), binary=True
            )
            row = await cur.fetchone()
            return bool(row and row[0])

        # Not idempotent (a second run finds no row and would call the lock lost): retried
        # only when the server says the statement was never read.
        return await self._rt.run(f"lock release {lock.key!r}", release_lease)

    async def _extend(self, lock: Lock, conn: Connection | None, ttl: float | None) -> bool:
        q = self._queries
        ttl_ms = lease.server_ttl_ms(ttl)
        # An extend that cannot reach the server before the lease ends is over by then: the
        # lock is lost whatever the server would have answered.
        until = lock._lease_end_loop_time()
        what = f"lock extend {lock.key!r}"
        if conn is not None:
            async with self._bound(conn, what, until):
                await conn.execute(q.extend_session, (str(ttl_ms),))
            return True
        left = None if until is None else until - asyncio.get_running_loop().time()
        timeout = self._rt.command_timeout if left is None else min(left, self._rt.command_timeout)

        async def extend_lease(pooled: Connection) -> bool:
            cur = await pooled.execute(
                q.extend_lease, (ttl_ms, ttl, lock.advisory_key, lock.token), binary=True
            )
            return await cur.fetchone() is not None

        # Idempotent: a second run restarts the same lease from a later moment.
        return await self._rt.run(what, extend_lease, timeout=max(0.0, timeout), idempotent=True)

    async def _give_back(self, conn: Connection) -> None:
        await self._rt.release(conn)

    def _lock_done(
        self, lock: Lock, conn: Connection | None, *, reuse: bool, yielded: bool = False
    ) -> None:
        self._held.discard(lock)
        self._sessions.pop(lock, None)
        if conn is not None:
            loop = asyncio.get_running_loop()
            put = self._rt.release(conn) if reuse else self._discard(conn)
            loop.create_task(put).add_done_callback(_log_failure)
        gate = lock._gate
        gate.exit(_YIELDED if yielded else None)
        self._gates.leave(lock.advisory_key, gate)

    def _on_listener_lost(self) -> None:
        for lock in list(self._held):
            lock.on_listener_lost()

    # -- transaction-scoped locks ----------------------------------------------------------

    async def xact_lock(self, key: str, *, transaction: Any) -> None:
        """Take ``key``'s lock inside the caller's transaction (``pg_advisory_xact_lock``).

        Waits until it is free; it is released when that transaction commits or rolls back.
        It excludes holders of ``acquire``/``lock`` on the same key too (waiting out a promoted
        lease needs READ COMMITTED; see docs/locks.md). A sync connection would block the event
        loop while it waits: use :meth:`xact_lock_sync` for those.
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

    # -- observability ---------------------------------------------------------------------

    async def holders(self) -> list[LockHolder]:
        """Every lock of this app held right now, by any instance (oldest first).

        This process's own locks are promoted first, so all of them are listed; another
        process's lock younger than ``PROMOTE_AFTER`` (still on its session) is not.
        """
        self._check_running()
        for manager in list(_MANAGERS):
            if manager._same_server(self):
                for lock in list(manager._sessions):
                    await lock.promote_soon()

        async def read(conn: Connection) -> list[tuple[Any, ...]]:
            cur = await conn.execute(self._queries.holders, (self._rt.app,))
            return await cur.fetchall()

        rows = await self._rt.run("locks holders", read, idempotent=True)
        holders = []
        for name, instance_id, pid, ttl_ms, since, expires_in in rows:
            holders.append(
                LockHolder(
                    key=name,
                    instance_id=instance_id,
                    since=None if since is None else float(since),
                    ttl=ttl_ms / 1000.0 if ttl_ms else None,  # 0 ms is "no lease"
                    expires_in=None if expires_in is None else max(0.0, float(expires_in)),
                    pid=int(pid),
                )
            )
        return holders

    def _same_server(self, other: LockManager) -> bool:
        return (
            not self._stopped()
            and self._rt.dsn == other._rt.dsn
            and self._rt.schema == other._rt.schema
        )

    def connection_stats(self) -> dict[str, int]:
        """This process's lock connections: ``open`` (lent to fresh locks), ``idle`` (always 0:
        none are kept), ``max`` (the cap on ``open``) and ``held`` locks."""
        cap = self._session_cap() if self._rt.running else 0
        return {"open": len(self._sessions), "idle": 0, "max": cap, "held": len(self._held)}

    def _session_cap(self) -> int:
        # By default two, and always one work connection short of the pool: fresh locks never
        # take every connection from the other services, and holding many costs at most two.
        if self._max_sessions is not None:
            return self._max_sessions
        return max(1, min(DEFAULT_SESSIONS, self._rt.work_capacity - 1))


def loop_time() -> float:
    """The running event loop's clock (deadlines of lock calls are on it)."""
    return asyncio.get_running_loop().time()


async def _pause(retry: Backoff, deadline: float | None) -> bool:
    """Sleep before the next try after a connection failure (the first retry is immediate);
    False when the retry budget or the caller's ``deadline`` is spent."""
    delay = retry.next()
    if delay is None or (deadline is not None and loop_time() >= deadline):
        return False
    await asyncio.sleep(delay)
    return True


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("pgcoord: returning a lock connection failed", exc_info=task.exception())


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


class _LockPort:
    """The :class:`~pgcoord.locks.lock.LockHost` a :class:`LockManager` gives its locks."""

    __slots__ = ("_m",)

    def __init__(self, manager: LockManager) -> None:
        self._m = manager

    def check_running(self) -> None:
        """Raise NotRunningError once the Coordinator stops."""
        self._m._check_running()

    def stopped(self) -> bool:
        """Whether the Coordinator is stopping or stopped."""
        return self._m._stopped()

    def holder_identity(self) -> tuple[tuple[int, datetime.datetime], int] | None:
        """The LISTEN session a lease row names, if up."""
        return self._m._holder_identity()

    def holder_identity_generation(self) -> int | None:
        """Which listener connection the identity belongs to."""
        return self._m._holder_identity_generation()

    def holder_pid(self) -> int | None:
        """The pid of this process's LISTEN session."""
        return self._m._holder_pid()

    def hand_over(self, lock: Lock) -> bool:
        """Whether releasing ``lock`` may pass its session on."""
        return self._m._hand_over(lock)

    def handed_over(self, lock: Lock, conn: Connection) -> None:
        """``lock`` was released by passing ``conn`` on."""
        self._m._handed_over(lock, conn)

    async def release(self, lock: Lock, conn: Connection | None) -> bool:
        """Let go on the server."""
        return await self._m._release(lock, conn)

    async def extend(self, lock: Lock, conn: Connection | None, ttl: float | None) -> bool:
        """Restart the lease on the server."""
        return await self._m._extend(lock, conn, ttl)

    async def promote(
        self,
        lock: Lock,
        conn: Connection,
        pid: int,
        start: datetime.datetime,
        left: float | None,
    ) -> bool:
        """Move the lock to a lease row."""
        return await self._m._promote(lock, conn, pid, start, left)

    def promoted(self, lock: Lock, conn: Connection) -> None:
        """The promotion committed."""
        self._m._promoted(lock, conn)

    async def give_back(self, conn: Connection) -> None:
        """Return a session that holds nothing any more."""
        await self._m._give_back(conn)

    def lock_done(
        self, lock: Lock, conn: Connection | None, *, reuse: bool, yielded: bool = False
    ) -> None:
        """``lock`` ended: forget it, return or close its session."""
        self._m._lock_done(lock, conn, reuse=reuse, yielded=yielded)
