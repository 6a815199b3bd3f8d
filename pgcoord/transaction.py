"""Running pgcoord's SQL inside the caller's own transaction (``transaction=``).

Accepted: a psycopg ``Connection``/``AsyncConnection``, or a SQLAlchemy ``Connection``,
``AsyncConnection``, ``Session`` or ``AsyncSession`` whose driver is psycopg 3. The statements run
on the very connection and transaction the caller holds, so their effect (a message, a job)
exists if and only if the caller commits.

An autocommit psycopg connection outside ``with conn.transaction():`` is refused: it has no
transaction to join, and the effect would escape a rollback the caller expects to cover it.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from pgcoord._driver import translated
from pgcoord.errors import InvalidInputError, InvalidTypeError

Query: TypeAlias = sql.SQL | sql.Composed | str | bytes
Params: TypeAlias = tuple[Any, ...] | list[Any] | dict[str, Any] | None
Rows: TypeAlias = list[tuple[Any, ...]]

_ACCEPTED = (
    "a psycopg Connection/AsyncConnection, or a SQLAlchemy Connection/AsyncConnection/"
    "Session/AsyncSession using the psycopg driver"
)


def _check_open(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    if conn.closed:
        raise InvalidInputError("transaction= is a closed connection")
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise InvalidInputError(
            "transaction= is an autocommit connection outside a transaction; "
            "use `with conn.transaction():` (or a non-autocommit connection) so the effect "
            "happens only if your transaction commits"
        )
    if conn.info.transaction_status == TransactionStatus.INERROR:
        raise InvalidInputError("transaction= is in a failed transaction; roll it back first")


def _driver_of(raw: object) -> psycopg.Connection[Any] | psycopg.AsyncConnection[Any]:
    driver = getattr(raw, "driver_connection", raw)
    if isinstance(driver, psycopg.Connection | psycopg.AsyncConnection):
        return driver
    raise InvalidTypeError(
        f"transaction= uses the driver {type(driver).__module__}.{type(driver).__name__}; "
        f"pgcoord needs {_ACCEPTED}"
    )


def sync_connection(transaction: object) -> psycopg.Connection[Any]:
    """The psycopg connection behind a sync ``transaction=`` argument."""
    conn: object = transaction
    try:
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        SAConnection = Session = ()  # type: ignore[assignment,misc]
    if isinstance(conn, Session):
        conn = conn.connection()  # begins the session's transaction if needed
    if isinstance(conn, SAConnection):
        if not conn.in_transaction():
            # Make SQLAlchemy own the transaction our statements open on its connection;
            # otherwise the caller's commit() would be a no-op and the effect rolled back.
            conn.begin()
        conn = _driver_of(conn.connection.dbapi_connection)
    if isinstance(conn, psycopg.Connection):
        _check_open(conn)
        return conn
    if isinstance(conn, psycopg.AsyncConnection):
        raise InvalidTypeError("transaction= is an async connection; use the async API with it")
    raise InvalidTypeError(f"transaction= must be {_ACCEPTED}, not {type(transaction).__name__}")


def _sa_async_kinds() -> tuple[Any, Any] | None:
    """SQLAlchemy's AsyncConnection and AsyncSession, or None when its asyncio extension
    (which needs greenlet) is unavailable: then no caller can hold one either."""
    try:
        from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    except ImportError:
        return None
    return AsyncConnection, AsyncSession


async def any_connection(
    transaction: object,
) -> psycopg.Connection[Any] | psycopg.AsyncConnection[Any]:
    """The psycopg connection (sync or async) behind any accepted ``transaction=`` argument."""
    conn: object = transaction
    kinds = _sa_async_kinds()
    if kinds is not None:
        sa_async_connection, sa_async_session = kinds
        if isinstance(conn, sa_async_session):
            conn = await conn.connection()
        if isinstance(conn, sa_async_connection):
            if not conn.in_transaction():
                await conn.begin()  # as for a sync Connection: the caller's commit must count
            driver = _driver_of(await conn.get_raw_connection())
            _check_open(driver)
            return driver
    if isinstance(conn, psycopg.AsyncConnection):
        _check_open(conn)
        return conn
    return sync_connection(conn)


def check_transaction(transaction: object) -> None:
    """Raise ``TypeError`` early when ``transaction`` is of no accepted kind (no I/O)."""
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    kinds: tuple[type, ...] = (psycopg.Connection, psycopg.AsyncConnection, SAConnection, Session)
    kinds += _sa_async_kinds() or ()
    if not isinstance(transaction, kinds):
        raise InvalidTypeError(
            f"transaction= must be {_ACCEPTED}, not {type(transaction).__name__}"
        )


async def execute(transaction: object, query: Query, params: Params = None) -> Rows:
    """Run ``query`` in the caller's transaction and return its rows (empty if none).

    A sync connection is used directly: statements are single short writes, and moving a
    caller's connection to another thread would break drivers/frameworks bound to one thread.
    """
    conn = await any_connection(transaction)
    with translated():
        if isinstance(conn, psycopg.AsyncConnection):
            acur = await conn.execute(query, params)
            return await acur.fetchall() if acur.description else []
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def execute_sync(transaction: object, query: Query, params: Params = None) -> Rows:
    """Blocking twin of :func:`execute`, for sync applications."""
    conn = sync_connection(transaction)
    with translated():
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
