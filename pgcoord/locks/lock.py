"""``Lock``: one held lock, its lease, its fencing token.

A lock lives in one of two places on the server, and moves at most once:

1. **On a session** (the first ``PROMOTE_AFTER`` seconds): a session advisory lock on a work
   connection borrowed for it, with ``idle_session_timeout`` as the lease. Taking and releasing
   it are read-only statements, as cheap as the raw advisory pair, and short critical sections
   (the common case) never leave this phase.
2. **As a lease row** (``lock_leases``): the lock is written down with the holding process's
   LISTEN session as its holder and ``expires_at`` on the server's clock as its lease; the
   advisory lock is let go and the connection goes back to the pool. Holding it costs nothing
   but the row, however many are held, and no entry of the server's shared lock table.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import inspect
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

import psycopg

from pgcoord.errors import LockError, LockLostError, PgcoordError
from pgcoord.locks import lease
from pgcoord.validation import check_callable

if TYPE_CHECKING:
    from pgcoord.locks.keygate import KeyGate

log = logging.getLogger("pgcoord.locks")

Connection = psycopg.AsyncConnection[Any]

#: A lock held this long moves from its session to a lease row (and its connection goes back).
#: Short enough that held locks cost connections only for a moment; long enough that ordinary
#: short critical sections are taken and released with two read-only statements.
PROMOTE_AFTER = 0.05

#: How soon a promotion that could not run (listener reconnecting) is tried again.
_PROMOTE_RETRY = 0.2


def _session_alive(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether the server still keeps ``conn``'s session (reads only what already arrived)."""
    pgconn = conn.pgconn
    try:
        pgconn.consume_input()
    except psycopg.Error:
        return False
    return not conn.closed and pgconn.status == psycopg.pq.ConnStatus.OK


class _Same(enum.Enum):
    SAME = "same"


#: ``extend()``/``run_exclusive()`` without a ttl keep the lock's current lease length.
SAME: Final = _Same.SAME


class _State(enum.Enum):
    HELD = "held"
    RELEASED = "released"
    LOST = "lost"


class LockHost(Protocol):
    """What a :class:`Lock` needs from the manager that made it (``LockManager`` implements it
    with a port object), so a held lock reaches none of the manager's internals."""

    def check_running(self) -> None:
        """Raise NotRunningError once the Coordinator stops."""

    def stopped(self) -> bool:
        """Whether the Coordinator is stopping or stopped."""

    def holder_identity(self) -> tuple[tuple[int, datetime.datetime], int] | None:
        """The LISTEN session a lease row names ((pid, backend start), generation), if up."""

    def holder_identity_generation(self) -> int | None:
        """Which listener connection the identity belongs to (None: none connected)."""

    def holder_pid(self) -> int | None:
        """The pid of this process's LISTEN session."""

    def hand_over(self, lock: Lock) -> bool:
        """Whether releasing ``lock`` may pass its session to the next task of this process."""

    def handed_over(self, lock: Lock, conn: Connection) -> None:
        """``lock`` was released by passing ``conn`` (still holding the key) on."""

    async def release(self, lock: Lock, conn: Connection | None) -> bool:
        """Let go on the server (session unlock or lease-row delete); False: it was gone."""

    async def extend(self, lock: Lock, conn: Connection | None, ttl: float | None) -> bool:
        """Restart the lease on the server; False when it had already ended."""

    async def promote(
        self,
        lock: Lock,
        conn: Connection,
        pid: int,
        start: datetime.datetime,
        left: float | None,
    ) -> bool:
        """Move the lock from its session to a lease row naming the LISTEN session."""

    def promoted(self, lock: Lock, conn: Connection) -> None:
        """The promotion committed: give the session back."""

    async def give_back(self, conn: Connection) -> None:
        """Return a session that holds nothing any more."""

    def lock_done(
        self, lock: Lock, conn: Connection | None, *, reuse: bool, yielded: bool = False
    ) -> None:
        """``lock`` ended (released or lost): forget it, return or close its session."""


class Lock:
    """A lock this instance holds (from ``LockManager.acquire``/``try_acquire``/``lock``).

    ``token`` is its fencing token: larger than every token issued before for this key anywhere in
    the cluster, including before a server crash. Pass it to whatever the lock protects and have
    that refuse writes carrying an older token.

    The lease: unless released or extended within ``ttl`` seconds of the last acquire/extend, the
    server lets another holder in, even if this process is frozen or cut off. ``lost`` turns true
    no later than that (this side counts conservatively, so it never believes it holds longer
    than the server grants), or at once when the holding session or process's LISTEN session
    ends. A lost lock cannot be extended (:class:`LockLostError`) and releasing it does nothing.
    """

    __slots__ = (
        "_acquired",
        "_busy",
        "_conn",
        "_deadline",
        "_gate",
        "_generation",
        "_idle",
        "_key",
        "_loop",
        "_manager",
        "_pending_loss",
        "_promoting",
        "_state",
        "_timer",
        "_token",
        "_ttl",
        "advisory_key",
        "channel",
        "wanted",
    )

    def __init__(
        self,
        manager: LockHost,
        key: str,
        advisory_key: int,
        channel: str,
        gate: KeyGate,
        conn: psycopg.AsyncConnection[Any],
        token: int,
        ttl: float | None,
        lease_start: float,
    ) -> None:
        self._manager = manager
        self._key = key
        #: The 64-bit PostgreSQL advisory key this lock maps to (see docs/locks.md).
        self.advisory_key = advisory_key
        #: The Postgres channel its release wakes waiters on.
        self.channel = channel
        self._gate = gate
        #: The session holding the advisory lock; None once promoted to a lease row.
        self._conn: psycopg.AsyncConnection[Any] | None = conn
        self._generation: int | None = None  # the listener connection a lease row names
        self._token = token
        self._ttl = ttl
        self._loop = asyncio.get_running_loop()
        self._deadline = lease.local_deadline(lease_start, ttl)
        self._acquired = lease_start
        self._state = _State.HELD
        self._busy = False  # a statement on this lock is in flight
        self._idle: asyncio.Event | None = None  # set when it ends, if another task waits
        self._timer: asyncio.TimerHandle | None = None
        self._promoting: asyncio.Task[None] | None = None
        self._pending_loss: tuple[str, int] | None = None
        #: Another instance was seen waiting for this key (bounds local hand-overs).
        self.wanted = False
        self._arm()

    # -- state -----------------------------------------------------------------------------

    @property
    def key(self) -> str:
        """The key this lock was acquired for."""
        return self._key

    @property
    def token(self) -> int:
        """The fencing token (strictly increasing per key across the cluster and restarts)."""
        return self._token

    @property
    def ttl(self) -> float | None:
        """The current lease length in seconds (None: no lease)."""
        return self._ttl

    @property
    def lost(self) -> bool:
        """True once the lease ended without a release (expired, or the session died)."""
        if self._state is _State.LOST:
            return True
        return self._state is _State.HELD and self._expired()

    @property
    def held(self) -> bool:
        """True while this lock is held: neither released nor lost."""
        return self._state is _State.HELD and not self._expired()

    @property
    def remaining(self) -> float | None:
        """Seconds left on the lease as this side counts it (None: no lease; 0 once over)."""
        if self._state is not _State.HELD:
            return 0.0
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - lease.now())

    @property
    def promoted(self) -> bool:
        """True once the lock is held by a lease row rather than by a session (see module doc)."""
        return self._state is _State.HELD and self._conn is None

    @property
    def backend_pid(self) -> int | None:
        """The server process whose session holds the lock: the borrowed session at first, the
        process's LISTEN session once promoted (None once released or lost)."""
        if self._state is not _State.HELD:
            return None
        if self._conn is not None:
            return self._conn.info.backend_pid
        return self._manager.holder_pid()

    def _holding(self) -> bool:
        # A method, not an inline comparison: the state changes across awaits.
        return self._state is _State.HELD

    def _lease_end_loop_time(self) -> float | None:
        """The lease's end on the event loop's clock (None: no ttl)."""
        if self._deadline is None:
            return None
        return self._loop.time() + (self._deadline - lease.now())

    def _expired(self) -> bool:
        return self._deadline is not None and lease.now() >= self._deadline

    # -- timers ----------------------------------------------------------------------------

    def _arm(self) -> None:
        # Deadlines are on lease.now(); the loop's timers only wake us up (if one fires late,
        # after a suspend, every check below still reads the right clock).
        left = None if self._deadline is None else self._deadline - lease.now()
        if self._conn is not None and (left is None or left > PROMOTE_AFTER):
            delay = max(0.0, self._acquired + PROMOTE_AFTER - lease.now())
            self._timer = self._loop.call_later(delay, self._start_promotion)
        elif left is not None:
            self._timer = self._loop.call_later(max(0.0, left), self._on_expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_expired(self) -> None:
        self._timer = None
        if not self._busy:  # a statement in flight settles the outcome itself
            self._lose("its ttl passed without extend or release")

    def _start_promotion(self) -> None:
        self._timer = None
        if self._holding() and self._conn is not None and self._promoting is None:
            self._promoting = self._loop.create_task(self._promote_quietly())

    async def promote_soon(self) -> None:
        """Promote now, in this lock's own task, and wait for it: a cancel of the caller (the
        manager making room, ``holders()``) cannot cut the promotion short half done."""
        if not self._holding() or self._conn is None:
            return
        if self._promoting is None:
            self._promoting = self._loop.create_task(self._promote_quietly())
        await asyncio.shield(self._promoting)

    async def _promote_quietly(self) -> None:
        try:
            await self.promote()
        except Exception:  # logged by promote; the lock is lost then
            pass
        finally:
            self._promoting = None

    def on_listener_lost(self) -> None:
        """The process's LISTEN session ended: a lease row naming it is free for anyone now."""
        if self._holding() and self._conn is None:
            self._lose_now_or_after(
                "the process's LISTEN session, which holds its lease row, ended"
            )

    def _lose_now_or_after(self, why: str, level: int = logging.WARNING) -> None:
        # A statement in flight settles the lock's fate first (a second _lose racing its end
        # would finish the lock twice); the loss is applied when it ends, if still held.
        if self._busy:
            self._pending_loss = (why, level)
        else:
            self._lose(why, level)

    def _lose(self, why: str, level: int = logging.WARNING) -> None:
        """The lease is over: drop the session (which frees the lock if it still held it)."""
        if self._state is not _State.HELD:
            return
        log.log(level, "pgcoord lock %r (token %s) lost: %s", self._key, self._token, why)
        self._state = _State.LOST
        self._finish(reuse=False)

    def _finish(self, *, reuse: bool) -> None:
        self._disarm()
        conn, self._conn = self._conn, None
        self._manager.lock_done(self, conn, reuse=reuse)

    def force_lost(self) -> None:
        """Called by the manager when the Coordinator stops: the lock ends with it."""
        self._lose_now_or_after("the Coordinator stopped", logging.INFO)

    async def _begin(self) -> None:
        """Start an operation: one statement at a time on this lock."""
        while self._busy:  # another task of this process is working on this lock
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()
        self._busy = True
        self._disarm()

    def _end(self) -> None:
        self._busy = False
        pending, self._pending_loss = self._pending_loss, None
        if pending is not None:
            self._lose(*pending)
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set()
        if self._state is _State.HELD and self._timer is None:
            self._arm()

    # -- promotion -------------------------------------------------------------------------

    async def promote(self) -> None:
        """Move the lock from its session to a lease row now (no-op once promoted or over).

        Called by a timer after ``PROMOTE_AFTER``, and by the manager when the connection is
        needed (the budget) or ``holders()`` should list it. It stays on its session while the
        process's LISTEN session is down (a lease row must name a live holder).
        """
        if not self._holding() or self._conn is None:
            return
        await self._begin()
        try:
            conn = self._conn
            if not self._holding() or conn is None:
                return
            if self._expired():
                self._lose("its ttl passed before it was promoted")
                return
            if self._manager.stopped():
                return  # stop() ends every lock; a row written now would outlive it
            identity = self._manager.holder_identity()
            if identity is None:
                # No live LISTEN session to name as holder: stay on the session, but make sure
                # it still exists (reading what the server sent resets no idle timer).
                if not _session_alive(conn):
                    self._lose("its session ended while the listener was reconnecting")
                    return
                self._timer = self._loop.call_later(_PROMOTE_RETRY, self._start_promotion)
                return
            (pid, start), generation = identity
            left = None if self._deadline is None else self._deadline - lease.now()
            try:
                promoted = await self._manager.promote(self, conn, pid, start, left)
            except asyncio.CancelledError:
                # The Coordinator is stopping: the session is closed, which frees the lock.
                self._lose("the Coordinator stopped while it was being promoted", logging.INFO)
                raise
            except BaseException as exc:
                self._lose(f"its session ended before it was promoted ({exc!r})")
                raise
            if not promoted:
                self._timer = self._loop.call_later(_PROMOTE_RETRY, self._start_promotion)
                return
            self._conn = None
            self._generation = generation
            self._manager.promoted(self, conn)
            if self._manager.holder_identity_generation() != generation:
                self.on_listener_lost()  # it ended while the promotion was under way
        finally:
            self._end()

    # -- operations ------------------------------------------------------------------------

    async def release(self) -> None:
        """Release the lock; idempotent, and a no-op once the lock was released or lost.

        It only ever frees this holding: the session goes back to the pool only after the
        unlock, and a lease row is deleted only while it still carries this lock's token.
        """
        if self._state is not _State.HELD:
            return
        await self._begin()
        try:
            if not self._holding():  # another task released it while this one waited
                return
            if self._expired():
                self._lose("its ttl passed before release")
                return
            conn = self._conn
            if conn is not None and self._manager.hand_over(self):
                # The next task of this process takes the session, still holding the key.
                self._state = _State.RELEASED
                self._disarm()
                self._conn = None
                self._manager.handed_over(self, conn)
                return
            try:
                released = await self._manager.release(self, self._conn)
            except BaseException as exc:
                self._lose(f"release failed ({exc!r})")
                if isinstance(exc, psycopg.Error | PgcoordError):
                    return  # the session or lease is gone, and the lock with it
                raise
            if not released:
                self._lose("the server no longer had it")
                return
            self._state = _State.RELEASED
            self._disarm()
            conn, self._conn = self._conn, None
            # Let go while a task of this process queues behind: it waits with the others.
            # Done before the await below, so a cancel there cannot leak the key's gate.
            self._manager.lock_done(self, None, reuse=True, yielded=self._gate.has_waiter())
            if conn is not None:
                # Back before the next acquisition of this task borrows: a busy loop keeps
                # reusing the same warm connection.
                await self._manager.give_back(conn)
        finally:
            self._end()

    async def extend(self, ttl: float | _Same | None = SAME) -> None:
        """Restart the lease with ``ttl`` seconds (default: the current length) from now.

        Raises :class:`LockLostError` when the lease already ended, :class:`LockError` when the
        lock was released, :class:`~pgcoord.errors.NotRunningError` after the Coordinator stopped.
        """
        new_ttl = self._ttl if ttl is SAME else lease.check_ttl(ttl)
        self._manager.check_running()
        await self._begin()
        try:
            if self._state is _State.RELEASED:
                raise LockError(f"the lock {self._key!r} was released; acquire it again")
            if self._state is _State.LOST or self._expired():
                self._lose("its ttl passed before extend")
                raise LockLostError(
                    f"the lock {self._key!r} (token {self._token}) was lost before extend: "
                    "its lease ended or its session died, and another holder may have it"
                )
            sent_at = lease.now()
            try:
                extended = await self._manager.extend(self, self._conn, new_ttl)
            except BaseException as exc:
                self._lose(f"extend failed ({exc!r})")
                if isinstance(exc, psycopg.Error | PgcoordError):
                    raise LockLostError(
                        f"the lock {self._key!r} (token {self._token}) was lost: its session "
                        f"or lease ended before the extend reached the server ({exc})"
                    ) from exc
                raise
            if not extended:
                self._lose("its lease ended before the extend reached the server")
                raise LockLostError(
                    f"the lock {self._key!r} (token {self._token}) was lost before extend"
                )
            # The server restarted the lease when it ran the statement, after sent_at.
            self._ttl = new_ttl
            self._deadline = lease.local_deadline(sent_at, new_ttl)
        finally:
            self._end()

    async def run_exclusive(self, fn: Callable[[], Any], ttl: float | _Same | None = SAME) -> Any:
        """Run ``fn()`` (sync or async, no arguments) under this lock, release it, return the result.

        With ``ttl`` the lease is first extended to that length. Raises :class:`LockLostError`
        before calling ``fn`` when the lock is already lost, and after ``fn`` returns when the
        lease ended while it ran (its result is then discarded: its work was not exclusive).
        """
        check_callable(fn, "fn")
        if ttl is not SAME:
            await self.extend(ttl)
        else:
            self._manager.check_running()
            if self._state is _State.RELEASED:
                raise LockError(f"the lock {self._key!r} was released; acquire it again")
            if self.lost:
                self._lose("its ttl passed before run_exclusive")
                raise LockLostError(f"the lock {self._key!r} (token {self._token}) was lost")
        return await self._run(fn)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (already validated) while held, then release; see :meth:`run_exclusive`."""
        try:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
        except BaseException:
            await self.release()
            raise
        await self._release_checked()
        return result

    async def _release_checked(self) -> None:
        """Release, raising :class:`LockLostError` when the lease ended before the release."""
        if self.lost:
            self._lose("its ttl passed while it was held")
            self._manager.check_running()  # stopping the Coordinator ended it: say so
            raise LockLostError(
                f"the lock {self._key!r} (token {self._token}) was lost while held: its lease "
                "ended (ttl passed or session died) before the release, so another holder may "
                "have run concurrently"
            )
        await self.release()
        if self._state is _State.LOST:
            raise LockLostError(
                f"the lock {self._key!r} (token {self._token}) was lost before its release"
            )

    async def _stop_promotion(self) -> None:
        task = self._promoting
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> Lock:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self._release_checked()
        else:
            await self.release()

    def __repr__(self) -> str:
        where = "lease" if self._conn is None else "session"
        return f"<pgcoord.Lock {self._key!r} token={self._token} {self._state.value} ({where})>"
