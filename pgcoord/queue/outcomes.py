"""Batched write-back of how tries ended: completions, retries, dead letters, releases.

Finishing jobs one statement at a time would cap a worker at one round trip per job. Instead
outcomes are buffered and flushed together a couple of milliseconds later (or at once when
many are waiting): one ``DELETE ... USING unnest(ids, attempts)`` completes hundreds of jobs.
A job whose outcome is still buffered keeps its lease, so a crash before the flush only
means the job runs again (at-least-once). A flushed outcome commits at the
``queue_synchronous_commit`` level the statements were built with (:mod:`.queries`): with the
default ``"off"`` a crash or a failover may still undo it, and the job runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pgcoord._retry import Backoff
from pgcoord.errors import PgcoordError

log = logging.getLogger("pgcoord.queue")

#: How long outcomes gather before a flush; short enough not to matter, long enough to batch.
FLUSH_DELAY = 0.002
#: Flush at once when this many completions are waiting.
FLUSH_MAX = 500

Execute = Callable[[Any, Any], Awaitable[None]]


class Outcomes:
    """Buffers of finished tries and the task that writes them (see module docstring)."""

    def __init__(self, execute: Execute, queries: Any) -> None:
        self._execute = execute
        self._q = queries
        self._done_ids: list[int] = []
        self._done_attempts: list[int] = []
        self._retry: list[tuple[int, int, float]] = []
        self._fail: list[tuple[int, int, str, str]] = []
        self._release: list[tuple[int, int]] = []
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- producers (called by workers; no I/O) -----------------------------------------------

    def complete(self, job_id: int, attempt: int) -> None:
        """The try succeeded: delete the job."""
        self._done_ids.append(job_id)
        self._done_attempts.append(attempt)
        self._kick()

    def retry(self, job_id: int, attempt: int, delay: float) -> None:
        """The try failed and tries are left: run again after ``delay`` s."""
        self._retry.append((job_id, attempt, delay))
        self._kick()

    def fail(self, job_id: int, attempt: int, error: str, tb: str) -> None:
        """The last try failed: move the job to the dead letters."""
        self._fail.append((job_id, attempt, error, tb))
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
        return bool(self._done_ids or self._retry or self._fail or self._release)

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
            if len(self._done_ids) < FLUSH_MAX:
                await asyncio.sleep(FLUSH_DELAY)
            self._event.clear()
            try:
                await self._flush()
                backoff.reset()
            except (PgcoordError, OSError) as exc:
                # The batch went back into the buffers; the jobs keep their leases meanwhile.
                log.warning("pgcoord queue: writing job outcomes failed (%s); retrying", exc)
                await asyncio.sleep(backoff.next() or 0.0)
                self._event.set()
                continue
            if not self.pending():
                self._idle.set()

    async def _flush(self) -> None:
        ids, attempts = self._done_ids, self._done_attempts
        retry, fail, release = self._retry, self._fail, self._release
        self._done_ids, self._done_attempts = [], []
        self._retry, self._fail, self._release = [], [], []
        q = self._q
        try:
            if ids:
                await self._execute(q.complete, (ids, attempts))
                ids, attempts = [], []
            if retry:
                cols = list(zip(*retry, strict=True))
                await self._execute(q.retry, (list(cols[0]), list(cols[1]), list(cols[2])))
                retry = []
            if fail:
                cols = list(zip(*fail, strict=True))
                await self._execute(
                    q.fail, (list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]))
                )
                fail = []
            if release:
                cols = list(zip(*release, strict=True))
                await self._execute(q.release, (list(cols[0]), list(cols[1])))
                release = []
        except BaseException:
            # Put back what was not written; it goes out with the next flush.
            self._done_ids[:0] = ids
            self._done_attempts[:0] = attempts
            self._retry[:0] = retry
            self._fail[:0] = fail
            self._release[:0] = release
            raise
