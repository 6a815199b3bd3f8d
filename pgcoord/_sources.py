"""Where work connections come from: a psycopg pool (pgcoord's own or the caller's ``pool=``)
or the pool of a SQLAlchemy ``Engine`` or ``AsyncEngine`` (``engine=``).

Every source lends autocommit psycopg ``AsyncConnection``s, because services run their
statements as they are and expect each to commit on its own. A connection that arrives with
autocommit off (a caller's pool, an engine's) is switched while pgcoord has it and switched
back on its way home, so the owner gets it back as it lent it. A few recently returned
connections are kept warm out of the source for a moment (:mod:`pgcoord._kept`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.pq
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgcoord import _driver
from pgcoord._deadline import Connection
from pgcoord._kept import Conn, KeptConnections
from pgcoord.errors import ConnectionFailedError, InvalidInputError, InvalidTypeError

#: The SQLAlchemy driver ``engine=`` accepts (``postgresql+psycopg``, sync or async).
SUPPORTED_DRIVER = "postgresql+psycopg"


#: Seconds ``close()`` waits for each of the pool's background workers.
CLOSE_TIMEOUT = 0.5


class WorkSource:
    """Lends autocommit connections and takes them back; see the module docstring."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._kept = KeptConnections(self._give_back, self._waiting)
        self._switched: set[int] = set()  # ids of connections switched to autocommit

    @property
    def capacity(self) -> int:
        """How many connections this source lends pgcoord at once at most."""
        raise NotImplementedError

    async def acquire(self, timeout: float | None = None) -> Conn:
        """An autocommit connection (a kept warm one when there is), waiting for one at most
        ``timeout`` seconds (default: the source's own timeout)."""
        conn = self._kept.take()
        if conn is None:
            conn = await self._bounded_borrow(timeout)
            # A pooled connection the server closed while it sat idle (a restart, a
            # terminate) is found here, before anything is sent on it: callers then never
            # need to retry an operation that may already have happened.
            for _ in range(self.capacity):
                if not _driver.went_away(conn):
                    break
                _driver.end_session(conn)
                await self._return(conn)  # the source discards a closed connection
                conn = await self._bounded_borrow(timeout)
            if not conn.autocommit:
                try:
                    await conn.set_autocommit(True)
                except BaseException:
                    await self._return(conn)
                    raise
                self._switched.add(id(conn))
        return conn

    async def release(self, conn: Conn, *, keep: bool = True) -> None:
        """Take back a connection from :meth:`acquire` (kept warm for a moment if ``keep``)."""
        if keep and self._kept.keep(conn):
            return
        await self._give_back(conn)

    async def close(self) -> None:
        """Give kept connections back (a source owning its pool also closes it)."""
        await self._kept.close()

    async def _give_back(self, conn: Conn) -> None:
        if id(conn) in self._switched:
            self._switched.discard(id(conn))
            if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    await conn.set_autocommit(False)
        await self._return(conn)

    async def _bounded_borrow(self, timeout: float | None) -> Conn:
        # The source's own wait has its timeout, but a liveness check the host configured
        # (pool_pre_ping, psycopg_pool's check) runs a statement no timeout covers.
        if timeout is None:
            return await self._borrow(None)
        try:
            async with asyncio.timeout(timeout):
                return await self._borrow(timeout)
        except TimeoutError as exc:
            raise ConnectionFailedError(
                f"no database connection became available within {timeout:.3g} s "
                f"({_driver.describe_server(self.dsn)})"
            ) from exc

    async def _borrow(self, timeout: float | None) -> Conn:
        raise NotImplementedError

    async def _return(self, conn: Conn) -> None:
        raise NotImplementedError

    def _waiting(self) -> bool:
        raise NotImplementedError


class PoolSource(WorkSource):
    """Connections from a psycopg_pool ``AsyncConnectionPool``; ``owned`` ones close with it."""

    def __init__(self, pool: AsyncConnectionPool, dsn: str, *, owned: bool) -> None:
        super().__init__(dsn)
        self.pool = pool
        self._owned = owned

    @property
    def capacity(self) -> int:
        """The pool's maximum size."""
        return self.pool.max_size

    async def close(self) -> None:
        """Give kept connections back, then close the pool if pgcoord made it."""
        await super().close()
        if self._owned:
            # Its background workers may be stuck connecting over a stalled path: abandon
            # them rather than hold stop() up (psycopg_pool would wait 5 s for each).
            await self.pool.close(timeout=CLOSE_TIMEOUT)

    async def _borrow(self, timeout: float | None) -> Conn:
        try:
            return await self.pool.getconn(timeout)
        except (psycopg.Error, PoolTimeout) as exc:
            raise _driver.translate(exc, self.dsn) from exc

    async def _return(self, conn: Conn) -> None:
        # A closed pool closes the connection; a broken one is discarded and replaced.
        await self.pool.putconn(conn)

    def _waiting(self) -> bool:
        return bool(self.pool.get_stats().get("requests_waiting", 0))


class EngineSource(WorkSource):
    """Connections checked out of a SQLAlchemy ``AsyncEngine``'s pool (``engine=``).

    Each borrow is an ``engine.connect()`` whose driver connection pgcoord uses directly;
    giving it back closes that SQLAlchemy connection, which returns it to the engine's pool
    (rolled back and, with ``pool_pre_ping``, checked on its next checkout). At most ``limit``
    are out at once, so pgcoord never takes more of the host's pool than its budget; further
    borrowers queue here, first come first served, for up to ``timeout`` seconds.
    """

    def __init__(self, engine: Any, dsn: str, *, limit: int, timeout: float) -> None:
        super().__init__(dsn)
        self.engine = engine
        self._limit = limit
        self._timeout = timeout
        self._slots = asyncio.Semaphore(limit)
        self._queued = 0
        self._held: dict[int, Any] = {}  # id(lent connection) -> what gives it back

    @property
    def capacity(self) -> int:
        """At most this many of the engine's connections are lent to pgcoord at once."""
        return self._limit

    async def _borrow(self, timeout: float | None) -> Conn:
        import sqlalchemy.exc

        timeout = self._timeout if timeout is None else min(timeout, self._timeout)
        self._queued += 1
        try:
            # asyncio.timeout, not wait_for: a free slot is taken even with no time left.
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise ConnectionFailedError(
                f"no connection of the engine= pool became available within {timeout:g} s"
                f" ({_driver.describe_server(self.dsn)}): pgcoord may hold {self._limit} of them"
                " at once (raise max_connections) and the engine's pool must have room for them"
            ) from exc
        finally:
            self._queued -= 1
        try:
            conn, handle = await self._checkout()
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
                raise _driver.translate(exc.orig, self.dsn) from exc
            if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
                raise ConnectionFailedError(
                    f"the engine= pool gave no connection ({_driver.describe_server(self.dsn)}): {exc}"
                ) from exc
            raise
        self._held[id(conn)] = handle
        return conn

    async def _return(self, conn: Conn) -> None:
        handle = self._held.pop(id(conn))
        try:
            await self._checkin(conn, handle)
        finally:
            self._slots.release()

    async def _checkout(self) -> tuple[Conn, Any]:
        """One connection from the engine, and what :meth:`_checkin` needs to give it back."""
        sa_conn = await self.engine.connect()
        try:
            raw = await sa_conn.get_raw_connection()
        except BaseException:
            await sa_conn.close()
            raise
        conn = raw.driver_connection
        assert isinstance(conn, psycopg.AsyncConnection)
        return conn, sa_conn

    async def _checkin(self, conn: Conn, sa_conn: Any) -> None:
        if conn.closed or conn.broken:
            # Tell the engine's pool to drop it rather than roll back a dead socket.
            await sa_conn.invalidate()
        await sa_conn.close()

    def _waiting(self) -> bool:
        return self._queued > 0


class _Lent(Connection):
    """An async view of a sync psycopg connection's libpq session, for as long as pgcoord has it
    checked out of a sync ``Engine`` (:class:`SyncEngineSource`).

    The session is the sync connection's own: this object never prepares statements the
    psycopg way (the sync object numbers its own prepared names, and two counters on one
    session would collide), and it does not own the session, so it is never reported as left
    open. Closing it ends the session, which the engine's pool then discards.
    """

    def __del__(self, *_: object) -> None:
        return  # the sync connection owns the session


class SyncEngineSource(EngineSource):
    """Connections checked out of a sync SQLAlchemy ``Engine``'s pool (``engine=``).

    psycopg's sync and async connections are thin objects over one libpq session each, in
    non-blocking mode either way; while the engine's pool has lent one to pgcoord, nothing else
    uses it, so pgcoord drives the same session from its event loop through an async view of it
    (:class:`_Lent`, one per sync connection, kept as long as it lives). Checkout and checkin
    block (the pool's lock and ``pool_timeout``, the rollback on return), so they run in
    worker threads of the source's own; a checkout that finishes after its borrower gave up
    goes straight back (:class:`_Checkout`).
    The session's notice and notification handlers are the sync connection's again before it
    goes home; what pgcoord leaves on the session is what it leaves on any connection it
    borrows: autocommit off again, no transaction open.
    """

    def __init__(self, engine: Any, dsn: str, *, limit: int, timeout: float) -> None:
        super().__init__(engine, dsn, limit=limit, timeout=timeout)
        # Checkouts block (the pool's lock, pool_timeout) and checkins do a round trip: they
        # run on threads of their own, never on the application's default executor. Checkins
        # have their own: a checkout given up keeps blocking its thread until pool_timeout,
        # and a checkin queued behind it would hold back the very connection it waits for.
        self._threads = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="pgcoord-engine")
        self._checkins = ThreadPoolExecutor(
            max_workers=limit, thread_name_prefix="pgcoord-engine-checkin"
        )
        # Each sync connection's view, and the handlers the view put on the session.
        self._views: weakref.WeakKeyDictionary[Any, tuple[_Lent, tuple[Any, Any]]] = (
            weakref.WeakKeyDictionary()
        )

    async def _checkout(self) -> tuple[Conn, Any]:
        checkout = _Checkout(self.engine)
        pending = asyncio.get_running_loop().run_in_executor(self._threads, checkout.run)
        try:
            await asyncio.shield(pending)
        except BaseException:
            # Given up (a timeout or a cancel) or failed: the thread gives back what it still
            # checks out, even once this loop is gone; what it already handed over goes back
            # here.
            raw = checkout.abandon()
            if raw is not None:
                self._in_checkin_thread(raw.close)
            raise
        raw = checkout.take()
        try:
            sync_conn = raw.driver_connection
            if not isinstance(sync_conn, psycopg.Connection):
                raise InvalidTypeError(
                    f"engine= lent a {type(sync_conn).__name__}, not a psycopg Connection"
                )
            pgconn = sync_conn.pgconn
            lent = (pgconn.notice_handler, pgconn.notify_handler)
            known = self._views.get(sync_conn)
            if known is None or known[0].pgconn is not pgconn:
                view = _Lent(pgconn)  # points the session's handlers at itself
                view.prepare_threshold = None
                known = self._views[sync_conn] = (
                    view,
                    (pgconn.notice_handler, pgconn.notify_handler),
                )
            view, (notice, notify) = known
            # The session's notices and notifications reach the view while pgcoord has it.
            pgconn.notice_handler, pgconn.notify_handler = notice, notify
        except BaseException:
            await asyncio.wrap_future(self._in_checkin_thread(raw.close))
            raise
        return view, (raw, lent)

    async def _checkin(self, conn: Conn, handle: Any) -> None:
        raw, (notice, notify) = handle
        pgconn = conn.pgconn
        pgconn.notice_handler, pgconn.notify_handler = notice, notify
        if conn.closed or conn.broken:
            await asyncio.wrap_future(self._in_checkin_thread(raw.invalidate))
        await asyncio.wrap_future(self._in_checkin_thread(raw.close))

    def _in_checkin_thread(self, give_back: Callable[[], None]) -> Future[None]:
        try:
            return self._checkins.submit(give_back)
        except RuntimeError:
            # Closed already: a connection still out when stop() ran comes home later, and
            # must still go back to the engine rather than to the garbage collector.
            done: Future[None] = Future()

            def run() -> None:
                try:
                    give_back()
                    done.set_result(None)
                except BaseException as exc:
                    done.set_exception(exc)

            threading.Thread(target=run, name="pgcoord-engine-checkin", daemon=True).start()
            return done

    async def close(self) -> None:
        """Give kept connections back, then let the checkout threads end on their own."""
        await super().close()
        # A checkout still waiting in the engine's pool returns what it gets by itself.
        self._threads.shutdown(wait=False)
        self._checkins.shutdown(wait=False)


class _Checkout:
    """One checkout from a sync engine, run in a worker thread, that its borrower may give up.

    Whether the connection goes to the borrower or straight back is decided under a lock in
    the thread itself: a checkout that ends after the borrower gave up (maybe after its event
    loop closed) still returns the connection to the engine's pool.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._abandoned = False
        self._raw: Any = None

    def run(self) -> None:
        """In the worker thread: check a connection out for the borrower, if it still waits."""
        raw = self._engine.raw_connection()
        with self._lock:
            if not self._abandoned:
                self._raw = raw
                return
        with contextlib.suppress(Exception):
            raw.close()

    def take(self) -> Any:
        """The connection :meth:`run` checked out (after it returned)."""
        with self._lock:
            raw, self._raw = self._raw, None
        return raw

    def abandon(self) -> Any:
        """The borrower gives up: a connection already checked out is returned for it to give
        back; one checked out from now on the thread gives back itself."""
        with self._lock:
            self._abandoned = True
            raw, self._raw = self._raw, None
        return raw


def pool_dsn(pool: AsyncConnectionPool) -> str | None:
    """The libpq conninfo a caller's ``pool=`` connects with (its ``conninfo`` plus the
    connection parameters among its ``kwargs``), so the listener and every other connection
    pgcoord opens reach the pool's database; None when the pool computes it per connection
    (a callable), which only a ``dsn=`` can then say.

    ``""`` is a real answer: libpq's defaults (``$PGHOST``, ...), exactly what the pool uses.
    """
    conninfo, kwargs = pool.conninfo, pool.kwargs
    if not isinstance(conninfo, str) or (kwargs is not None and not isinstance(kwargs, dict)):
        return None
    # Only libpq's own keywords: the rest (autocommit, prepare_threshold, ...) are psycopg's.
    params = {
        key: value
        for key, value in (kwargs or {}).items()
        if key in _libpq_keywords() and isinstance(value, str | int) and not isinstance(value, bool)
    }
    try:
        return psycopg.conninfo.make_conninfo(conninfo, **params)
    except psycopg.ProgrammingError:
        return None


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    return frozenset(option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults())


def engine_dsn(engine: Any) -> str:
    """The libpq conninfo of a SQLAlchemy engine's URL (password included), for the listener.

    Refuses what cannot lend psycopg connections: something that is not an ``Engine`` or
    ``AsyncEngine``, another driver than psycopg 3, or a pool that lends one connection to
    several borrowers at once (``StaticPool``, ``SingletonThreadPool``).
    """
    import sqlalchemy as sa

    if isinstance(engine, sa.Engine):
        dialect = engine.dialect
    else:
        from sqlalchemy.ext.asyncio import AsyncEngine

        if not isinstance(engine, AsyncEngine):
            raise InvalidTypeError(
                f"engine must be a SQLAlchemy Engine or AsyncEngine, not {type(engine).__name__}"
            )
        dialect = engine.sync_engine.dialect
    if (dialect.name, dialect.driver) != ("postgresql", "psycopg"):
        raise InvalidTypeError(
            f"engine= supports the {SUPPORTED_DRIVER} driver only (create_engine or "
            f"create_async_engine('{SUPPORTED_DRIVER}://...')); this engine uses "
            f"{dialect.name}+{dialect.driver}"
        )
    pool = engine.pool
    if isinstance(pool, sa.pool.StaticPool | sa.pool.SingletonThreadPool):
        # They lend the connection already out to the next borrower too: two lock holders
        # would share one session, which re-grants its own advisory locks to either.
        raise InvalidInputError(
            f"engine= needs a pool that lends each connection to one borrower at a time; "
            f"this engine's {type(pool).__name__} shares them (use the default QueuePool, "
            f"or NullPool)"
        )
    cargs, cparams = dialect.create_connect_args(engine.url)
    params = {k: v for k, v in cparams.items() if isinstance(v, str | int) and v is not None}
    return psycopg.conninfo.make_conninfo(str(cargs[0]) if cargs else "", **params)
