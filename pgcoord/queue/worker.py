"""One subscription's worker: claims jobs in batches, runs them, reports how each try ended.

The claim loop asks for as many jobs as there are free slots (capped at the batch size), so a
busy worker claims many jobs per round trip. When the queue has nothing claimable it does not
poll: it sleeps until a NOTIFY for its queue arrives or until the next job it knows of becomes
due (a delayed job, a retry, a lease that may run out: the claim itself says when), capped by
the ``queue_idle_poll`` safety net. An idle worker therefore sends nothing through the pool
and lets the pool's idle connections close. Outcomes are not written one by one: the owning
:class:`~pgcoord.queue.service.EventQueue` batches them (see ``Outcomes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pgcoord import codec
from pgcoord._retry import Backoff, TaskSet
from pgcoord.errors import PgcoordError
from pgcoord.queue.backoff import retry_delay
from pgcoord.queue.context import JobContext, Signal
from pgcoord.queue.options import SubscribeOptions

if TYPE_CHECKING:
    from pgcoord.queue.ports import WorkerHost

log = logging.getLogger("pgcoord.queue")

_ERROR_BACKOFF_FIRST = 0.05
_ERROR_BACKOFF_MAX = 2.0
#: Full claim batches in a row after which a worker tells producers it needs no NOTIFYs.
_BUSY_AFTER_FULL_CLAIMS = 3
#: Threads for sync handlers of a subscription with unlimited concurrency.
_UNLIMITED_THREADS = 64


class RunningJob:
    """A claimed job while its handler runs."""

    __slots__ = (
        "attempt",
        "generation",
        "holds",
        "id",
        "lost",
        "signal",
        "stopping",
        "task",
        "timed_out",
        "timer",
    )

    def __init__(self, job_id: int, attempt: int, generation: int) -> None:
        self.id = job_id
        self.attempt = attempt
        self.signal = Signal()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.stopping = False
        self.lost = False
        #: What keeps this job's slot taken: its task, and its thread while a sync handler
        #: runs (which may outlive the task when it ignores the signal after a timeout).
        self.holds = 1
        self.generation = generation


class Worker:
    """Claims and runs the jobs of one channel on this instance."""

    def __init__(self, queue: WorkerHost, channel: str, opts: SubscribeOptions) -> None:
        self.queue = queue
        self.channel = channel
        self.opts = opts
        self.pg_channel = queue.pg_channel(channel)
        self.running: dict[int, RunningJob] = {}
        self.wake = asyncio.Event()
        self.slot = asyncio.Event()
        self.closing = False
        self._task: asyncio.Task[None] | None = None
        #: Sets ``wake`` when the earliest job known to come due does (see :meth:`wake_in`).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._wakers = TaskSet("queue worker")  # retries waiting for their outcome
        self._executor: ThreadPoolExecutor | None = None
        #: What queue_waiters says about us: True may sleep (wants NOTIFYs), False busy
        #: claiming back-to-back, None not registered (yet, or the write failed).
        self.idle_state: bool | None = None
        #: Set once the first registration as a possible sleeper was tried (done or failed).
        self.registered = asyncio.Event()
        self._full_claims = 0
        #: Slots taken: jobs whose task or handler thread has not ended (see RunningJob.holds).
        self._busy = 0
        #: Bumped at every start: jobs and threads of an earlier run no longer count.
        self._generation = 0

    # -- lifecycle -------------------------------------------------------------------------

    def on_notify(self, _channel: str, _payload: str) -> None:
        """Listener callback: a job was published to this queue."""
        self.wake.set()

    def on_lost(self) -> None:
        """Listener callback: the LISTEN connection is gone; re-decide how long to sleep."""
        self.wake.set()

    def wake_in(self, delay: float) -> None:
        """Claim again in ``delay`` s (or earlier): a job of this queue becomes due then."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        if when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._on_timer)

    async def _wake_after_written(self, delay: float) -> None:
        with contextlib.suppress(Exception):
            await self.queue.outcomes.drain()
            self.wake_in(delay)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self.wake.set()

    def start(self) -> None:
        """Start the claim loop."""
        self.closing = False
        self.idle_state = None
        self.registered.clear()
        self._full_claims = 0
        self._busy = 0
        self._generation += 1
        self._task = asyncio.create_task(self._guarded(), name=f"pgcoord-queue-{self.channel}")

    async def wait_registered(self) -> None:
        """Until the first registration as a possible sleeper was tried (or the loop ended)."""
        task = self._task
        if task is None or self.registered.is_set():
            return
        waiting = asyncio.ensure_future(self.registered.wait())
        try:
            await asyncio.wait((waiting, task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()

    async def stop(self, grace: float) -> list[tuple[int, int]]:
        """Stop claiming, let running jobs finish for ``grace`` s, then cancel the rest.

        Returns (id, attempt) of the cancelled jobs, for the caller to put back at once.
        """
        self.closing = True
        self.wake.set()
        self.slot.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, float("inf")
        for waker in self._wakers:
            waker.cancel()
        if self._task is not None:
            # Not cancelled: a claim in flight must come back, so its jobs are run or released.
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
        # The caller deletes our queue_waiters row next: the renewer must not write it back.
        self.idle_state = None
        tasks = [job.task for job in self.running.values() if job.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        leftover = list(self.running.values())
        for job in leftover:
            job.stopping = True
            job.signal.set("stopping")
            if job.task is not None:
                job.task.cancel()
        pending = [job.task for job in leftover if job.task is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._executor is not None:
            # Threads still running a cancelled sync handler finish on their own.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        return [(job.id, job.attempt) for job in leftover]

    # -- claiming --------------------------------------------------------------------------

    def _free(self) -> int:
        batch: int = self.queue.batch
        limit = self.opts.concurrency
        if limit is None and not self.opts.is_async:
            # Sync handlers run on a bounded pool: a job claimed beyond it would sit leased,
            # out of other instances' reach, until a thread frees up.
            limit = _UNLIMITED_THREADS
        if limit is None:
            return batch
        # `_busy`, not len(running): a sync handler that timed out but ignores ctx.signal
        # still holds its thread, and a job claimed for that thread would wait behind it.
        return min(limit - self._busy, batch)

    def _release(self, job: RunningJob) -> None:
        """One of the job's holds ended (its task, or its thread); free its slot after both."""
        job.holds -= 1
        if job.holds == 0 and job.generation == self._generation:
            self._busy -= 1
            self.slot.set()

    async def _guarded(self) -> None:
        # The claim loop handles database errors itself; anything else is a bug, but it must
        # not silently end consumption on this instance: log it and start over.
        while not self.closing:
            try:
                await self._loop()
            except Exception:
                log.exception("pgcoord queue %r: claim loop failed; restarting", self.channel)
                self.idle_state = None
                await asyncio.sleep(1.0)

    async def _mark(self, idle: bool) -> bool:
        """Record our state in queue_waiters; False when that failed."""
        if self.idle_state is idle:
            return True
        try:
            await self.queue.set_waiter(self.channel, idle)
        except (PgcoordError, OSError) as exc:
            # Producers then may skip NOTIFYs we would want: polling still finds the jobs.
            log.warning(
                "pgcoord queue %r: registering as %s failed: %s",
                self.channel,
                "idle" if idle else "busy",
                exc,
            )
            self.idle_state = None
            return False
        self.idle_state = idle
        return True

    async def _loop(self) -> None:
        # Registered as possibly asleep before the first claim, so that no job published
        # after that claim can go without a NOTIFY.
        try:
            await self._mark(True)
        finally:
            self.registered.set()
        backoff = Backoff(_ERROR_BACKOFF_FIRST, _ERROR_BACKOFF_MAX)
        interval = self.opts.interval
        idle = self.opts.idle
        while not self.closing:
            if idle is not None:
                try:
                    may_claim = bool(idle())
                except Exception:
                    log.exception("pgcoord queue %r: idle() raised; not claiming", self.channel)
                    may_claim = False
                if not may_claim:
                    # Ask again after `interval`, or sooner when a running job finishes.
                    self.slot.clear()
                    await self._sleep(self.slot, interval)
                    continue
            free = self._free()
            if free <= 0:
                self.slot.clear()
                await self.slot.wait()
                continue
            # Cleared before the claim: a NOTIFY arriving while it runs is not lost.
            self.wake.clear()
            try:
                rows, due = await self.queue.claim(self.channel, free)
            except (PgcoordError, OSError) as exc:
                pause = backoff.next() or 0.0  # no budget: a worker retries while it runs
                log.warning(
                    "pgcoord queue %r: claim failed (%s); retrying in %.2f s",
                    self.channel,
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            backoff.reset()
            for row in rows:
                self._launch(row)
            if len(rows) >= free:
                # Probably more waiting: let the new jobs start, then claim again. After a
                # few full batches in a row we are draining a backlog and will not sleep, so
                # producers may stop sending NOTIFYs for this queue.
                self._full_claims += 1
                if self._full_claims == _BUSY_AFTER_FULL_CLAIMS and not self.closing:
                    await self._mark(False)
                await asyncio.sleep(0)
                continue
            self._full_claims = 0
            if due is not None:
                self.wake_in(due)
            # About to sleep: say so first, then look once more. A job committed by a producer
            # that still saw us busy is found by this second claim; one whose statement began
            # before the mark and committed after that claim, by a third one `interval` later.
            if self.idle_state is not True and not self.closing and await self._mark(True):
                self.wake_in(interval)
                continue
            await self._sleep(self.wake, self._idle_timeout())

    def _idle_timeout(self) -> float:
        # NOTIFYs wake us, so only the safety net remains, unless the listener is down: then
        # nothing would wake us, and we poll every `interval` until it is back (its reconnect
        # hook wakes us too, for the NOTIFYs lost meanwhile).
        if self.queue.listening():
            return float(self.queue.idle_poll)
        return self.opts.interval

    async def _sleep(self, event: asyncio.Event, timeout: float) -> None:
        if not event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)

    # -- running ---------------------------------------------------------------------------

    def _launch(self, row: tuple[Any, ...]) -> None:
        job_id, attempt, retried, base = row[0], row[1], row[2], row[7]
        # Every claim adds one to `attempt`, every retry one to `retried`: the claims that
        # ended with no outcome at all (worker killed, frozen past its lease, or stopped).
        # `base` is where `attempt` stood when the job last left the dead letters (which
        # resets `retried` but not `attempt`): earlier claims belong to its previous life.
        interrupted = attempt - base - retried - 1
        if interrupted >= self.queue.max_interruptions:
            error = (
                f"JobInterrupted: job {job_id} was claimed {interrupted} times without an outcome "
                "(its worker died, froze past the lease, or stopped); it may be crashing its "
                "workers, so it is dead-lettered instead of run again"
            )
            log.error("pgcoord queue %r: %s", self.channel, error)
            self.queue.outcomes.fail(job_id, attempt, error, "")
            self.slot.set()
            return
        job = RunningJob(job_id, attempt, self._generation)
        self._busy += 1
        stale = self.running.get(job.id)
        if stale is not None:
            # Our own earlier try of this job outlived its lease (the process was frozen) and
            # we claimed it again: the new try owns it, the old one must stop.
            stale.lost = True
            stale.signal.set("lost")
            if stale.task is not None:
                stale.task.cancel()
        self.running[job.id] = job
        job.task = asyncio.create_task(self._run(job, row))

    def _in_thread(
        self, job: RunningJob, timeout: float, message: Any, ctx: JobContext
    ) -> asyncio.Future[Any]:
        # A pool per subscription sized to its concurrency: the loop's default executor has
        # only min(32, cores + 4) threads, which would cap sync handlers below `concurrency`.
        if self._executor is None:
            limit = self.opts.concurrency or _UNLIMITED_THREADS
            self._executor = ThreadPoolExecutor(
                max_workers=limit, thread_name_prefix=f"pgcoord-queue-{self.channel[:20]}"
            )
        loop = asyncio.get_running_loop()
        run = functools.partial(contextvars.copy_context().run, self.opts.process, message, ctx)

        def call() -> Any:
            # The timeout counts from here, when a thread really takes the job, not from
            # the claim: a job waiting for a thread must not time out before it starts.
            loop.call_soon_threadsafe(self._start_timer, job, timeout)
            return run()

        def done(_future: object) -> None:
            # Called in the thread, or at once when the call is cancelled before it started.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                loop.call_soon_threadsafe(self._release, job)

        job.holds += 1
        future = self._executor.submit(call)
        future.add_done_callback(done)
        return asyncio.wrap_future(future, loop=loop)

    def _start_timer(self, job: RunningJob, timeout: float) -> None:
        if job.task is not None and not job.task.done() and job.timer is None:
            job.timer = asyncio.get_running_loop().call_later(timeout, self._on_timeout, job)

    def _on_timeout(self, job: RunningJob) -> None:
        job.timed_out = True
        job.signal.set("timeout")
        if job.task is not None:
            job.task.cancel()

    async def _run(self, job: RunningJob, row: tuple[Any, ...]) -> None:
        _id, attempt, retried, max_retries, timeout, priority, payload, _base = row
        queue = self.queue
        ctx = JobContext(
            job_id=job.id,
            channel=self.channel,
            retried=retried,
            attempt=attempt,
            signal=job.signal,
            options=(timeout, max_retries, priority),
        )
        if self.opts.is_async:
            self._start_timer(job, timeout)
        error: BaseException | None = None
        try:
            message = codec.decode(payload)
            if self.opts.is_async:
                await self.opts.process(message, ctx)
            else:
                result = await self._in_thread(job, timeout, message, ctx)
                if asyncio.iscoroutine(result):
                    await result
        except asyncio.CancelledError as exc:
            if not (job.timed_out or job.stopping or job.lost):
                error = exc  # cancelled by the handler itself, or from outside: a failed try
        except Exception as exc:
            error = exc
        finally:
            if job.timer is not None:
                job.timer.cancel()
            if self.running.get(job.id) is job:
                del self.running[job.id]
            self._release(job)
        if job.stopping or job.lost:
            return  # released by stop(), or owned by another worker now
        if job.timed_out:
            error = TimeoutError(f"job {job.id} exceeded its timeout of {timeout:g} s")
        if error is None:
            queue.outcomes.complete(job.id, attempt)
            return
        # Both come from user code and may hold anything: the outcome writer makes them
        # storable (Outcomes.fail).
        text = "".join(traceback.format_exception(error))
        summary = f"{type(error).__name__}: {_message(error)}"
        if retried < max_retries:
            log.info("pgcoord job %s failed (%s); retry %s", job.id, summary, retried + 1)
            delay = retry_delay(retried)
            queue.outcomes.retry(job.id, attempt, delay)
            # The retry comes due while we may be asleep: no NOTIFY announces it. The server
            # counts its delay from when the outcome writer commits it, which may be later than
            # now under load: wake then too (a wake before it would find the job still leased).
            self.wake_in(delay)
            self._wakers.spawn(self._wake_after_written(delay))
        else:
            log.warning(
                "pgcoord job %s failed for good after %s tries: %s", job.id, retried + 1, summary
            )
            queue.outcomes.fail(job.id, attempt, summary, text)


def _message(error: BaseException) -> str:
    """``str(error)``, which is user code and may itself raise."""
    try:
        return str(error)
    except Exception:
        return f"<str() of the {type(error).__name__} raised>"
