"""Whether a connection pooler between pgcoord and PostgreSQL shares server sessions (at start).

pgcoord needs each of its client connections to keep one server session: the listener's LISTEN
lives in its session, a lock is a session advisory lock on a work connection, psycopg prepares
hot statements per session. A pooler in transaction (or statement) mode, such as PgBouncer with
``pool_mode = transaction``, hands each transaction to whichever server session is free, and
every one of those breaks without an error: notifications go to whoever holds the LISTENing
session at the time (usually nobody), two processes hold one lock, a prepared statement is
missing or another client's. Session mode keeps one server session per client connection for
the connection's life, and everything works. So ``start()`` looks once, and refuses the first
kind with :class:`~pgcoord.errors.TransactionPoolingError`; nothing is checked per call.

How it tells them apart:

1. **Nothing in between** (one round trip). A server announces its backend's pid at login
   (BackendKeyData); a pooler answers the login itself and announces a cancel key of its own
   (PgBouncer: random). When the pid a work connection was told equals its
   ``pg_backend_pid()``, and the same holds for the listener (its setup statement reads it),
   no pooler is there and the check ends.
2. **Behind a pooler**, probes whose outcome differs by pool mode, not by luck:

   - *The listener hears a work connection's NOTIFY.* LISTEN runs on the listener, NOTIFY on
     a work connection. Directly or in session mode it arrives within milliseconds. In
     transaction mode the listener's LISTEN stays behind in a server session the listener
     gave back when the statement ended, so the notification never reaches it (PgBouncer
     1.18: never once); often the work connection, handed that very session, receives its
     own notification, which proves it at once.
   - *A client connection keeps its server session.* Every ``pg_backend_pid()`` one work
     connection reads must be the same, differ from the listener's and from other work
     connections'. With two work connections (when the budget allows), one commits a
     transaction while the other is between statements: a transaction pooler hands the
     other's next statement the session just freed (PgBouncer reuses the most recently freed
     one first), so its pid changes. This one runs only when the work connections may take
     another path than the listener's (``engine=``, or ``pool=`` made from another DSN than
     ``dsn``, e.g. the pool through a pooler and ``dsn`` direct): on the listener's own path
     the notification probe settles it. With a budget of a single work connection on a path of
     its own, only the pid checks cover it.

:func:`shared_session` and :func:`refusal` are pure; :func:`refuse_transaction_pooling` runs
the probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from pgcoord import _statements as statements
from pgcoord._driver import describe_server
from pgcoord._shared import server_key
from pgcoord.errors import InvalidTypeError, TransactionPoolingError

if TYPE_CHECKING:
    from pgcoord.runtime import Runtime

#: Prefix of the one-off channel the notification probe uses (a random suffix follows).
PROBE_CHANNEL_PREFIX = "pgcoord_pooler_probe_"

_FIRST_WHAT = (
    "start: the first statement on a work connection (a pooler such as PgBouncer queues it "
    "until one of its server connections is free: is its pool full?)"
)
_PROBE_WHAT = "start: the connection pooler check"


def shared_session(listener_pid: int, connections: Sequence[Sequence[int]]) -> str | None:
    """Why these sightings prove that client connections share server sessions, or None.

    ``connections``: for each work connection, the ``pg_backend_pid()`` its statements read,
    in order. A client connection that keeps its server session reads one pid, never the
    listener's and never another connection's.
    """
    owner: dict[int, int] = {}
    for index, pids in enumerate(connections):
        if len(set(pids)) > 1:
            return (
                f"one client connection's statements ran in server processes "
                f"{', '.join(str(pid) for pid in dict.fromkeys(pids))}"
            )
        for pid in pids:
            if pid == listener_pid:
                return f"a work connection ran in server process {pid}, the LISTEN connection's"
            if owner.setdefault(pid, index) != index:
                return f"two client connections ran in the same server process {pid}"
    return None


def refusal(dsn: str | None, evidence: str) -> TransactionPoolingError:
    """The error ``start()`` raises: what was seen, what it means, what to do."""
    where = describe_server(dsn) if dsn else "the server"
    return TransactionPoolingError(
        f"pgcoord cannot run through the connection pooler at {where}: {evidence}. The pooler "
        "hands server sessions from client to client between transactions (PgBouncer "
        "pool_mode = transaction or statement), so notifications would be lost, two processes "
        "could hold one lock and prepared statements would fail. Connect pgcoord directly to "
        "PostgreSQL, or through a pool in session mode (PgBouncer: pool_mode = session, e.g. "
        "a [databases] entry of its own for pgcoord with pool_mode=session); see "
        'docs/operations.md, "PgBouncer"'
    )


async def _pid(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute(statements.BACKEND_PID)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def refuse_transaction_pooling(rt: Runtime) -> None:
    """Raise :class:`TransactionPoolingError` when ``rt``'s connections go through a pooler
    that shares server sessions (see the module docstring); called once by ``start()``, with
    the listener and the work source up. Costs one round trip when nothing is in between."""
    listener = rt.listener
    identity = listener.identity
    if identity is None:
        return  # lost already: the reconnect re-checks nothing, and start() fails elsewhere
    listener_pid = identity[0]
    # The first statement on a work connection: a pooler holds it until a server connection
    # of its pool is free, so it is bounded like a connection attempt.
    async with rt.connection(_FIRST_WHAT, rt.connect_timeout) as conn:
        pid = await _pid(conn)
        work_pooled = conn.info.backend_pid != pid
        evidence = shared_session(listener_pid, [[pid]])
        if evidence is None and not work_pooled and not listener.behind_pooler:
            return
        if evidence is None:
            evidence = await _notification_probe(rt, conn, listener_pid, [pid])
    if evidence is None and work_pooled and rt.work_capacity >= 2 and not _same_path(rt):
        evidence = await _two_connections_probe(rt, listener_pid)
    if evidence is not None:
        raise refusal(rt.dsn, evidence)


def _same_path(rt: Runtime) -> bool:
    """Whether the work connections come from a pool of the listener's own DSN (pgcoord's,
    or ``pool=`` made from the same DSN): then the notification probe covered them too."""
    try:
        pool = rt.pool
    except InvalidTypeError:
        return False  # engine=: its URL may point elsewhere than the listener's DSN
    conninfo = pool.conninfo  # a callable when the pool computes it per connection
    return (
        isinstance(conninfo, str)
        and rt.dsn is not None
        and server_key(conninfo) == server_key(rt.dsn)
    )


async def _notification_probe(
    rt: Runtime, conn: psycopg.AsyncConnection[Any], listener_pid: int, pids: list[int]
) -> str | None:
    listener = rt.listener
    channel = PROBE_CHANNEL_PREFIX + secrets.token_hex(8)
    token = secrets.token_hex(8)
    heard = asyncio.get_running_loop().create_future()
    own: list[str] = []

    def on_listener(_channel: str, payload: str) -> None:
        if payload == token and not heard.done():
            heard.set_result(None)

    def on_work(notify: psycopg.Notify) -> None:
        if notify.channel == channel:
            own.append(notify.payload)

    await listener.listen(channel, on_listener)
    try:
        conn.add_notify_handler(on_work)
        try:
            cur = await conn.execute(statements.BACKEND_PID_AND_NOTIFY, (channel, token))
            row = await cur.fetchone()
        finally:
            conn.remove_notify_handler(on_work)
        assert row is not None
        pids.append(int(row[0]))
        if own:
            return (
                "a work connection received the notification it sent to the LISTEN "
                "connection's channel, which only the LISTEN connection listens on: it was "
                "handed that connection's server session"
            )
        evidence = shared_session(listener_pid, [pids])
        if evidence is not None:
            return evidence
        try:
            await asyncio.wait_for(heard, rt.connect_timeout)
        except TimeoutError:
            return (
                f"a notification sent from a work connection did not reach the LISTEN "
                f"connection within {rt.connect_timeout:g} s"
            )
        return None
    finally:
        with contextlib.suppress(Exception):
            await listener.unlisten(channel, on_listener)


async def _two_connections_probe(rt: Runtime, listener_pid: int) -> str | None:
    async with (
        rt.connection(_PROBE_WHAT, rt.connect_timeout) as first,
        rt.connection(_PROBE_WHAT, rt.connect_timeout) as second,
    ):
        firsts: list[int] = []
        seconds: list[int] = []
        async with first.transaction():
            firsts.append(await _pid(first))
            seconds.append(await _pid(second))
        # `first` just gave its session back, if the pooler takes sessions away at commit:
        # it hands `second` the one freed last.
        seconds.append(await _pid(second))
        firsts.append(await _pid(first))
    return shared_session(listener_pid, [firsts, seconds])
