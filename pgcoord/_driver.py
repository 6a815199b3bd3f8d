"""The connection layer: connecting with a bounded timeout, the work pool, error translation.

Every psycopg error that crosses into user code goes through :func:`translate` (or the
:func:`translated` context manager), so callers only ever see :class:`~pgcoord.errors.PgcoordError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgcoord.errors import ConnectionFailedError, DatabaseError, PgcoordError

log = logging.getLogger("pgcoord")

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


def describe_server(dsn: str) -> str:
    """A human label for the server a DSN points at (``host:port/dbname``), without the password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = str(params.get("port") or "5432")
    db = str(params.get("dbname") or params.get("user") or "")
    if not host or host.startswith("/"):
        # A Unix socket (the embedded server's, or libpq's default directory).
        return f"unix socket in {host or 'the default directory'} (port {port})/{db}"
    return f"{host}:{port}/{db}"


def connect_kwargs(connect_timeout: float) -> dict[str, Any]:
    """Keyword arguments for every pgcoord connection."""
    # libpq takes whole seconds and treats values under 2 as 2.
    return {"connect_timeout": max(2, round(connect_timeout)), **_KEEPALIVE}


def translate(exc: BaseException, dsn: str | None = None) -> PgcoordError:
    """Turn a psycopg/pool error into the matching :class:`PgcoordError`."""
    if isinstance(exc, PgcoordError):
        return exc
    where = f" ({describe_server(dsn)})" if dsn else ""
    if isinstance(exc, PoolTimeout):
        return ConnectionFailedError(
            f"no database connection became available in time{where}: the server is unreachable "
            f"or the pool is exhausted; check the server and raise the pool's max_size: {exc}"
        )
    if isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None:
        return ConnectionFailedError(
            f"lost or could not open the connection to PostgreSQL{where}: {exc}"
        )
    if isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.ConnectionException):
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


async def connect(
    dsn: str, *, connect_timeout: float, autocommit: bool = True
) -> psycopg.AsyncConnection[Any]:
    """Open one connection, failing within ``connect_timeout`` with an error naming the host."""
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=autocommit, **connect_kwargs(connect_timeout)
        )
    except psycopg.Error as exc:
        raise ConnectionFailedError(
            f"cannot connect to PostgreSQL at {describe_server(dsn)} within {connect_timeout:g} s: {exc}"
        ) from exc


def make_pool(dsn: str, *, max_size: int, connect_timeout: float, name: str) -> AsyncConnectionPool:
    """The work pool: autocommit connections, one kept open when idle, more on demand.

    ``min_size=1`` and a short ``max_idle`` keep an idle instance at two connections (this pool's
    one plus the listener), so dozens of instances fit a default ``max_connections = 100``.
    """
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max(1, max_size),
        max_idle=30.0,
        timeout=connect_timeout,
        reconnect_timeout=60.0,
        kwargs={"autocommit": True, **connect_kwargs(connect_timeout)},
        open=False,
        name=name,
        # No per-borrow `check`: it would cost a round trip on every operation. A connection
        # broken by a server restart fails once, and the pool discards it when it comes back.
    )
