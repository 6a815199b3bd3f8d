"""The EventQueue service: durable jobs in PostgreSQL, claimed with ``FOR UPDATE SKIP LOCKED``.

See docs/queue.md for the design: one ``run_at`` column doubling as the lease, fenced
outcomes written in batches, leases renewed in batches, and coalesced wake-up NOTIFYs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from pgcoord import codec
from pgcoord import transaction as txn
from pgcoord._driver import translated
from pgcoord._retry import TaskSet
from pgcoord.errors import InvalidTypeError, JobError, PgcoordError
from pgcoord.queue import deadletters, keys, queries
from pgcoord.queue.deadletters import FailedJob
from pgcoord.queue.keys import check_idempotency_key
from pgcoord.queue.options import PublishOptions, publish_options, subscribe_options
from pgcoord.queue.outcomes import Outcomes
from pgcoord.queue.throttle import NotifyState, NotifyStates
from pgcoord.queue.worker import Worker
from pgcoord.runtime import Runtime, Service
from pgcoord.validation import (
    INT4_MAX,
    check_int,
    check_key,
    check_non_negative,
    check_optional_positive,
    check_positive,
)

log = logging.getLogger("pgcoord.queue")

#: Least seconds between two VACUUMs of the jobs table started by one process.
_VACUUM_MIN_GAP = 2.0
#: Least seconds between two writes an idle instance makes (its queue_waiters refresh): at
#: least half of any pool ``max_idle`` up to 30 s, so periodic queue work never keeps a pooled
#: connection from closing. Waiter rows live three such periods, so a killed worker stops
#: counting by then.
_IDLE_WRITE_GAP = 15.0
#: Seconds past its expiry after which a worker registration counts as a killed instance's and
#: is deleted (a live instance refreshes its rows long before they expire).
_WAITER_SWEEP_MARGIN = 10.0
#: Least seconds between two sweeps of expired dead letters by one instance (or the
#: retention, if shorter).
_FAILED_SWEEP_INTERVAL = 60.0
#: Dead letters deleted per sweep statement, and statements per sweep at most.
_FAILED_SWEEP_BATCH = 1000
_FAILED_SWEEP_STATEMENTS = 20


class EventQueue(Service):
    """Durable, at-least-once job queues shared by every instance of the app.

    ``publish`` puts a job in a queue (no local subscriber needed); every instance that
    ``subscribe``\\ s to the queue takes jobs from it, each job by one instance at a time.
    A claimed job carries a lease the worker renews; if the worker dies or freezes, the job
    returns to the queue when the lease runs out. Failed tries are retried with exponential
    backoff (0.5 s x 2**retried, capped at 60 s, +-20% jitter) up to ``max_retries``; then the
    job becomes a dead letter (``failed_jobs``/``retry_failed``/``purge_failed``).

    Options (``Coordinator(**options)``): ``queue_lease`` (seconds a claim lasts without
    renewal), ``queue_grace`` (seconds ``stop()`` lets running jobs finish before cancelling
    and releasing them), ``queue_batch`` (most jobs claimed per round trip),
    ``queue_notify_gap`` (least seconds between two wake-up NOTIFYs this process sends for one
    queue), ``queue_txn_notify_window`` (see docs/queue.md), ``queue_vacuum_every`` (this
    process VACUUMs the jobs table after finishing this many jobs, at most every 2 s; 0: never),
    ``queue_idle_poll`` (the longest an idle worker sleeps without a NOTIFY or a known due
    job before it claims anyway: the safety net for wake-ups it cannot know about),
    ``queue_synchronous_commit`` (the ``synchronous_commit`` level of the workers' claims,
    outcomes and leases: ``"off"``, the default, or ``"on"``/``"local"``/``"remote_write"``/
    ``"remote_apply"``; see docs/operations.md, "Failover"), ``queue_failed_retention``
    (seconds dead letters of this app are kept, then deleted by its live instances; None,
    the default: until purged).

    Every duration option is a finite number of seconds.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "queue_lease": 30.0,
        "queue_grace": 10.0,
        "queue_batch": 200,
        "queue_notify_gap": 0.005,
        "queue_txn_notify_window": 0.01,
        "queue_vacuum_every": 50_000,
        # Claims of one job that may end with no outcome (its worker died, froze past the
        # lease, or was stopped) before the job is dead-lettered: a job that crashes every
        # worker that runs it must not be rescued forever.
        "queue_max_interruptions": 10,
        # Idle workers do not poll: NOTIFYs and the due times their claims return wake them.
        # This only bounds how late a job is found whose wake-up nobody could send (see
        # docs/queue.md, "Waking up").
        "queue_idle_poll": 5.0,
        # synchronous_commit of the workers' own writes (claims, outcomes, leases): "off" is
        # fastest and may re-run finished jobs after a crash or failover; "on" with a
        # synchronous standby keeps them finished (docs/operations.md, "Failover").
        "queue_synchronous_commit": "off",
        # Seconds a publish's idempotency_key is remembered (pgcoord.queue.keys).
        "queue_idempotency_window": keys.DEFAULT_WINDOW,
        # Seconds a dead letter of this app is kept before its live instances delete it;
        # None keeps dead letters until purged (failed_jobs/purge_failed, `pgcoord jobs`).
        "queue_failed_retention": None,
    }

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        # Finite, all of them: each becomes an interval on the server or a timer here, and
        # "forever" is no lease, no grace, no pacing or no safety net, none of which works.
        self._lease = check_positive(self.option("queue_lease"), "queue_lease", finite=True)
        self._grace = check_non_negative(self.option("queue_grace"), "queue_grace", finite=True)
        self._max_interruptions = check_int(
            self.option("queue_max_interruptions"), "queue_max_interruptions", minimum=1
        )
        # At most a Postgres integer: it is a claim's LIMIT.
        self._batch = check_int(
            self.option("queue_batch"), "queue_batch", minimum=1, maximum=INT4_MAX
        )
        self._gap = check_non_negative(
            self.option("queue_notify_gap"), "queue_notify_gap", finite=True
        )
        self._txn_window = check_non_negative(
            self.option("queue_txn_notify_window"), "queue_txn_notify_window", finite=True
        )
        self._idle_poll = check_positive(
            self.option("queue_idle_poll"), "queue_idle_poll", finite=True
        )
        # Waiter rows are refreshed every lease/3 at most, but no more often than an idle
        # instance may write; they expire after three refresh periods.
        self._waiter_every = max(self._lease / 3, _IDLE_WRITE_GAP)
        self._waiter_ttl = 3 * self._waiter_every
        self._last_waiter_refresh = float("-inf")
        self._last_waiter_sweep = float("-inf")
        self._failed_retention = check_optional_positive(
            self.option("queue_failed_retention"), "queue_failed_retention", finite=True
        )
        self._last_failed_sweep = float("-inf")
        self._sweeping_failed = False
        self._q = queries.build(
            runtime.schema, synchronous_commit=self.option("queue_synchronous_commit")
        )
        self._keys = keys.KeyQueries.for_schema(runtime.schema)
        self._key_window = check_positive(
            self.option("queue_idempotency_window"), "queue_idempotency_window", finite=True
        )
        self._keyed = 0
        self._last_key_sweep = time.monotonic()
        self._workers: dict[str, Worker] = {}
        #: Unsubscribed workers still in their grace period: their running jobs' leases must
        #: still be renewed, or another instance may run those jobs at the same time.
        self._draining: set[Worker] = set()
        # Waiter refreshes and deletes one at a time: a refresh in flight must not upsert a
        # row back after a stopping worker deleted it.
        self._waiter_lock = asyncio.Lock()
        self._notify = NotifyStates(gap=self._gap, txn_window=self._txn_window)
        self._pg_channels: dict[str, str] = {}
        self._senders = TaskSet("queue")  # wake-up NOTIFYs, key sweeps
        self._outcomes = Outcomes(self._write, self._q)
        # Outcome flushes and lease renewals both lock job rows; one at a time per process
        # keeps them from deadlocking each other.
        self._write_lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        self._started = False
        self._vacuum_every = check_int(
            self.option("queue_vacuum_every"), "queue_vacuum_every", minimum=0
        )
        self._since_vacuum = 0
        self._last_vacuum = float("-inf")
        self._vacuum_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._outcomes = Outcomes(self._write, self._q)
        self._outcomes.start()
        self._write_lock = asyncio.Lock()
        self._waiter_lock = asyncio.Lock()
        self._renewer = asyncio.create_task(self._renew_loop(), name="pgcoord-queue-leases")
        self._started = True
        workers = list(self._workers.values())
        for worker in workers:
            await self._activate(worker, registered=False)
        await asyncio.gather(*(w.wait_registered() for w in workers))

    async def stop(self) -> None:
        self._started = False
        workers = list(self._workers.values())
        released = await asyncio.gather(*(self._deactivate(w) for w in workers))
        for jobs in released:
            if jobs:
                self._outcomes.release(jobs)
        await self._outcomes.stop(timeout=max(self._rt.connect_timeout, 1.0))
        if self._vacuum_task is not None:
            self._vacuum_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._vacuum_task
            self._vacuum_task = None
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self._senders.cancel()
        if any(released):
            # Released jobs should not wait for a poll on the other instances.
            with contextlib.suppress(PgcoordError):
                async with self._rt.connection("queue stop") as conn:
                    for worker in workers:
                        await conn.execute(self._q.notify, (worker.pg_channel,))

    async def on_reconnect(self) -> None:
        # NOTIFYs sent while the listener was down are gone: look for work now.
        for worker in self._workers.values():
            worker.wake.set()

    def _listening(self) -> bool:
        """True while NOTIFYs can reach the workers (the LISTEN connection is up)."""
        try:
            return self._rt.listener.connected
        except PgcoordError:
            return False

    async def _activate(self, worker: Worker, *, registered: bool = True) -> None:
        await self._rt.listener.listen(worker.pg_channel, worker.on_notify)
        self._rt.listener.add_lost_hook(worker.on_lost)
        worker.start()
        # Back only once the worker's queue_waiters row says it may sleep: a publish that
        # begins after subscribe() (or start()) returned then sees it and sends the NOTIFY,
        # however late it commits. Until then its statement could predate the row, commit
        # after the worker's first claim, and leave the job to the safety net. (start()
        # waits for all its workers at once.)
        if registered:
            await worker.wait_registered()

    async def _deactivate(self, worker: Worker) -> list[tuple[int, int]]:
        self._draining.add(worker)
        try:
            jobs = await worker.stop(self._grace)
        finally:
            self._draining.discard(worker)
        await self._delete_waiter(worker.channel)
        with contextlib.suppress(PgcoordError):
            self._rt.listener.remove_lost_hook(worker.on_lost)
            await self._rt.listener.unlisten(worker.pg_channel, worker.on_notify)
        return jobs

    # -- consuming -------------------------------------------------------------------------

    async def subscribe(
        self,
        channel: str,
        *,
        process: Callable[..., Any],
        idle: Callable[[], bool] | None = None,
        concurrency: int = 1,
        interval: float = 0.25,
    ) -> None:
        """Consume jobs of ``channel`` on this instance with ``process(message, ctx)``.

        ``process`` may be async (run as a task) or sync (run in a thread). ``idle()``, when
        given, is asked before every claim; False pauses claiming. At most ``concurrency``
        jobs run at once (``<= 0``: no limit). An idle worker does not poll: it wakes on a
        NOTIFY within milliseconds, and when the next delayed job, retry or lease it knows of
        comes due. ``interval`` is the poll period only while NOTIFYs cannot arrive (the
        listener is reconnecting) and while ``idle()`` returns False (it is asked again every
        ``interval``). Subscribing again to the same channel replaces the earlier
        subscription. May be called before ``start()``. Once it (or ``start()``) returns,
        the worker is registered as a possible sleeper (unless writing that failed, which is
        logged): a job published from then on wakes it.
        """
        check_key(channel, "channel")
        opts = subscribe_options(
            process=process, idle=idle, concurrency=concurrency, interval=interval
        )
        if channel in self._workers:
            await self.unsubscribe(channel)
        worker = Worker(_WorkerPort(self), channel, opts)
        self._workers[channel] = worker
        if self._started:
            await self._activate(worker)

    async def unsubscribe(self, channel: str) -> None:
        """Stop consuming ``channel`` here, as ``stop()`` does (grace period, then release)."""
        check_key(channel, "channel")
        worker = self._workers.pop(channel, None)
        if worker is None or not self._started:
            return
        jobs = await self._deactivate(worker)
        if jobs:
            self._outcomes.release(jobs)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outcomes.drain(), max(self._rt.connect_timeout, 1.0))
        if jobs:
            # Only a hint for other instances (they poll anyway): a database that is down now
            # must not turn an unsubscribe that did its work into an error.
            with contextlib.suppress(PgcoordError):
                async with self._rt.connection("queue unsubscribe") as conn:
                    await conn.execute(self._q.notify, (worker.pg_channel,))

    def subscribed(self) -> list[str]:
        """The channels this instance consumes."""
        return list(self._workers)

    # -- producing -------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        message: Any,
        *,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
        transaction: object = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Enqueue one job; returns its id.

        ``timeout``: seconds a try may run; ``max_retries``: tries after the first failure;
        ``delay``: seconds before the job may first run; larger ``priority`` runs first.
        With ``transaction=`` the job exists only if that transaction commits.

        ``idempotency_key``: at most one job per key and channel, for
        ``queue_idempotency_window`` seconds (default a day): a publish with a key already
        used returns the first job's id and enqueues nothing. Retry a publish that raised
        :class:`~pgcoord.errors.ConnectionFailedError` (it may have committed) with the same
        key and it cannot enqueue twice.
        """
        key = check_idempotency_key(idempotency_key)
        params = self._one(channel, message, timeout, max_retries, delay, priority, transaction)
        if key is not None:
            params["key"] = key
            ids = await self._insert(
                channel, params, self._keys.publish, self._keys.publish_notify, transaction
            )
            return await self._keyed_result(ids, params, transaction)
        ids = await self._insert(
            channel, params, self._q.publish, self._q.publish_notify, transaction
        )
        return ids[0]

    async def _keyed_result(
        self, ids: Sequence[int | None], params: dict[str, Any], transaction: object
    ) -> int:
        """The new job's id, or (the key was used before) the first job's."""
        self._keyed += 1
        if self._keyed % keys.SWEEP_EVERY == 0:
            self._sweep_keys_soon()
        if ids and ids[0] is not None:
            return ids[0]
        # A fresh statement (and snapshot): the key's row committed before ours gave up.
        if transaction is not None:
            rows = await txn.execute(transaction, self._keys.existing, params)
        else:
            async with self._rt.connection("queue publish (existing key)") as conn:
                cur = await conn.execute(self._keys.existing, params)
                rows = await cur.fetchall()
        if not rows:
            raise JobError(
                f"idempotency_key {params['key']!r}: its job was neither created nor found"
            )
        return int(rows[0][0])

    def _sweep_keys_soon(self) -> None:
        async def sweep() -> None:
            with contextlib.suppress(PgcoordError):
                async with self._rt.connection("queue idempotency key sweep") as conn:
                    await conn.execute(
                        self._keys.sweep, (self._rt.app, self._key_window, keys.SWEEP_BATCH)
                    )

        self._senders.spawn(sweep())

    async def publish_many(
        self,
        channel: str,
        messages: Iterable[Any],
        *,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
        transaction: object = None,
    ) -> list[int]:
        """Enqueue many jobs in one round trip; returns their ids in the order given."""
        params = self._many(channel, messages, timeout, max_retries, delay, priority, transaction)
        if not params["payloads"]:
            return []
        ids = await self._insert(
            channel, params, self._q.publish_many, self._q.publish_many_notify, transaction
        )
        # Ids come from one sequence in row order, so sorting restores the messages' order.
        return sorted(ids)

    def publish_sync(
        self,
        channel: str,
        message: Any,
        *,
        transaction: object,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> int:
        """Blocking ``publish`` for sync code, inside the caller's own transaction.

        ``transaction`` is required: a sync psycopg ``Connection`` or a SQLAlchemy
        ``Connection``/``Session``. The job exists if and only if it commits. Callable from
        any thread. The wake-up NOTIFY rides in that transaction, only when some worker of
        the queue may be asleep. ``idempotency_key`` as for :meth:`publish`.
        """
        key = check_idempotency_key(idempotency_key)
        params = self._one(channel, message, timeout, max_retries, delay, priority, transaction)
        if key is None:
            return self._insert_sync(channel, params, self._q.publish_notify, transaction)[0]
        params["key"] = key
        ids = self._insert_sync(channel, params, self._keys.publish_notify, transaction)
        if ids and ids[0] is not None:
            return ids[0]
        rows = txn.execute_sync(transaction, self._keys.existing, params)
        if not rows:
            raise JobError(f"idempotency_key {key!r}: its job was neither created nor found")
        return int(rows[0][0])

    def publish_many_sync(
        self,
        channel: str,
        messages: Iterable[Any],
        *,
        transaction: object,
        timeout: float = 15.0,
        max_retries: int = 0,
        delay: float = 0.0,
        priority: int = 0,
    ) -> list[int]:
        """Blocking ``publish_many`` for sync code, inside the caller's own transaction."""
        params = self._many(channel, messages, timeout, max_retries, delay, priority, transaction)
        if not params["payloads"]:
            return []
        return sorted(self._insert_sync(channel, params, self._q.publish_many_notify, transaction))

    def _insert_sync(
        self, channel: str, params: dict[str, Any], query: Any, transaction: object
    ) -> list[int]:
        if transaction is None:
            raise InvalidTypeError("publish_sync needs transaction= (a sync connection/session)")
        params["pg_channel"] = self._pg_channel(channel)
        return [r[0] for r in txn.execute_sync(transaction, query, params)]

    def _one(
        self,
        channel: str,
        message: Any,
        timeout: object,
        max_retries: object,
        delay: object,
        priority: object,
        transaction: object,
    ) -> dict[str, Any]:
        check_key(channel, "channel")
        opts = publish_options(
            timeout=timeout, max_retries=max_retries, delay=delay, priority=priority
        )
        payload = codec.encode(message, "message")
        if transaction is not None:
            txn.check_transaction(transaction)
        params = self._params(channel, opts)
        params["payload"] = payload
        return params

    def _many(
        self,
        channel: str,
        messages: Iterable[Any],
        timeout: object,
        max_retries: object,
        delay: object,
        priority: object,
        transaction: object,
    ) -> dict[str, Any]:
        check_key(channel, "channel")
        opts = publish_options(
            timeout=timeout, max_retries=max_retries, delay=delay, priority=priority
        )
        if isinstance(messages, str | bytes | dict) or not isinstance(messages, Iterable):
            raise InvalidTypeError("messages must be an iterable (list) of JSON messages")
        payloads = [codec.encode(m, f"messages[{i}]") for i, m in enumerate(messages)]
        if transaction is not None:
            txn.check_transaction(transaction)
        params = self._params(channel, opts)
        params["payloads"] = payloads
        return params

    def _params(self, channel: str, opts: PublishOptions) -> dict[str, Any]:
        return {
            "app": self._rt.app,
            "channel": channel,
            "priority": opts.priority,
            "delay": opts.delay,
            "max_retries": opts.max_retries,
            "timeout": opts.timeout,
        }

    async def _insert(
        self,
        channel: str,
        params: dict[str, Any],
        plain: Any,
        with_notify: Any,
        transaction: object,
    ) -> list[int]:
        pg_channel = self._pg_channel(channel)
        state = self._notify_state(pg_channel)
        if transaction is None:
            async with self._rt.connection("queue publish") as conn:
                cur = await conn.execute(plain, params)
                rows = await cur.fetchall()
            # Committed: a NOTIFY sent from now on reveals these jobs to whoever it wakes.
            # None is needed when no worker of the queue may be asleep (all busy, or none).
            if rows and rows[0][1]:
                self._request_notify(pg_channel, state, 0.0)
            return [r[0] for r in rows]
        # The NOTIFY always rides inside the caller's transaction (the statement sends it only
        # when a worker may be asleep, so busy queues pay nothing): one sent from outside can
        # arrive before the caller commits, the sleeper then finds nothing, and with no idle
        # poll the job would wait for the safety net. A rolled-back transaction's NOTIFY is
        # dropped with it, so it must not count as a recent one either.
        params["pg_channel"] = pg_channel
        rows = await txn.execute(transaction, with_notify, params)
        return [r[0] for r in rows]

    # -- wake-ups --------------------------------------------------------------------------

    def _pg_channel(self, channel: str) -> str:
        # Hashing the name costs more than the rest of publish()'s Python work: memoise it.
        pg_channel = self._pg_channels.get(channel)
        if pg_channel is None:
            if len(self._pg_channels) > 10_000:
                self._pg_channels.clear()
            pg_channel = self._pg_channels[channel] = self._rt.channel("queue", channel)
        return pg_channel

    def _notify_state(self, pg_channel: str) -> NotifyState:
        return self._notify.get(pg_channel)

    def _request_notify(self, pg_channel: str, state: NotifyState, delay: float) -> None:
        if state.request(time.monotonic(), delay):
            self._senders.spawn(self._send_notifies(pg_channel, state))

    async def _send_notifies(self, pg_channel: str, state: NotifyState) -> None:
        try:
            while True:
                wait = state.next_send(time.monotonic())
                if wait is None:
                    return
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                state.take()
                started = time.monotonic()
                try:
                    async with self._rt.connection("queue wake-up notify") as conn:
                        await conn.execute(self._q.notify, (pg_channel,))
                except PgcoordError as exc:
                    # Workers poll every `interval`: a lost wake-up costs latency, not jobs.
                    log.debug("pgcoord queue: wake-up NOTIFY failed: %s", exc)
                state.sent(started)
        finally:
            state.sending = False

    # -- internals used by workers ---------------------------------------------------------

    async def _claim(self, channel: str, n: int) -> tuple[list[tuple[Any, ...]], float | None]:
        """Claim up to ``n`` jobs; also, when fewer came back, in how many seconds the next
        job of the queue may become claimable (None: no job known)."""
        params = {
            "app": self._rt.app,
            "channel": channel,
            "n": n,
            "lease": self._lease,
            "me": self._rt.instance_id,
        }
        async with self._rt.connection("queue claim") as conn:
            cur = await conn.execute(self._q.claim, params)
            rows = await cur.fetchall()
        # One row at least (the due time rides on every row); job columns are NULL when
        # nothing was claimed.
        due = rows[0][-1] if rows else None
        return [r[:-1] for r in rows if r[0] is not None], due

    async def _set_waiter(self, channel: str, idle: bool) -> None:
        async with self._rt.connection("queue waiter mark") as conn:
            await conn.execute(
                self._q.waiter_set,
                (self._rt.app, channel, self._rt.instance_id, idle, self._waiter_ttl),
            )

    async def _delete_waiter(self, channel: str) -> None:
        with contextlib.suppress(PgcoordError):
            async with self._waiter_lock, self._rt.connection("queue waiter delete") as conn:
                await conn.execute(
                    self._q.waiter_delete, (self._rt.app, channel, self._rt.instance_id)
                )

    async def _refresh_waiters(self) -> None:
        async with self._waiter_lock:
            # Chosen under the lock: a worker that stopped meanwhile has idle_state None.
            known = [w for w in self._workers.values() if w.idle_state is not None]
            if known:
                await self._write_waiters(known)

    async def _write_waiters(self, known: list[Worker]) -> None:
        async with self._rt.connection("queue waiter write") as conn:
            await conn.execute(
                self._q.waiter_refresh,
                (
                    self._rt.app,
                    self._rt.instance_id,
                    self._waiter_ttl,
                    [w.channel for w in known],
                    [bool(w.idle_state) for w in known],
                ),
            )

    async def _write(self, query: Any, params: Any) -> None:
        async with self._write_lock, self._rt.connection("queue outcome write") as conn:
            await conn.execute(query, params)
        if query is self._q.complete or query is self._q.fail:
            self._since_vacuum += len(params[0])
            self._maybe_vacuum()

    def _maybe_vacuum(self) -> None:
        # Every claim and completion leaves dead row versions, and claims scan the claim index
        # from its start, through the dead entries: without VACUUM throughput decays with
        # churn. Autovacuum may be off or visit only once a minute (autovacuum_naptime), so
        # the workers vacuum themselves; SKIP_LOCKED lets one vacuum run while others skip.
        every = self._vacuum_every
        if not every or self._since_vacuum < every:
            return
        if self._vacuum_task is not None and not self._vacuum_task.done():
            return
        now = time.monotonic()
        if now - self._last_vacuum < _VACUUM_MIN_GAP:
            return
        self._since_vacuum = 0
        self._last_vacuum = now
        self._vacuum_task = asyncio.create_task(self._vacuum(), name="pgcoord-queue-vacuum")

    async def _vacuum(self) -> None:
        try:
            async with self._rt.connection("queue vacuum") as conn:
                await conn.execute(self._q.vacuum)
        except PgcoordError as exc:
            # Not the owner, server busy, ...: autovacuum remains; the queue still works.
            log.info("pgcoord queue: VACUUM of the jobs table failed: %s", exc)

    async def _renew_loop(self) -> None:
        every = self._lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                await self._renew_once()
            except Exception:
                # Whatever went wrong, leases must keep being renewed: one failed round is
                # harmless (a lease lasts three rounds), a dead renewer is not.
                log.exception("pgcoord queue: lease renewal round failed; retrying")

    async def _sweep_waiters(self) -> None:
        try:
            async with self._rt.connection("queue waiter sweep") as conn:
                await conn.execute(self._q.waiter_sweep, (self._rt.app, _WAITER_SWEEP_MARGIN))
        except PgcoordError as exc:
            log.info("pgcoord queue: deleting expired worker registrations failed: %s", exc)

    async def _sweep_failed(self, retention: float) -> None:
        """Delete this app's dead letters older than ``retention`` s, a batch at a time."""
        try:
            for _ in range(_FAILED_SWEEP_STATEMENTS):
                async with self._rt.connection("queue dead-letter retention sweep") as conn:
                    cur = await conn.execute(
                        self._q.failed_sweep, (self._rt.app, retention, _FAILED_SWEEP_BATCH)
                    )
                if cur.rowcount < _FAILED_SWEEP_BATCH:
                    break
        except PgcoordError as exc:
            log.info("pgcoord queue: deleting expired dead letters failed: %s", exc)
        finally:
            self._sweeping_failed = False

    async def _renew_once(self) -> None:
        now = time.monotonic()
        if now - self._last_key_sweep >= min(keys.SWEEP_INTERVAL, self._key_window):
            # Expired idempotency keys of this app: every running instance sweeps now and
            # then (one indexed DELETE), so keys cannot pile up whoever published them.
            self._last_key_sweep = now
            self._sweep_keys_soon()
        if now - self._last_waiter_sweep >= self._waiter_every:
            # Registrations of killed instances of this app (defect: they stayed forever and
            # every enqueue's EXISTS scanned them). Every running instance does it now and
            # then: one small indexed DELETE, in the background so it never delays leases.
            self._last_waiter_sweep = now
            self._senders.spawn(self._sweep_waiters())
        retention = self._failed_retention
        if (
            retention is not None
            and not self._sweeping_failed
            and now - self._last_failed_sweep >= min(_FAILED_SWEEP_INTERVAL, retention)
        ):
            self._last_failed_sweep = now
            self._sweeping_failed = True
            self._senders.spawn(self._sweep_failed(retention))
        if now - self._last_waiter_refresh >= self._waiter_every - 0.5:
            self._last_waiter_refresh = now
            try:
                await self._refresh_waiters()
            except PgcoordError as exc:
                log.warning("pgcoord queue: refreshing worker registrations failed (%s)", exc)
        held = [
            (job.id, job.attempt, worker)
            for worker in set(self._workers.values()) | self._draining
            for job in list(worker.running.values())
        ]
        if not held:
            return
        ids = [h[0] for h in held]
        attempts = [h[1] for h in held]
        try:
            async with self._write_lock, self._rt.connection("queue lease renewal") as conn:
                cur = await conn.execute(self._q.renew, (self._lease, ids, attempts))
                kept = {r[0] for r in await cur.fetchall()}
        except PgcoordError as exc:
            log.warning("pgcoord queue: renewing leases failed (%s); retrying", exc)
            return
        for job_id, attempt, worker in held:
            if job_id in kept:
                continue
            job = worker.running.get(job_id)
            if job is not None and job.attempt == attempt:
                # Another worker claimed it after our lease ran out: stop working on it.
                log.warning("pgcoord job %s: lease lost to another worker; cancelling", job_id)
                job.lost = True
                job.signal.set("lost")
                if job.task is not None:
                    job.task.cancel()

    # -- dead letters and introspection ----------------------------------------------------

    async def failed_jobs(
        self, channel: str | None = None, *, ids: Iterable[int] | None = None, limit: int = 100
    ) -> list[FailedJob]:
        """Dead letters of this app (optionally one channel / some ids), oldest first."""
        async with self._rt.connection("queue failed_jobs") as conn:
            return await deadletters.list_failed(
                conn, self._q, self._rt.app, channel=channel, ids=ids, limit=limit
            )

    async def retry_failed(
        self, channel: str | None = None, *, ids: Iterable[int] | None = None
    ) -> list[int]:
        """Put dead letters back in their queues (same id, retry budget reset); their ids."""
        async with self._rt.connection("queue retry_failed") as conn:
            moved = await deadletters.retry_failed(
                conn, self._q, self._rt.app, channel=channel, ids=ids
            )
            for ch in sorted({c for _, c in moved}):
                await conn.execute(self._q.notify, (self._rt.channel("queue", ch),))
        return sorted(i for i, _ in moved)

    async def purge_failed(
        self,
        channel: str | None = None,
        *,
        ids: Iterable[int] | None = None,
        older_than: float | None = None,
    ) -> int:
        """Delete dead letters for good (optionally only those failed > ``older_than`` s ago)."""
        async with self._rt.connection("queue purge_failed") as conn:
            return await deadletters.purge_failed(
                conn, self._q, self._rt.app, channel=channel, ids=ids, older_than=older_than
            )

    async def stats(self, channel: str) -> dict[str, int]:
        """Jobs of ``channel`` now: ``ready`` (claimable), ``running`` (leased), ``scheduled``."""
        check_key(channel, "channel")
        async with self._rt.connection("queue stats") as conn:
            cur = await conn.execute(self._q.counts, (self._rt.app, channel))
            row = await cur.fetchone()
        assert row is not None
        return {"ready": row[0], "running": row[1], "scheduled": row[2]}

    async def flush(self) -> None:
        """Wait until every finished try of this instance is written to the database."""
        with translated():
            await self._outcomes.drain()


class _WorkerPort:
    """The :class:`~pgcoord.queue.ports.WorkerHost` an :class:`EventQueue` gives its workers:
    the few things they use, without making them public on the queue itself."""

    __slots__ = ("_queue",)

    def __init__(self, queue: EventQueue) -> None:
        self._queue = queue

    @property
    def outcomes(self) -> Outcomes:
        """Where outcomes go."""
        return self._queue._outcomes

    @property
    def batch(self) -> int:
        """``queue_batch``."""
        return self._queue._batch

    @property
    def idle_poll(self) -> float:
        """``queue_idle_poll``."""
        return self._queue._idle_poll

    @property
    def max_interruptions(self) -> int:
        """``queue_max_interruptions``."""
        return self._queue._max_interruptions

    def pg_channel(self, channel: str) -> str:
        """The Postgres channel announcing jobs of ``channel``."""
        return self._queue._pg_channel(channel)

    def listening(self) -> bool:
        """Whether NOTIFYs can reach the workers now."""
        return self._queue._listening()

    async def claim(self, channel: str, n: int) -> tuple[list[tuple[Any, ...]], float | None]:
        """Claim up to ``n`` jobs of ``channel``."""
        return await self._queue._claim(channel, n)

    async def set_waiter(self, channel: str, idle: bool) -> None:
        """Record whether this instance's worker of ``channel`` may be asleep."""
        await self._queue._set_waiter(channel, idle)
