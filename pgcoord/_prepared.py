"""Hot statements sent through libpq directly, prepared once per session.

psycopg's cursor layer (adapting each parameter, its prepared-statement cache, building rows)
costs about 40 µs a statement here, a third of a loopback round trip. The lock service takes
and lets go of a lock as often as a raw advisory lock pair runs, so its two hot statements go
through ``Connection.pgconn`` (psycopg's documented libpq wrapper) with parameters already in
wire form, prepared under a name of our own the first time a session runs them. Everything
else keeps psycopg's ordinary path.

A session may lose its prepared statements behind our back (``DISCARD ALL`` or ``DEALLOCATE
ALL`` run by the host on a lent connection): the server then says the name is unknown before
running anything, so the statement is prepared again and sent once more.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import weakref
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq

from pgcoord import sqlfile

Connection = psycopg.AsyncConnection[Any]

#: Type oids of the parameters the hot statements take.
INT8 = 20
TEXT = 25

#: Parameter and result formats.
TEXT_FORMAT = 0
BINARY_FORMAT = 1

_INT8 = struct.Struct("!q")

# The server's "prepared statement does not exist" (the session lost it).
_UNKNOWN_STATEMENT = "26000"
# "prepared statement already exists".
_ALREADY_PREPARED = "42P05"

_TUPLES_OK = pq.ExecStatus.TUPLES_OK


def int8(value: int) -> bytes:
    """A bigint parameter in binary wire form."""
    return _INT8.pack(value)


def read_int8(value: bytes | None) -> int | None:
    """A bigint column of a binary result (None for NULL)."""
    return None if value is None else int(_INT8.unpack(value)[0])


def read_bool(value: bytes | None) -> bool:
    """A boolean column of a binary result (NULL reads as false)."""
    return value == b"\x01"


class Statement:
    """One statement in psycopg's ``%s`` style, with the oids of its parameters.

    Its server-side name is derived from its text, so two schemas' versions of the same
    statement (one shared pool serving several Coordinators) never share a name.
    """

    __slots__ = ("name", "text", "types")

    def __init__(self, label: str, text: bytes, types: Sequence[int]) -> None:
        numbered, count = sqlfile.numbered(text)
        if count != len(types):
            raise ValueError(f"{label}: {count} parameters in the text, {len(types)} types given")
        digest = hashlib.blake2b(numbered, digest_size=8).hexdigest()
        self.name = f"pgcoord_{label}_{digest}".encode()
        self.text = numbered
        self.types = tuple(types)


# The statements each session has prepared, for the whole process: one shared pool serves every
# Coordinator of the process, and a name stands for one text wherever it was prepared.
_READY: weakref.WeakKeyDictionary[Connection, set[bytes]] = weakref.WeakKeyDictionary()


async def run(
    conn: Connection,
    statement: Statement,
    params: Sequence[bytes | None],
    formats: Sequence[int],
) -> pq.abc.PGresult:
    """Run ``statement`` on ``conn`` (idle, autocommit) and return its binary result.

    Raises the psycopg error the server sent, or ``psycopg.OperationalError`` when the
    connection fails. A failure or a cancel may leave ``conn`` mid-statement: close it.
    """
    async with conn.lock:
        ready = _READY.get(conn)
        if ready is None or statement.name not in ready:
            await _prepare(conn, statement)
            _READY.setdefault(conn, set()).add(statement.name)
        result = await _execute(conn, statement, params, formats)
        if result.status == _TUPLES_OK:  # the hot case, checked first
            return result
        if _sqlstate(result) == _UNKNOWN_STATEMENT:
            # Deallocated by someone else; nothing ran. Prepare it again and resend.
            await _prepare(conn, statement)
            result = await _execute(conn, statement, params, formats)
    _check(result)
    return result


async def _execute(
    conn: Connection,
    statement: Statement,
    params: Sequence[bytes | None],
    formats: Sequence[int],
) -> pq.abc.PGresult:
    conn.pgconn.send_query_prepared(statement.name, params, formats, BINARY_FORMAT)
    return await _one_result(conn)


async def _prepare(conn: Connection, statement: Statement) -> None:
    conn.pgconn.send_prepare(statement.name, statement.text, statement.types)
    result = await _one_result(conn)
    if _sqlstate(result) == _ALREADY_PREPARED:
        return  # by another path of this process (a name stands for one text): ready
    _check(result, prepared=True)


def _sqlstate(result: pq.abc.PGresult) -> str | None:
    if result.status != pq.ExecStatus.FATAL_ERROR:
        return None
    code = result.error_field(pq.DiagnosticField.SQLSTATE)
    return None if code is None else code.decode()


def _check(result: pq.abc.PGresult, *, prepared: bool = False) -> None:
    expected = pq.ExecStatus.COMMAND_OK if prepared else pq.ExecStatus.TUPLES_OK
    if result.status == expected:
        return
    if result.status == pq.ExecStatus.FATAL_ERROR:
        raise psycopg.errors.error_from_result(result, encoding="utf-8")
    raise psycopg.OperationalError(f"unexpected result status {pq.ExecStatus(result.status).name}")


async def _one_result(conn: Connection) -> pq.abc.PGresult:
    """Flush what was sent and wait for the command's results; return the last one."""
    pgconn = conn.pgconn
    loop = asyncio.get_running_loop()
    fd = pgconn.socket
    while pgconn.flush():  # the kernel's buffer was full: wait until the socket drains
        await _ready(loop, fd, write=True)
    last: pq.abc.PGresult | None = None
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                if last is None:
                    raise psycopg.OperationalError(
                        "the server sent no result: "
                        + pgconn.error_message.decode("utf-8", "replace")
                    )
                return last
            last = result
        await _ready(loop, fd, write=False)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
