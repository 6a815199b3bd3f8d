"""Batched write-back of how tries ended: completions, retries, dead letters, releases.

Finishing jobs one statement at a time would cap a worker at one round trip per job. Instead
outcomes are buffered and flushed together a couple of milliseconds later (or at once when
many are waiting): one ``DELETE ... USING unnest(ids, attempts)`` completes hundreds of jobs.
A job whose outcome is still buffered keeps its lease, so a crash before the flush only
means the job runs again (at-least-once). A flushed outcome commits at the
``queue_synchronous_commit`` level the statements were built with (:mod:`.queries`): with the
default ``"off"`` a crash or a failover may still undo it, and the job runs again.

Nothing a handler does can stop the writer. Error texts and tracebacks are made storable
(:func:`pgcoord.validation.storable`) before they are buffered; a batch the server refuses for
another reason is written again row by row, so one bad row cannot hold back the others, and a
dead letter whose text is refused even then is stored with a replacement text; any other
error is logged and the flusher carries on after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pgcoord._retry import Backoff
from pgcoord.errors import ConnectionFailedError, InvalidInputError, NotRunningError
from pgcoord.validation import storable

log = logging.getLogger("pgcoord.queue")

#: How long outcomes gather before a flush; short enough not to matter, long enough to batch.
FLUSH_DELAY = 0.002
#: Flush at once when this many completions are waiting.
FLUSH_MAX = 500

Execute = Callable[[Any, Any], Awaitable[None]]
Row = tuple[Any, ...]

#: Errors that say nothing about the rows: the server or the pool is out of reach for now.
#: The batch goes back into the buffers whole and is tried again after a backoff.
_TRANSIENT = (ConnectionFailedError, NotRunningError, OSError)

# Refusals that can be tied to the data of one row: data exceptions (22xxx), integrity
# violations (23xxx) and errors raised by a trigger (P0001). Anything else (a deadlock, a
# statement_timeout, a full disk) is the server's trouble: the batch is retried as it is.
_ROW_CLASSES = ("22", "23", "P0")


def _tied_to_a_row(exc: BaseException) -> bool:
    if isinstance(exc, UnicodeError | InvalidInputError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_ROW_CLASSES)


def replacement_error(exc: BaseException) -> str:
    """The error text stored instead of a dead letter's own when the server refused that row.

    Only the refusal's type is kept: the server's message may quote the refused text again.
    """
    return (
        f"pgcoord: this job's error text could not be stored ({type(exc).__name__}); "
        "the original is in the log of the instance that ran it"
    )


class Outcomes:
    """Buffers of finished tries and the task that writes them (see module docstring)."""

    def __init__(self, execute: Execute, queries: Any) -> None:
        self._execute = execute
        self._q = queries
        self._done: list[Row] = []
        self._retry: list[Row] = []
        self._fail: list[Row] = []
        self._release: list[Row] = []
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- producers (called by workers; no I/O) -----------------------------------------------

    def complete(self, job_id: int, attempt: int) -> None:
        """The try succeeded: delete the job."""
        self._done.append((job_id, attempt))
        self._kick()

    def retry(self, job_id: int, attempt: int, delay: float) -> None:
        """The try failed and tries are left: run again after ``delay`` s."""
        self._retry.append((job_id, attempt, delay))
        self._kick()

    def fail(self, job_id: int, attempt: int, error: str, tb: str) -> None:
        """The last try failed: move the job to the dead letters.

        ``error`` and ``tb`` come from user code (a handler's exception: its message, its
        class's module and name), which may hold NUL or lone surrogates; they are made
        storable here, so the batch they join can always be sent.
        """
        self._fail.append((job_id, attempt, storable(error), storable(tb)))
        self._kick()

    def release(self, jobs: list[tuple[int, int]]) -> None:
        """Jobs cancelled by a stop: back to the queue at once."""
        self._release.extend(jobs)
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        if not self._event.is_set():
            self._event.set()

    def pending(self) -> bool:
        """True while some outcome is not written yet."""
        return bool(self._done or self._retry or self._fail or self._release)

    # -- the flusher -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the flusher task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pgcoord-queue-outcomes")

    async def stop(self, timeout: float) -> None:
        """Write what is buffered (waiting at most ``timeout`` s), then stop the flusher."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def drain(self) -> None:
        """Return once every outcome buffered so far is written (at once when not started)."""
        while self._task is not None and (self.pending() or not self._idle.is_set()):
            self._kick()
            await self._idle.wait()

    async def _run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        while True:
            await self._event.wait()
            if len(self._done) < FLUSH_MAX:
                await asyncio.sleep(FLUSH_DELAY)
            self._event.clear()
            try:
                await self._flush()
                backoff.reset()
            except _TRANSIENT as exc:
                # The batch went back into the buffers; the jobs keep their leases meanwhile.
                log.warning("pgcoord queue: writing job outcomes failed (%s); retrying", exc)
                await self._pause(backoff)
                continue
            except Exception:
                # Whatever it is, this task must not end: with it would end every completion
                # of this instance, and its jobs would run again and again. What was not
                # written is back in the buffers.
                log.exception("pgcoord queue: writing job outcomes failed; retrying")
                await self._pause(backoff)
                continue
            if not self.pending():
                self._idle.set()

    async def _pause(self, backoff: Backoff) -> None:
        await asyncio.sleep(backoff.next() or 0.0)
        self._event.set()

    async def _flush(self) -> None:
        q = self._q
        # Taken all at once: outcomes reported while this flush runs go to fresh buffers.
        batches = [
            ("_done", q.complete, self._done, None),
            ("_retry", q.retry, self._retry, None),
            ("_fail", q.fail, self._fail, _replace_error),
            ("_release", q.release, self._release, None),
        ]
        self._done, self._retry, self._fail, self._release = [], [], [], []
        for i, (_, statement, rows, replace) in enumerate(batches):
            if not rows:
                continue
            try:
                await self._write(statement, rows, replace)
            except BaseException:
                # Put back what was not written (_write left exactly that in `rows`, and the
                # later batches were not tried); it goes out with the next flush.
                for name, _, left, _ in batches[i:]:
                    getattr(self, name)[:0] = left
                raise

    async def _write(
        self, statement: Any, rows: list[Row], replace: Callable[[Row, BaseException], Row] | None
    ) -> None:
        """Write ``rows`` in one statement or, when the server refuses it for a reason that
        may be tied to one row, row by row. Afterwards (returned or raised) ``rows`` holds
        exactly the rows not written."""
        try:
            await self._execute(statement, _columns(rows))
        except _TRANSIENT:
            raise
        except Exception as exc:
            if not _tied_to_a_row(exc) or (len(rows) == 1 and replace is None):
                raise
            log.warning(
                "pgcoord queue: the server refused a batch of %d job outcomes (%s); "
                "writing them one by one",
                len(rows),
                exc,
            )
        else:
            rows.clear()
            return
        todo = rows[:]
        rows.clear()
        refused: Exception | None = None
        for n, row in enumerate(todo):
            try:
                await self._write_one(statement, row, replace)
            except Exception as exc:
                if isinstance(exc, _TRANSIENT) or not _tied_to_a_row(exc):
                    rows.extend(todo[n:])
                    raise
                # Refused even alone (a dead letter even with a replacement text), so not
                # for its data: it is tried again later, like a batch that failed.
                rows.append(row)
                refused = exc
            except BaseException:
                rows.extend(todo[n:])
                raise
        if refused is not None:
            raise refused

    async def _write_one(
        self, statement: Any, row: Row, replace: Callable[[Row, BaseException], Row] | None
    ) -> None:
        try:
            await self._execute(statement, _columns([row]))
        except _TRANSIENT:
            raise
        except Exception as exc:
            if replace is None or not _tied_to_a_row(exc):
                raise
            log.error(
                "pgcoord queue: the dead letter of job %s was refused (%s); storing it with "
                "a replacement error text instead of %r",
                row[0],
                exc,
                row[2],
            )
            await self._execute(statement, _columns([replace(row, exc)]))


def _columns(rows: list[Row]) -> tuple[list[Any], ...]:
    """Rows as the column arrays the ``unnest(...)`` statements take."""
    return tuple(list(col) for col in zip(*rows, strict=True))


def _replace_error(row: Row, exc: BaseException) -> Row:
    job_id, attempt, _error, _tb = row
    return (job_id, attempt, replacement_error(exc), "")
