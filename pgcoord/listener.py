"""The process's one dedicated LISTEN connection, multiplexed across every service.

psycopg's ``notifies()`` holds its connection's lock while it waits, so listening needs a
connection of its own (measured: queries on a listening connection drop from 15,900/s to 1/s).
One autocommit connection carries every channel any service listens on. It pings on a
heartbeat when quiet, reconnects with capped exponential backoff when the connection or the
server goes away, re-issues LISTEN for every channel, and only then runs the reconnect hooks
that let services catch up on what they may have missed while it was down.

Callbacks are plain functions called on the event loop for each notification; they must not
block (services hand work to their own tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psycopg
from psycopg import sql

from pgcoord import _driver
from pgcoord import _statements as statements
from pgcoord._deadline import Bounded
from pgcoord._retry import Backoff, TaskSet
from pgcoord.errors import ConnectionFailedError, PgcoordError

log = logging.getLogger("pgcoord.listener")

#: Called with (postgres channel, payload) for every notification on a channel it listens to.
NotifyCallback = Callable[[str, str], None]
#: Awaited after every reconnect, once LISTEN is active again on every channel.
ReconnectHook = Callable[[], Awaitable[None]]
#: Called at once (on the loop) when the connection is found lost, before reconnecting.
LostHook = Callable[[], None]

_SETUP_WHAT = (
    "the listener connection's first statement (a pooler such as PgBouncer queues it until "
    "one of its server connections is free: is its pool full?)"
)

_BACKOFF_FIRST = 0.05
# At most ~1 s between attempts: after a failover the promoted server answers within a second
# of this, and a refused attempt costs the server one short-lived backend.
_BACKOFF_MAX = 1.0

#: Seconds the heartbeat ping may take before the connection is declared lost: a quiet
#: listener whose path stalls is known lost at most ``heartbeat + PING_TIMEOUT`` after the
#: last thing it received.
PING_TIMEOUT = 2.0


class Listener:
    """Owns the LISTEN connection; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = _driver.DEFAULT_CONNECT_TIMEOUT,
        heartbeat: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._callbacks: dict[str, list[NotifyCallback]] = {}
        self._hooks: list[ReconnectHook] = []
        self._lost_hooks: list[LostHook] = []
        self._identity: tuple[int, datetime.datetime] | None = None
        self._version: int | None = None
        #: Incremented each time a new connection is established.
        self.generation = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._active: set[str] = set()  # channels LISTENed on the current connection
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._hook_tasks = TaskSet("listener")
        self._connected = asyncio.Event()
        self._last_rx = time.monotonic()
        #: How many times the connection was re-established after a loss.
        self.reconnects = 0
        #: True when the login's BackendKeyData pid is not the server process's: something
        #: in between (a pooler such as PgBouncer) answered the login (see pgcoord._pooler).
        self.behind_pooler = False

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the first connection; raises :class:`ConnectionFailedError` naming the host."""
        if self._conn is None:
            self._conn = await self._open()

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        deadline = asyncio.get_running_loop().time() + self._connect_timeout
        conn = await _driver.connect(self._dsn, connect_timeout=self._connect_timeout)
        try:
            # Bounded by the same connect timeout: a pooler (PgBouncer) completes the login
            # itself and holds the first statement until a server connection is free, up to
            # its query_wait_timeout (120 s by default) when its pool is full.
            async with Bounded(conn, deadline, _SETUP_WHAT, self._dsn):
                with _driver.translated(self._dsn):
                    cur = await conn.execute(statements.LISTENER_SETUP)
                    row = await cur.fetchone()
        except BaseException:
            await conn.close()
            raise
        assert row is not None
        self._identity = (row[4], row[3])
        self.behind_pooler = conn.info.backend_pid != row[4]
        self._version = conn.info.server_version
        self.generation += 1
        return conn

    async def start(self) -> None:
        """Start listening (connecting first if :meth:`connect` was not called).

        LISTEN is active on every channel registered so far when this returns, so a message
        sent right after ``start()`` is not missed.
        """
        await self.connect()
        if self._task is None:
            assert self._conn is not None
            with _driver.translated(self._dsn):
                await self._apply_channels(self._conn)
            self._connected.set()
            self._task = asyncio.create_task(self._run(), name="pgcoord-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection; idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._hook_tasks.cancel()
        await self._close()
        self._release_waiters()

    @property
    def connected(self) -> bool:
        """True while the connection is up and LISTEN is active on every channel."""
        return self._connected.is_set()

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection (None while disconnected)."""
        identity = self.identity
        return identity[0] if identity is not None else None

    @property
    def channels(self) -> frozenset[str]:
        """The Postgres channels LISTENed on the current connection (empty while down)."""
        return frozenset(self._active)

    @property
    def identity(self) -> tuple[int, datetime.datetime] | None:
        """(backend pid, backend start) of the current LISTEN session; None while disconnected.

        Lease rows (locks) name their holder by it: the server sees at once when it ends.
        """
        return self._identity if self._conn is not None and not self._conn.closed else None

    def add_lost_hook(self, hook: LostHook) -> None:
        """Call ``hook()`` at once whenever the connection is found lost (before reconnecting)."""
        self._lost_hooks.append(hook)

    def remove_lost_hook(self, hook: LostHook) -> None:
        """Undo :meth:`add_lost_hook` (no error when not registered)."""
        with contextlib.suppress(ValueError):
            self._lost_hooks.remove(hook)

    @property
    def server_version(self) -> int | None:
        """The server's version number (e.g. 150004), known once connected; while reconnecting,
        the last one seen (a Coordinator joining a shared listener mid-reconnect needs it)."""
        if self._conn is not None:
            self._version = self._conn.info.server_version
        return self._version

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the listener is connected and listening (raises TimeoutError)."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    # -- subscriptions ---------------------------------------------------------------------

    def add_reconnect_hook(self, hook: ReconnectHook) -> None:
        """Run ``hook`` after every reconnect (not after the first connect)."""
        self._hooks.append(hook)

    def remove_reconnect_hook(self, hook: ReconnectHook) -> None:
        """Undo :meth:`add_reconnect_hook` (no error when not registered)."""
        with contextlib.suppress(ValueError):
            self._hooks.remove(hook)

    async def listen(self, channel: str, callback: NotifyCallback) -> None:
        """Call ``callback`` for notifications on ``channel`` (a Postgres channel name).

        Returns once LISTEN is active when the listener runs; before start, or while
        reconnecting, it returns at once and the channel is LISTENed when the connection is up.
        """
        callbacks = self._callbacks.setdefault(channel, [])
        if callback not in callbacks:
            callbacks.append(callback)
        await self._sync()

    async def unlisten(self, channel: str, callback: NotifyCallback) -> None:
        """Stop calling ``callback`` for ``channel``; UNLISTEN when no callback is left."""
        await self.unlisten_many([(channel, callback)])

    async def unlisten_many(
        self, pairs: Iterable[tuple[str, NotifyCallback]], *, wait: bool = True
    ) -> None:
        """:meth:`unlisten` for each ``(channel, callback)``, in one round trip. The callbacks
        are not called again once this starts; ``wait=False`` does not wait for the UNLISTEN
        itself (a Coordinator stopping must not wait on a stalled listener)."""
        for channel, callback in pairs:
            callbacks = self._callbacks.get(channel)
            if callbacks and callback in callbacks:
                callbacks.remove(callback)
                if not callbacks:
                    del self._callbacks[channel]
        if wait:
            await self._sync()
        else:
            self._wake.set()

    async def _sync(self) -> None:
        if self._task is None or not self.connected or set(self._callbacks) == self._active:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        # The first retry is immediate (a terminated backend or a dropped socket usually
        # reconnects at once); later ones back off so a restarting server is not hammered.
        backoff = Backoff(_BACKOFF_FIRST, _BACKOFF_MAX, immediate=True)
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    # start() made the first connection; getting here means it was lost.
                    self._conn = await self._open()
                    await self._apply_channels(self._conn)
                    self._connected.set()
                    self.reconnects += 1
                    log.warning(
                        "pgcoord listener reconnected to %s (backend pid %s)",
                        _driver.describe_server(self._dsn),
                        self.backend_pid,
                    )
                    self._run_hooks()
                backoff.reset()
                await self._serve(self._conn)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, PgcoordError, OSError, TimeoutError, UnicodeDecodeError) as exc:
                # UnicodeDecodeError: psycopg decodes each payload in the client encoding, and
                # in a SQL_ASCII database anyone may NOTIFY bytes that do not decode. The rest
                # of that packet is lost with it, so it is handled as a lost connection (the
                # reconnect hooks catch up) rather than ending the listener for good.
                self._connected.clear()
                # A waiter must not hang on a connection that is gone: its channel is LISTENed
                # again on reconnect, and the reconnect hooks cover the gap.
                self._release_waiters()
                delay = backoff.next() or 0.0  # no budget: the listener retries while it runs
                log.warning(
                    "pgcoord listener lost its connection to %s (%s); reconnecting in %.2f s",
                    _driver.describe_server(self._dsn),
                    _reason(exc),
                    delay,
                )
                await self._close()
                await asyncio.sleep(delay)

    async def _apply_channels(
        self, conn: psycopg.AsyncConnection[Any], bound: float | None = None
    ) -> None:
        """LISTEN/UNLISTEN what changed, each round trip bounded by ``bound`` seconds (default
        ``connect_timeout``: right after connecting; while serving, the ping's bound)."""
        # Repeat until nothing changed meanwhile: a listen() made while a LISTEN was in flight
        # must not be released before its own channel is active.
        while True:
            wanted = set(self._callbacks)
            if wanted == self._active:
                break
            statements = [
                sql.SQL("LISTEN {}").format(sql.Identifier(c))
                for c in sorted(wanted - self._active)
            ]
            statements += [
                sql.SQL("UNLISTEN {}").format(sql.Identifier(c))
                for c in sorted(self._active - wanted)
            ]
            # No parameters, so psycopg sends them as one simple-protocol round trip.
            deadline = asyncio.get_running_loop().time() + (
                self._connect_timeout if bound is None else bound
            )
            async with Bounded(conn, deadline, "LISTEN on the listener connection", self._dsn):
                await conn.execute(sql.SQL("; ").join(statements))
            self._active = wanted
        self._release_waiters()

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            self._wake.clear()
            loop = asyncio.get_running_loop()
            # LISTEN/UNLISTEN and the ping are bounded by severing the connection (cancelling
            # a psycopg statement would wait on the stalled socket again, see _deadline).
            bound = min(self._connect_timeout, PING_TIMEOUT)
            # A LISTEN made while serving is bounded like the ping: a stall met by a LISTEN is
            # noticed as fast as one met by the heartbeat.
            await self._apply_channels(conn, bound)
            quiet = time.monotonic() - self._last_rx
            if quiet >= self._heartbeat:
                # Quiet for a whole beat: prove the connection still works.
                async with Bounded(
                    conn, loop.time() + bound, "the listener's heartbeat ping", self._dsn
                ):
                    await conn.execute(statements.PING)
                self._last_rx = time.monotonic()
                quiet = 0.0
            pump = asyncio.create_task(self._pump(conn), name="pgcoord-listener-pump")
            wake = asyncio.create_task(self._wake.wait())
            try:
                # Until a whole beat of quiet has passed since the last thing received, not a
                # beat from now: a stall is then noticed one beat after it began.
                done, _ = await asyncio.wait(
                    {pump, wake},
                    timeout=self._heartbeat - quiet,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                # Cancelling notifies() while it waits for the socket is safe: it holds no
                # half-read message, and it gives the connection lock back on the way out.
                for task in (pump, wake):
                    task.cancel()
                await asyncio.gather(pump, wake, return_exceptions=True)
            if pump in done and not pump.cancelled():
                exc = pump.exception()
                if exc is not None:
                    raise exc
                raise ConnectionFailedError("the LISTEN connection closed")

    async def _pump(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for notify in conn.notifies():
            self._last_rx = time.monotonic()
            for callback in tuple(self._callbacks.get(notify.channel, ())):
                try:
                    callback(notify.channel, notify.payload)
                except Exception:
                    log.exception("pgcoord notification callback failed on %s", notify.channel)

    def _run_hooks(self) -> None:
        for hook in self._hooks:
            self._hook_tasks.spawn(self._run_hook(hook))

    @staticmethod
    async def _run_hook(hook: ReconnectHook) -> None:
        try:
            await hook()
        except Exception:
            log.exception("pgcoord reconnect hook %r failed", hook)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        self._active = set()
        if conn is not None:
            self._identity = None
            for hook in tuple(self._lost_hooks):
                try:
                    hook()
                except Exception:
                    log.exception("pgcoord listener lost hook %r failed", hook)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def _reason(exc: BaseException) -> str:
    """What went wrong, never empty (``TimeoutError()`` prints as nothing)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ListenerView:
    """One Coordinator's share of its process's :class:`Listener`.

    Every Coordinator of a process on one server shares one Listener (one connection, see
    :mod:`pgcoord._shared`) and reaches it through a view of its own, which remembers what that
    Coordinator registered. :meth:`detach` (at its ``stop()``) removes exactly those callbacks
    and hooks, UNLISTENing the channels no other Coordinator needs, and leaves the others alone.
    Reads (``connected``, ``identity``, ...) describe the shared connection.
    """

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        # Insertion-ordered sets of what this Coordinator registered.
        self._pairs: dict[tuple[str, NotifyCallback], None] = {}
        self._hooks: dict[ReconnectHook, None] = {}
        self._lost_hooks: dict[LostHook, None] = {}
        #: Set when the Coordinator starts stopping: unlisten() then does not wait.
        self.stopping = False

    @property
    def shared(self) -> Listener:
        """The process's Listener behind this view."""
        return self._listener

    @property
    def connected(self) -> bool:
        """True while the connection is up and LISTEN is active on every channel."""
        return self._listener.connected

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection (None while disconnected)."""
        return self._listener.backend_pid

    @property
    def identity(self) -> tuple[int, datetime.datetime] | None:
        """(backend pid, backend start) of the current LISTEN session; None while disconnected."""
        return self._listener.identity

    @property
    def generation(self) -> int:
        """Incremented each time a new LISTEN connection is established."""
        return self._listener.generation

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established after a loss."""
        return self._listener.reconnects

    @property
    def server_version(self) -> int | None:
        """The server's version number (e.g. 150004), known once connected."""
        return self._listener.server_version

    @property
    def behind_pooler(self) -> bool:
        """True when a pooler answered the LISTEN connection's login (see pgcoord._pooler)."""
        return self._listener.behind_pooler

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the listener is connected and listening (raises TimeoutError)."""
        await self._listener.wait_connected(timeout)

    async def listen(self, channel: str, callback: NotifyCallback) -> None:
        """:meth:`Listener.listen`, remembered for :meth:`detach`."""
        self._pairs[(channel, callback)] = None
        await self._listener.listen(channel, callback)

    async def unlisten(self, channel: str, callback: NotifyCallback) -> None:
        """:meth:`Listener.unlisten` (not waiting for the UNLISTEN once the Coordinator stops:
        the callback is gone at once either way)."""
        self._pairs.pop((channel, callback), None)
        await self._listener.unlisten_many([(channel, callback)], wait=not self.stopping)

    def add_reconnect_hook(self, hook: ReconnectHook) -> None:
        """:meth:`Listener.add_reconnect_hook`, remembered for :meth:`detach`."""
        if hook not in self._hooks:
            self._hooks[hook] = None
            self._listener.add_reconnect_hook(hook)

    def remove_reconnect_hook(self, hook: ReconnectHook) -> None:
        """:meth:`Listener.remove_reconnect_hook`."""
        if self._hooks.pop(hook, 0) is None:
            self._listener.remove_reconnect_hook(hook)

    def add_lost_hook(self, hook: LostHook) -> None:
        """:meth:`Listener.add_lost_hook`, remembered for :meth:`detach`."""
        if hook not in self._lost_hooks:
            self._lost_hooks[hook] = None
            self._listener.add_lost_hook(hook)

    def remove_lost_hook(self, hook: LostHook) -> None:
        """:meth:`Listener.remove_lost_hook`."""
        if self._lost_hooks.pop(hook, 0) is None:
            self._listener.remove_lost_hook(hook)

    async def stop(self) -> None:
        """Stop the shared Listener itself: every Coordinator using it stops receiving
        notifications (a deliberate outage, e.g. in tests; ``stop()`` of the Coordinator is
        what ends one Coordinator's part)."""
        await self._listener.stop()

    async def detach(self, timeout: float | None = None) -> None:
        """Remove everything registered through this view (the Coordinator is stopping),
        waiting at most ``timeout`` seconds for the UNLISTEN (the callbacks go at once)."""
        for hook in self._hooks:
            self._listener.remove_reconnect_hook(hook)
        for lost in self._lost_hooks:
            self._listener.remove_lost_hook(lost)
        pairs = list(self._pairs)
        self._hooks, self._lost_hooks, self._pairs = {}, {}, {}
        # The callbacks go now, whatever happens to the wait for the UNLISTEN after.
        await self._listener.unlisten_many(pairs, wait=False)
        if timeout is None or timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listener.unlisten_many([]), timeout)
