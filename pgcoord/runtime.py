"""What every service gets from its Coordinator, and the base class services derive from.

Services are built when the Coordinator is constructed (so ``subscribe`` before ``start()``
works) and reach work connections and the listener through :class:`Runtime`, which raises
:class:`NotRunningError` while the Coordinator is not running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgcoord import _deadline, _driver, names
from pgcoord._sources import PoolSource, WorkSource
from pgcoord.errors import (
    CommandTimeoutError,
    ConnectionFailedError,
    InvalidTypeError,
    NotRunningError,
)
from pgcoord.listener import ListenerView

T = TypeVar("T")

_NOT_RUNNING = (
    "the pgcoord Coordinator is not running; use `async with coord:` or await coord.start()"
)


class Runtime:
    """Shared state of one Coordinator: names, options, and (while running) its work source
    and its view of the process's listener."""

    def __init__(
        self,
        *,
        app: str,
        schema: str,
        instance_id: str,
        options: Mapping[str, Any],
        connect_timeout: float,
        command_timeout: float = _deadline.DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.app = app
        self.schema = schema
        self.instance_id = instance_id
        self.options = dict(options)
        self.connect_timeout = connect_timeout
        #: Seconds one database step of a call may take, waiting for a connection included.
        self.command_timeout = command_timeout
        # While stopping: the event-loop time by which every remaining step must be done.
        self.stop_deadline: float | None = None
        self.dsn: str | None = None
        # Kept after stop() so connections still out then go back where they came from.
        self._source: WorkSource | None = None
        self._listener: ListenerView | None = None
        self.running = False

    @property
    def pool(self) -> AsyncConnectionPool:
        """The psycopg work pool (pgcoord's own or ``pool=``); services borrow through
        :meth:`connection` instead. With ``engine=`` there is none: raises InvalidTypeError."""
        source = self._source
        if source is None or not self.running:
            raise NotRunningError(_NOT_RUNNING)
        if not isinstance(source, PoolSource):
            raise InvalidTypeError(
                "this Coordinator borrows from engine= (a SQLAlchemy pool); it has no psycopg pool"
            )
        return source.pool

    @property
    def listener(self) -> ListenerView:
        """This Coordinator's view of the process's LISTEN connection (from start until stop)."""
        if self._listener is None:
            raise NotRunningError(_NOT_RUNNING)
        return self._listener

    @property
    def work_capacity(self) -> int:
        """How many work connections pgcoord may hold at once (the pool's maximum size, or
        the share of ``engine=``'s pool pgcoord may take)."""
        source = self._source
        return source.capacity if source is not None else 1

    # -- lifecycle (the Coordinator's) ------------------------------------------------------

    def attach(self, listener: ListenerView, source: WorkSource) -> None:
        """Start serving: the services reach ``listener`` and borrow from ``source``."""
        self._listener = listener
        self._source = source
        self.running = True

    def begin_stop(self, budget: float) -> None:
        """The Coordinator is stopping: every database step left must end within ``budget``
        seconds from now, and unlisten() no longer waits for the listener."""
        self.stop_deadline = asyncio.get_running_loop().time() + budget
        if self._listener is not None:
            self._listener.stopping = True

    def end_stop(self) -> None:
        """Stopping is over (whatever it left): steps get their own bounds again."""
        self.stop_deadline = None

    async def detach(self) -> None:
        """Stop serving: drop this Coordinator's listener registrations (within what is left
        of the stop's budget). The work source stays, so connections still out go home."""
        self.running = False
        listener, self._listener = self._listener, None
        if listener is not None:
            left = None
            if self.stop_deadline is not None:
                left = max(0.0, self.stop_deadline - asyncio.get_running_loop().time())
            await listener.detach(left)

    @property
    def source(self) -> WorkSource | None:
        """Where work connections come from (None before the first start)."""
        return self._source

    def check_running(self) -> None:
        """Raise :class:`NotRunningError` unless the Coordinator is running."""
        if not self.running:
            raise NotRunningError(
                "the pgcoord Coordinator is not running (not started yet, or stopped)"
            )

    async def acquire(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]:
        """Borrow an autocommit connection (a kept warm one when there is); give it back with
        :meth:`release`. Prefer :meth:`connection`; this pair is for the hottest paths, which
        bound their statements themselves (:class:`~pgcoord._deadline.Bounded`).

        When every connection of the budget is out, this waits (first come, first served)
        up to ``timeout`` (default ``connect_timeout``) for one to come back."""
        source = self._source
        if source is None or not self.running:
            raise NotRunningError(_NOT_RUNNING)
        return await source.acquire(timeout)

    async def release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Give back a connection from :meth:`acquire` (kept warm for a moment, or returned)."""
        source = self._source
        if source is None:
            _driver.end_session(conn)
            return
        await source.release(conn, keep=self.running)

    def step_deadline(self, timeout: float | None = None) -> float:
        """The event-loop time by which a database step starting now must end: ``timeout``
        (default ``command_timeout``) from now, or sooner while the Coordinator stops."""
        deadline = asyncio.get_running_loop().time() + (
            self.command_timeout if timeout is None else timeout
        )
        cap = self.stop_deadline
        return deadline if cap is None or cap > deadline else cap

    def connection(self, what: str = "a pgcoord call", timeout: float | None = None) -> Borrowed:
        """``async with rt.connection("cache get") as conn``: borrow an autocommit connection
        (a kept warm one when there is) for one database step bounded by ``timeout`` seconds
        (default ``command_timeout``), the wait for the connection included: past it the
        connection is severed and :class:`~pgcoord.errors.CommandTimeoutError` (naming
        ``what``) raised. psycopg errors inside the block come out as pgcoord errors."""
        return Borrowed(self, what, self.command_timeout if timeout is None else timeout)

    async def run(
        self,
        what: str,
        step: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
        *,
        timeout: float | None = None,
        idempotent: bool = False,
    ) -> T:
        """``await step(conn)`` on a connection borrowed as :meth:`connection` does, run once
        more on a fresh connection when the first one turns out to be dead.

        The borrow already discards sessions the server closed while they sat idle; what it
        cannot see is a session ended in the instant between that check and the statement.
        The step is run again only when that cannot do it twice: always when the server said
        it ended the session for idling (57P05: it never read the statement), and after any
        other lost connection (class 08, 57P0x) only for an ``idempotent`` step (a read, or a
        write whose second run changes nothing). A step that ran out of time is not retried.
        """
        for attempt in (1, 2):
            entered = False
            try:
                async with self.connection(what, timeout) as conn:
                    entered = True
                    return await step(conn)
            except ConnectionFailedError as exc:
                if attempt == 2 or not entered or not retryable(exc, idempotent=idempotent):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def table(self, name: str) -> sql.Identifier:
        """A schema-qualified table identifier for SQL composed with ``psycopg.sql``."""
        return sql.Identifier(self.schema, name)

    def channel(self, service: str, name: str) -> str:
        """The Postgres channel carrying ``name`` for ``service`` in this app."""
        return names.pg_channel(self.schema, self.app, service, name)

    def advisory_key(self, service: str, name: str) -> int:
        """The 64-bit advisory lock key for ``name`` in ``service`` of this app."""
        return names.advisory_key(self.schema, self.app, service, name)


#: The SQLSTATE of a session the server ended because it sat idle (``idle_session_timeout``).
IDLE_SESSION_TIMEOUT = "57P05"


def retryable(exc: ConnectionFailedError, *, idempotent: bool) -> bool:
    """Whether a step that failed with ``exc`` may run again on a fresh connection (see
    :meth:`Runtime.run`)."""
    if isinstance(exc, CommandTimeoutError):
        return False  # severed at its deadline: it may be running still, or have committed
    if idempotent:
        return True
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == IDLE_SESSION_TIMEOUT


class Service:
    """Base of the managers: lifecycle hooks the Coordinator calls, and per-service options.

    ``OPTIONS`` maps each option a service accepts (as a ``Coordinator(**options)`` keyword) to
    its default; the Coordinator refuses unknown keywords.
    """

    OPTIONS: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def option(self, name: str) -> Any:
        """The configured value of one of this service's ``OPTIONS``."""
        return self._rt.options.get(name, self.OPTIONS[name])

    # The lifecycle the Coordinator drives (not for application code: a service stopped on
    # its own would leave its Coordinator half running).

    async def start(self) -> None:
        """Called by ``Coordinator.start()`` once the pool and listener are up."""

    async def stop(self) -> None:
        """Called by ``Coordinator.stop()`` before the pool and listener close."""

    async def on_reconnect(self) -> None:
        """Called after the listener reconnected: notifications may have been missed."""


class Borrowed:
    """The context manager :meth:`Runtime.connection` returns.

    A plain class rather than ``@asynccontextmanager``: it sits on every service's hot path
    (each cache get, each publish), where a generator-based context manager nested with
    :func:`~pgcoord._driver.translated` cost a measurable share of the client CPU.
    """

    __slots__ = ("_bound", "_conn", "_rt", "_timeout", "_what")

    def __init__(self, runtime: Runtime, what: str, timeout: float) -> None:
        self._rt = runtime
        self._what = what
        self._timeout = timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._bound: _deadline.Bounded | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        rt = self._rt
        deadline = rt.step_deadline(self._timeout)
        try:
            self._conn = conn = await rt.acquire(
                max(0.0, deadline - asyncio.get_running_loop().time())
            )
        except ConnectionFailedError as exc:
            if not isinstance(exc.__cause__, PoolTimeout | TimeoutError) and not isinstance(
                exc, CommandTimeoutError
            ):
                raise
            raise _deadline.timed_out(
                f"{self._what} (waiting for a connection)", rt.dsn, self._timeout, sent=False
            ) from exc
        self._bound = bound = _deadline.Bounded(conn, deadline, self._what, rt.dsn)
        try:
            await bound.__aenter__()
        except BaseException:
            self._conn = self._bound = None
            await rt.release(conn)  # the deadline had passed: nothing was sent on it
            raise
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        bound, self._bound = self._bound, None
        assert conn is not None and bound is not None
        try:
            # First: the timer must not outlive the block and sever a connection that is back
            # in a pool. Raises CommandTimeoutError if it did sever this one.
            await bound.__aexit__(exc_type, exc, tb)
        finally:
            await self._rt.release(conn)
        if isinstance(exc, psycopg.Error | PoolTimeout):
            raise _driver.translate(exc, self._rt.dsn, self._what) from exc
