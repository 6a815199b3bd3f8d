"""``Lock``: one held lock, its lease, its fencing token."""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import psycopg

from pgcoord.errors import LockError, LockLostError
from pgcoord.locks import lease
from pgcoord.validation import check_callable

if TYPE_CHECKING:
    from pgcoord.locks.connections import LockConnection
    from pgcoord.locks.keygate import KeyGate
    from pgcoord.locks.manager import LockManager

log = logging.getLogger("pgcoord.locks")


#: A held lock's socket is watched only once the lock has been held this long, so short critical
#: sections (the common case) never pay the two system calls a watch costs; a session that dies
#: is still noticed far within the second the API promises.
WATCH_DELAY = 0.05


class _Same(enum.Enum):
    SAME = "same"


#: ``extend()``/``run_exclusive()`` without a ttl keep the lock's current lease length.
SAME: Final = _Same.SAME


class _State(enum.Enum):
    HELD = "held"
    RELEASED = "released"
    LOST = "lost"


class Lock:
    """A lock this instance holds (from ``LockManager.acquire``/``try_acquire``/``lock``).

    ``token`` is its fencing token: larger than every token issued before for this key anywhere in
    the cluster, including before a server crash. Pass it to whatever the lock protects and have
    that refuse writes carrying an older token.

    The lease: unless released or extended within ``ttl`` seconds of the last acquire/extend, the
    server ends the holder's session, which frees the lock for others even if this process is
    frozen or cut off. ``lost`` turns true no later than that (this side counts conservatively, so
    it never believes it holds longer than the server grants), or at once when the session dies. A lost lock cannot be extended (:class:`LockLostError`) and releasing it does
    nothing.
    """

    __slots__ = (
        "_acquired",
        "_busy",
        "_deadline",
        "_gate",
        "_idle",
        "_key",
        "_lconn",
        "_loop",
        "_manager",
        "_state",
        "_timer",
        "_token",
        "_ttl",
        "advisory_key",
    )

    def __init__(
        self,
        manager: LockManager,
        key: str,
        advisory_key: int,
        gate: KeyGate,
        lconn: LockConnection,
        token: int,
        ttl: float | None,
        lease_start: float,
    ) -> None:
        self._manager = manager
        self._key = key
        #: The 64-bit PostgreSQL advisory key this lock maps to (see docs/locks.md).
        self.advisory_key = advisory_key
        self._gate = gate
        self._lconn: LockConnection | None = lconn
        self._token = token
        self._ttl = ttl
        self._loop = asyncio.get_running_loop()
        self._deadline = lease.local_deadline(lease_start, ttl)
        self._acquired = lease.now()
        self._state = _State.HELD
        self._busy = False  # a release/extend statement is in flight
        self._idle: asyncio.Event | None = None  # set when it ends, if another task waits
        self._timer: asyncio.TimerHandle | None = None
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
    def backend_pid(self) -> int | None:
        """The server process whose session holds the lock (None once released or lost)."""
        return self._lconn.backend_pid if self._lconn is not None else None

    def _holding(self) -> bool:
        # A method, not an inline comparison: the state changes across awaits.
        return self._state is _State.HELD

    def _expired(self) -> bool:
        return self._deadline is not None and lease.now() >= self._deadline

    # -- lease watch -----------------------------------------------------------------------

    def _arm(self) -> None:
        # Deadlines are on lease.now(); the loop's timers only wake us up (if one fires late,
        # after a suspend, every check below still reads the right clock).
        left = None if self._deadline is None else self._deadline - lease.now()
        if left is not None and left <= WATCH_DELAY:
            self._timer = self._loop.call_later(left, self._on_expired)
        else:
            self._timer = self._loop.call_later(WATCH_DELAY, self._watch)

    def _watch(self) -> None:
        self._timer = None
        if self._lconn is None or self._busy:  # pragma: no cover - an op disarms first
            return
        self._lconn.watch(self._on_broken)
        if self._deadline is not None:
            self._timer = self._loop.call_later(self._deadline - lease.now(), self._on_expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lconn is not None:
            self._lconn.unwatch()

    def _on_expired(self) -> None:
        self._timer = None
        if not self._busy:  # a statement in flight settles the outcome itself
            self._lose("its ttl passed without extend or release")

    def _on_broken(self) -> None:
        if not self._busy:
            self._lose("its database session ended")

    def _lose(self, why: str, level: int = logging.WARNING) -> None:
        """The lease is over: drop the session (which frees the lock if it still held it)."""
        if self._state is not _State.HELD:
            return
        log.log(level, "pgcoord lock %r (token %s) lost: %s", self._key, self._token, why)
        self._state = _State.LOST
        self._finish(reuse=False)

    def _finish(self, *, reuse: bool) -> None:
        self._disarm()
        lconn, self._lconn = self._lconn, None
        if lconn is not None:
            self._manager._connection_done(lconn, reuse=reuse)
        self._manager._lock_done(self)

    def _force_lost(self) -> None:
        """Called by the manager when the Coordinator stops: the lock ends with it."""
        self._lose("the Coordinator stopped", logging.INFO)

    async def _begin(self) -> None:
        """Start an operation: one statement at a time on the lock's session."""
        while self._busy:  # another task of this process is releasing/extending this lock
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()
        self._busy = True
        self._disarm()

    def _end(self) -> None:
        self._busy = False
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set()

    # -- operations ------------------------------------------------------------------------

    async def release(self) -> None:
        """Release the lock; idempotent, and a no-op once the lock was released or lost.

        It only ever frees this holding: the session that held it goes back to the pool only
        after the unlock, and a Lock never touches a session after that.
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
            lconn = self._lconn
            assert lconn is not None
            try:
                cur = await lconn.conn.execute(
                    self._manager._queries.release, (self.advisory_key,), binary=True
                )
                row = await cur.fetchone()
            except BaseException as exc:
                self._lose(f"release failed ({exc!r})")
                if isinstance(exc, psycopg.Error):
                    return  # the session is gone, and the lock with it: nothing left to release
                raise
            if not row or not row[0]:
                self._lose("the session no longer held it")
                return
            self._state = _State.RELEASED
            self._finish(reuse=True)
        finally:
            self._end()

    async def extend(self, ttl: float | _Same | None = SAME) -> None:
        """Restart the lease with ``ttl`` seconds (default: the current length) from now.

        Raises :class:`LockLostError` when the lease already ended, :class:`LockError` when the
        lock was released, :class:`~pgcoord.errors.NotRunningError` after the Coordinator stopped.
        """
        new_ttl = self._ttl if ttl is SAME else lease.check_ttl(ttl)
        self._manager._check_running()
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
            lconn = self._lconn
            assert lconn is not None
            sent_at = lease.now()
            # The holder row now differs from what the next acquisition on this session expects.
            lconn.registered = None
            try:
                await lconn.conn.execute(
                    self._manager._queries.extend,
                    (lease.server_ttl_ms(new_ttl), sent_at - self._acquired),
                )
            except BaseException as exc:
                self._lose(f"extend failed ({exc!r})")
                if isinstance(exc, psycopg.Error):
                    raise LockLostError(
                        f"the lock {self._key!r} (token {self._token}) was lost: its session "
                        f"ended before the extend reached the server ({exc})"
                    ) from exc
                raise
            # The server restarted its idle timer when it ran the statement, after sent_at.
            self._ttl = new_ttl
            self._deadline = lease.local_deadline(sent_at, new_ttl)
        finally:
            self._end()
            if self._state is _State.HELD:
                self._arm()

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
            self._manager._check_running()
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
            self._manager._check_running()  # stopping the Coordinator ended it: say so
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
        return f"<pgcoord.Lock {self._key!r} token={self._token} {self._state.value}>"
