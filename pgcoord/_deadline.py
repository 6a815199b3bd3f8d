"""Deadlines on statements: a connection still busy at its deadline is severed.

Cancelling a psycopg coroutine does not bound it: psycopg then sends the server a cancel
request and waits again for the statement to end (up to 5 s each), and over a stalled path
neither ever completes. Shutting the socket down does: whatever waits on it sees end-of-file
at once, psycopg raises ``OperationalError`` and marks the connection broken, so its pool
discards it. The socket is shut down, not closed: its file descriptor stays valid (and
registered with the event loop) until psycopg closes it, so no other connection can be handed
the same number while the loop still watches it.

Use :class:`Bounded` around the statements of one database step::

    async with Bounded(conn, deadline, "cache get", dsn):
        await conn.execute(...)

It raises :class:`~pgcoord.errors.CommandTimeoutError` when it severed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from types import TracebackType
from typing import Any

import psycopg

from pgcoord._conninfo import describe_server
from pgcoord.errors import CommandTimeoutError

#: Seconds a database step may take by default (``Coordinator(command_timeout=...)``).
DEFAULT_COMMAND_TIMEOUT = 10.0


def sever(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut ``conn``'s socket down in both directions (see the module docstring)."""
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return  # already closed
    with contextlib.suppress(OSError):
        # A duplicate descriptor of the same socket: shutdown acts on the socket itself,
        # and closing the duplicate leaves psycopg's descriptor untouched.
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class Connection(psycopg.AsyncConnection[Any]):
    """The connections pgcoord opens itself: a statement cancelled in flight (its task was
    cancelled) severs the connection rather than asking the server to cancel it.

    psycopg's own answer to a cancelled statement is a cancel request on a new connection and
    a second wait for the statement to end, up to 5 s each: over a stalled path that is 10 s
    for every cancelled call. A severed connection is discarded by its pool instead, which
    costs one reconnect and bounds the cancel. (psycopg logs that it closed the connection.)
    """

    async def _try_cancel(self, *, timeout: float = 5.0) -> None:
        sever(self)


class Bounded:
    """``async with Bounded(conn, deadline, what, dsn):`` severs ``conn`` at ``deadline``
    (event-loop time) if the block is still running then, and turns the error that follows
    into :class:`CommandTimeoutError` naming ``what`` and the server.

    A plain class, not ``@asynccontextmanager``: it sits on hot paths.
    """

    __slots__ = ("_bound", "_conn", "_deadline", "_dsn", "_fired", "_timer", "_what")

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        deadline: float,
        what: str,
        dsn: str | None = None,
    ) -> None:
        self._conn = conn
        self._deadline = deadline
        self._what = what
        self._dsn = dsn
        self._fired = False
        self._bound = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def fired(self) -> bool:
        """Whether the deadline passed and the connection was severed."""
        return self._fired

    def _fire(self) -> None:
        self._timer = None
        self._fired = True
        sever(self._conn)

    async def __aenter__(self) -> Bounded:
        loop = asyncio.get_running_loop()
        self._bound = self._deadline - loop.time()
        if self._bound <= 0:
            # Nothing sent yet: the connection stays healthy (the caller gives it back).
            raise timed_out(self._what, self._dsn, 0.0, sent=False)
        self._timer = loop.call_at(self._deadline, self._fire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fired and isinstance(exc, psycopg.Error | CommandTimeoutError | OSError):
            raise timed_out(self._what, self._dsn, self._bound) from exc


def timed_out(
    what: str, dsn: str | None, bound: float, *, sent: bool = True
) -> CommandTimeoutError:
    """The error for a step that outlived its ``bound`` seconds; ``sent``: a statement had
    gone out (then its effect is unknown)."""
    where = f" on {describe_server(dsn)}" if dsn else ""
    effect = (
        "; its connection was closed, and what it sent may or may not have taken effect"
        if sent
        else "; nothing was sent"
    )
    return CommandTimeoutError(
        f"{what} did not finish within {max(bound, 0.0):.3g} s{where}{effect}"
    )
