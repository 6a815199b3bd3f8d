"""The connection layer: connecting with a bounded timeout, the work pool, error translation.

Every psycopg error that crosses into user code goes through :func:`translate` (or the
:func:`translated` context manager), so callers only ever see :class:`~pgcoord.errors.PgcoordError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgcoord import _statements as statements
from pgcoord._conninfo import describe_server as describe_server  # re-exported
from pgcoord._deadline import Bounded, Connection
from pgcoord._retry import Backoff
from pgcoord.errors import ConnectionFailedError, DatabaseError, PgcoordError

log = logging.getLogger("pgcoord")

T = TypeVar("T")

#: Seconds to wait for a connection before giving up (the DESIGN bound is <= 10 s).
DEFAULT_CONNECT_TIMEOUT = 10.0

# Keepalives make a silently vanished server or network path show up as an error within
# ~15 s even on a connection that is only waiting (listener, lock holder).
_KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


#: Seconds a pooled connection above the pool's minimum may stay idle before it closes.
#: psycopg_pool checks once per period and closes one connection that stayed unused through
#: a whole period, so a pool a burst grew to 3 is back to 1 within about 3 periods (15 s).
MAX_IDLE = 5.0

# How the server says it has no connection slot left: "too many clients already" and
# "remaining connection slots are reserved ..." (max_connections), "too many connections for
# role/database" (CONNECTION LIMIT). libpq reports them at connect without a SQLSTATE, so the
# text is all there is; 53300 covers the case where one is attached.
_REFUSALS = (
    "too many clients",
    "remaining connection slots are reserved",
    "too many connections for",
)


def is_refusal(exc: BaseException) -> bool:
    """True when the server refused a connection for lack of slots (it may accept later);
    looks through translated errors to the psycopg error that caused them."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.errors.TooManyConnections) or (
            isinstance(seen, psycopg.OperationalError)
            and any(text in str(seen) for text in _REFUSALS)
        ):
            return True
        seen = seen.__cause__
    return False


def went_away(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection was closed by the server (or the network) while unused.

    Nothing arrives on an idle, healthy work connection unless asked for (pgcoord's never
    LISTEN, and the server reports parameters only with a command's answer), so a readable
    socket means the server said goodbye: a FATAL message or end-of-file. (A connection lent
    by ``pool=``/``engine=`` that the host left LISTENing would be replaced too: harmless,
    a reconnect.) One non-blocking poll, no round trip; the caller closes what this condemns.
    """
    pgconn = conn.pgconn
    if pgconn.status != ConnStatus.OK:
        return True
    try:
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))
    except (psycopg.OperationalError, OSError, ValueError):
        return True


def end_session(conn: psycopg.AsyncConnection[Any]) -> None:
    """End ``conn``'s session for real, letting go of every lock it holds.

    Not ``conn.close()``: a connection of a psycopg_pool made with ``close_returns=True`` goes
    back to its pool on ``close()``, session and locks included. Whoever lent the connection
    then finds it closed when it comes home and discards it.
    """
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def connect_kwargs(connect_timeout: float) -> dict[str, Any]:
    """Keyword arguments for every pgcoord connection."""
    # libpq takes whole seconds and treats values under 2 as 2. The client encoding is fixed to
    # UTF-8 whatever the database's: Python text then always encodes, and what a LATIN1
    # database cannot hold is refused by the server as a typed error, not a UnicodeEncodeError.
    return {
        "connect_timeout": max(2, round(connect_timeout)),
        "client_encoding": "UTF8",
        **_KEEPALIVE,
    }


def translate(exc: BaseException, dsn: str | None = None, what: str = "") -> PgcoordError:
    """Turn a psycopg/pool error into the matching :class:`PgcoordError`; its message names
    the operation (``what``), the server and the cause."""
    if isinstance(exc, PgcoordError):
        return exc
    where = f" ({describe_server(dsn)})" if dsn else ""
    if what:
        where = f"{where} during {what}"
    if isinstance(exc, PoolTimeout):
        return ConnectionFailedError(
            f"no database connection became available in time{where}: the server is unreachable "
            f"or the pool is exhausted; check the server and raise the pool's max_size: {exc}"
        )
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return ConnectionFailedError(
            f"lost or could not open the connection to PostgreSQL{where}: {exc}"
        )
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.ConnectionException) or (
        # Raised at connect as a plain OperationalError carrying the code: class 08 (e.g.
        # PgBouncer's "server login has been failing", 08P01) and the 57P0x ends of a session.
        # 57P04 database dropped, 57P05 idle-session timeout: the session is gone either way.
        sqlstate.startswith(("08", "57P0"))
    ):
        return ConnectionFailedError(f"the PostgreSQL connection was closed{where}: {exc}")
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        from pgcoord.errors import SchemaOutdatedError

        return SchemaOutdatedError(
            f"pgcoord's tables are missing{where}; run `pgcoord migrate`: {exc}"
        )
    if isinstance(exc, psycopg.Error):
        return DatabaseError(
            f"PostgreSQL refused the operation{where}: {exc}", sqlstate=exc.sqlstate
        )
    return PgcoordError(str(exc))


@contextlib.contextmanager
def translated(dsn: str | None = None) -> Iterator[None]:
    """Re-raise psycopg errors inside the block as pgcoord errors (sync or async code)."""
    try:
        yield
    except (psycopg.Error, PoolTimeout) as exc:
        raise translate(exc, dsn) from exc


async def patiently(
    attempt: Callable[[], Awaitable[T]], *, timeout: float, server: str = "the server"
) -> T:
    """``await attempt()``, again with jittered backoff while the server refuses connections
    for lack of slots (:func:`is_refusal`), until ``timeout`` seconds have passed.

    Other processes' connections come and go, so failing at the first refusal would make a
    busy moment fatal; any other error, or a refusal past the deadline, is raised as it is.
    """
    deadline = time.monotonic() + timeout
    backoff = Backoff(0.05, 1.0)
    while True:
        try:
            return await attempt()
        except Exception as exc:
            delay = backoff.next() or 0.0
            if not is_refusal(exc) or time.monotonic() + delay >= deadline:
                raise
            log.info("pgcoord: %s refused a connection (%s); retrying", server, exc)
        await asyncio.sleep(delay)


async def connect(
    dsn: str, *, connect_timeout: float, autocommit: bool = True
) -> psycopg.AsyncConnection[Any]:
    """Open one connection, failing within ``connect_timeout`` with an error naming the host
    (retrying while the server refuses for lack of slots, see :func:`patiently`)."""
    deadline = time.monotonic() + connect_timeout

    def attempt() -> Awaitable[psycopg.AsyncConnection[Any]]:
        return Connection.connect(
            dsn, autocommit=autocommit, **connect_kwargs(deadline - time.monotonic())
        )

    try:
        return await patiently(attempt, timeout=connect_timeout, server=describe_server(dsn))
    except psycopg.Error as exc:
        raise ConnectionFailedError(
            f"cannot connect to PostgreSQL at {describe_server(dsn)} within {connect_timeout:g} s: {exc}"
        ) from exc


#: Seconds one reconnect attempt chain of the pool lasts before it starts over (failover).
#: psycopg_pool waits 1 s, then doubles each pause up to its ``reconnect_timeout`` and never
#: resets while a server is down: with its usual 60 s, work resumed up to 10 s after a standby
#: was promoted. Chains this short never pause more than ~1.1 s, and a chain that ends is
#: started again at once (:func:`_reconnect_again`), so the pool finds a server within ~1 s of
#: its answering again, as the listener does.
RECONNECT_HORIZON = 2.0


async def _reconnect_again(pool: AsyncConnectionPool) -> None:
    # Called by psycopg_pool when a chain ended in failure. While connections of the pool work
    # or other chains still run, there is nothing to do (a refused growth, say); when none is
    # left, check() starts a new chain: public API, and it has nothing else to check then.
    stats = pool.get_stats()
    if stats.get("pool_size", 0) < stats.get("pool_min", 1) and not pool.closed:
        await pool.check()


def _configurer(
    connect_timeout: float,
) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        # A database or role default idle_session_timeout would have the server close the
        # pool's sessions during every quiet period (and a statement sent in the instant it
        # does fails with 57P05). Once per connection: nothing else pgcoord sends changes it for
        # good (a held lock arms it as its lease and disarms it when it lets go). Bounded like
        # the connect itself: behind a full PgBouncer the statement would wait for a server
        # connection, and the pool's worker could then not be stopped.
        deadline = asyncio.get_running_loop().time() + connect_timeout
        async with Bounded(conn, deadline, "work session setup"):
            await conn.execute(statements.WORK_SESSION_SETUP)

    return configure


def make_pool(dsn: str, *, max_size: int, connect_timeout: float, name: str) -> AsyncConnectionPool:
    """The work pool: autocommit connections, one kept open when idle, more on demand.

    ``min_size=1`` and a short ``max_idle`` keep an idle instance at two connections (this pool's
    one plus the listener), so dozens of instances fit a default ``max_connections = 100``.
    psycopg_pool queues borrowers FIFO when all ``max_size`` connections are out, and a refused
    attempt to grow (or to open the first connection) is retried by the pool with jittered
    backoff while the connections it has keep serving: a full server never fails a caller
    that an existing connection can serve within its timeout. Reconnecting never pauses for
    more than about a second (:data:`RECONNECT_HORIZON`).
    """
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max(1, max_size),
        max_idle=MAX_IDLE,
        timeout=connect_timeout,
        reconnect_timeout=RECONNECT_HORIZON,
        reconnect_failed=_reconnect_again,
        kwargs={"autocommit": True, **connect_kwargs(connect_timeout)},
        connection_class=Connection,
        configure=_configurer(connect_timeout),
        open=False,
        name=name,
        # No per-borrow `check`: it would cost a round trip on every operation. A connection
        # broken by a server restart fails once, and the pool discards it when it comes back.
    )
