"""The machinery shared by pub/sub, sync messages and plugins: publish, receive, catch up.

Receiving. The listener calls :meth:`Engine.on_notify` for every notification, in the order
Postgres delivers them, which is commit order. A plain pub/sub notification carries the envelope
itself and is ready at once; others (a sync message, a large payload, every pub/sub message under
``pubsub_via_table``, a transaction's wake-up, the catch-up after a reconnect) need a read from
``message_log``. Any role with CONNECT may NOTIFY any channel, so a payload is checked before it
is used, and on a channel whose real messages are all pointers an envelope carried by the NOTIFY
is ignored: what such channels deliver comes from the table, which privileges protect.

Notifications enter one FIFO *pipeline* of batches (:class:`_Batch`). The newest batch collects
every notification that arrives while reads are running; it is read, with one ``id = ANY``
and one ``xid = ANY`` statement however many pointers and wake-ups it holds, as soon as fewer
than :data:`_READS_IN_FLIGHT` batch reads run. Batches are handed to the subscriptions strictly
in arrival order, and within a batch every message keeps its arrival position, so a handler
sees the messages of a channel in commit order whatever path they took. When the pipeline is
empty, a ready message is handed over immediately (the fast path). A batch holds at most
:data:`_PENDING_MAX` notifications, so a forged flood costs a few reads, two tasks and a bounded
memory: past the bound, pub/sub notifications are dropped and counted
(:attr:`Engine.dropped_notifications`), and sync ones collapse into one read of the durable log
from the last commit_seq handed over, which loses nothing.

Catch-up. Every sync message is also written to ``message_log``. When the listener reconnects,
a catch-up item enters the pipeline *before* anything received on the new connection: it reads
back the log of this instance's sync channels over the retention window, keeping only rows not
visible in the snapshot taken when the channel's LISTEN became active (those committed before
this instance listened). Every sync message id delivered is remembered (:class:`SeenIds`) for
longer than the log keeps rows, so a message that arrives both live and from the log is delivered
once. Reading the log by "id greater than the last one seen" would be wrong: ids are taken when a
transaction inserts, not when it commits, so a row committed late behind a higher id would be
skipped forever. For the same reason the catch-up replays rows by ``commit_seq``, which a deferred
trigger takes at COMMIT under one advisory lock (migration 0002): that is commit order, the order
live NOTIFY delivery follows, even for overlapping transactions of different publishers.

Backlogs. Each subscription keeps at most ``pubsub_backlog`` messages for its handler
(:mod:`pgcoord.pubsub.subscription`); a sync subscription that falls further behind reads the
rest back through :meth:`Engine.reread`, by ``commit_seq``.

Retention. Every row names its app; an app's sweeper deletes only its own rows, by its own
retentions, so apps sharing a schema never shorten each other's catch-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple, TypeAlias

from pgcoord import codec
from pgcoord import transaction as txn
from pgcoord._retry import Backoff, TaskSet
from pgcoord.errors import InvalidTypeError, PgcoordError
from pgcoord.pubsub import envelope as wire
from pgcoord.pubsub.queries import Queries
from pgcoord.pubsub.seen import SeenIds
from pgcoord.pubsub.subscription import Handler, Reread, Subscription
from pgcoord.runtime import Runtime
from pgcoord.validation import (
    check_callable,
    check_int,
    check_key,
    check_non_negative,
    check_positive,
)

log = logging.getLogger("pgcoord.pubsub")


class Arrival(NamedTuple):
    """One message ready for the subscriptions of its Postgres channel."""

    pg: str
    envelope: wire.Envelope
    #: Read from ``message_log`` (not carried by the NOTIFY itself).
    logged: bool = False
    #: The row's commit-order number: sync messages only.
    commit_seq: int | None = None


#: A batch of messages ready for the subscriptions, in arrival order.
Ready: TypeAlias = list[Arrival]

# Reads for the pipeline retry for about this long (a restarting server) before giving up.
_READ_RETRY_SECONDS = 30.0
_SWEEP_BATCH = 1000
# Seen ids are kept this much longer than the log keeps rows (clock skew, slow deliveries).
_SEEN_MARGIN = 60.0
#: Notifications one batch collects at most; past it a flood is dropped (pub/sub) or collapsed
#: into one catch-up read (sync). Ten thousand pointers are one ``id = ANY`` read of a few ms.
_PENDING_MAX = 10_000
#: Batch reads running at once: one in flight while the next collects, plus one more so a
#: slow read (a restarting server) does not hold back a batch that is ready.
_READS_IN_FLIGHT = 2
#: Seconds between two warnings of one kind about notifications that named nothing readable.
_WARN_EVERY = 10.0

# Kinds of batch entries: a message carried by the NOTIFY, a pointer, a wake-up, a catch-up.
_MESSAGE, _POINTER, _WAKE, _CATCH_UP = range(4)


@lru_cache(maxsize=4096)
def _channel_json(channel: str) -> str:
    return codec.encode(channel, "channel")


class _Channel:
    """One Postgres channel: the subscriptions of each user channel mapped to it."""

    __slots__ = ("durable", "pg", "subs")

    def __init__(self, pg: str, durable: bool) -> None:
        self.pg = pg
        self.durable = durable
        # Keyed by the user's channel: two names hashed to one Postgres channel stay apart.
        self.subs: dict[str, list[Subscription]] = {}


class _Batch:
    """Notifications handed over together after one read of the log (see the module docstring).

    ``entries`` keep arrival order: (kind, value, Postgres channel) with value an Arrival, a
    row id, an xid, or None for a catch-up. A pointer or xid repeated within the batch is kept
    once, so a flood of one replayed pointer costs one entry.
    """

    __slots__ = ("entries", "keys", "overflowed", "task")

    def __init__(self) -> None:
        self.entries: list[tuple[int, Any, str]] = []
        self.keys: set[tuple[int, Any, str]] = set()
        #: Sync notifications were let go past the bound: read the durable log after the last
        #: commit_seq handed over instead.
        self.overflowed = False
        self.task: asyncio.Task[Ready] | None = None


class Engine:
    """Publishing and delivery for one Coordinator; see the module docstring.

    One engine serves both :class:`~pgcoord.PubSubManager` and
    :class:`~pgcoord.SyncMessageManager` (sync messages are durable pub/sub): one delivery
    pipeline keeps commit order across both, and one sweeper keeps the message log they share.
    Its users call :meth:`subscribe`, :meth:`unsubscribe` and :meth:`publish` with their service
    tag (which namespaces their Postgres channels) and whether their messages are durable.
    """

    def __init__(
        self,
        rt: Runtime,
        *,
        max_payload: int,
        spill_retention: float,
        sync_retention: float,
        backlog: int = 10_000,
        via_table: bool = False,
    ) -> None:
        self._rt = rt
        self.max_payload = max_payload
        self.spill_retention = spill_retention
        self.sync_retention = sync_retention
        self.backlog = backlog
        self.via_table = via_table
        #: Pub/sub messages dropped from full subscription backlogs since construction.
        self.dropped = 0
        #: Pub/sub notifications (messages, pointers, wake-ups) dropped because a flood
        #: overflowed the pending batch (:data:`_PENDING_MAX`), since construction.
        self.dropped_notifications = 0
        #: Notifications waiting in the pipeline (collected or being read).
        self.pending = 0
        #: Notifications one batch collects at most (:data:`_PENDING_MAX`; tests lower it).
        self.pending_max = _PENDING_MAX
        self._q = Queries(rt.table("message_log"))
        self._wake = rt.channel("wake", "transactions")
        self._sweep_key = rt.advisory_key("pubsub", "sweep")
        self._sender_json = codec.encode(rt.instance_id)
        self._seq = itertools.count(1)
        self._pg_names: dict[tuple[str, str], str] = {}
        self._channels: dict[str, _Channel] = {}
        self._snapshots: dict[str, str] = {}
        self._seen = SeenIds(self.sync_retention + _SEEN_MARGIN)
        # Pub/sub messages read from the log, remembered as long as the reads would return
        # them: a pointer or wake-up that anyone can NOTIFY again must not replay one.
        self._seen_logged = SeenIds(self.spill_retention + _SEEN_MARGIN)
        # How old a row reads by pointer or wake-up still return (sync, pub/sub): past its
        # retention, with slack for a delayed read, and well within the seen-id horizons.
        self._windows = (
            self.sync_retention + _SEEN_MARGIN / 2,
            self.spill_retention + _SEEN_MARGIN / 2,
        )
        self._pipeline: deque[_Batch] = deque()
        # The pipeline's last batch while it collects (not read yet): only the last can be.
        self._collecting: _Batch | None = None
        self._drainer: asyncio.Task[None] | None = None
        # Batch reads feeding the pipeline: the drainer awaits each one and logs its failure.
        self._tasks = TaskSet("pub/sub", log_failures=False)
        # Snapshot taken before this engine's first LISTEN: rows visible in it were committed
        # before it listened, so no pointer or wake-up it receives is really for them.
        self._start_snapshot = ""
        # The highest commit_seq handed to the subscriptions: where a collapsed flood resumes.
        self._last_seq = 0
        self._warned_at: dict[str, float] = {}
        self._unwarned: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._running = False
        self._reconnects = 0

    @classmethod
    def from_options(cls, rt: Runtime, defaults: Mapping[str, Any]) -> Engine:
        """The engine the Coordinator's options configure: ``pubsub_max_payload``,
        ``pubsub_spill_retention``, ``pubsub_backlog``, ``pubsub_via_table`` (PubSubManager's)
        and ``sync_log_retention`` (SyncMessageManager's), each else its default from
        ``defaults``; a bad value raises ValueError/TypeError naming the option."""

        def option(name: str) -> Any:
            return rt.options.get(name, defaults[name])

        via_table = option("pubsub_via_table")
        if not isinstance(via_table, bool):
            raise InvalidTypeError(
                f"pubsub_via_table must be a bool, not {type(via_table).__name__}"
            )
        return cls(
            rt,
            max_payload=check_int(option("pubsub_max_payload"), "pubsub_max_payload", minimum=1),
            spill_retention=check_positive(
                option("pubsub_spill_retention"), "pubsub_spill_retention"
            ),
            sync_retention=check_positive(option("sync_log_retention"), "sync_log_retention"),
            backlog=check_int(option("pubsub_backlog"), "pubsub_backlog", minimum=1),
            via_table=via_table,
        )

    # -- names -----------------------------------------------------------------------------

    def _pg(self, tag: str, channel: str) -> str:
        key = (tag, channel)
        name = self._pg_names.get(key)
        if name is None:
            if len(self._pg_names) >= 4096:
                self._pg_names.clear()
            name = self._pg_names[key] = self._rt.channel(tag, channel)
        return name

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the subscriptions made so far, LISTEN, and start the sweeper."""
        if self._running:
            return
        self._running = True
        listener = self._rt.listener
        self._reconnects = listener.reconnects
        self._start_snapshot = await self._snapshot()
        await listener.listen(self._wake, self.on_notify)
        for sub in self._all_subscriptions():
            sub.open()
        for pg in list(self._channels):
            await listener.listen(pg, self.on_notify)
        durable = [ch.pg for ch in self._channels.values() if ch.durable]
        if durable:
            snapshot = await self._snapshot()
            for pg in durable:
                self._snapshots[pg] = snapshot
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="pgcoord-message-sweeper")

    async def stop(self) -> None:
        """Stop delivering: no handler is called after this returns (idempotent)."""
        if not self._running:
            return
        self._running = False
        tasks = [t for t in (self._drainer, self._sweeper, *self._tasks) if t is not None]
        self._drainer = self._sweeper = None
        self._pipeline.clear()
        self._collecting = None
        self.pending = 0
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        # Copied first: a handler finishing while we await may unsubscribe.
        for sub in self._all_subscriptions():
            await sub.close()
        await asyncio.gather(*(t for t in tasks if t is not current), return_exceptions=True)
        self._snapshots.clear()
        with contextlib.suppress(PgcoordError):
            listener = self._rt.listener
            for pg in [self._wake, *self._channels]:
                await listener.unlisten(pg, self.on_notify)

    # -- subscriptions ---------------------------------------------------------------------

    def _all_subscriptions(self) -> list[Subscription]:
        return [sub for ch in self._channels.values() for subs in ch.subs.values() for sub in subs]

    async def subscribe(
        self, tag: str, channel: str, handler: Handler, debounce: float, *, durable: bool
    ) -> None:
        """Call ``handler`` for every message on ``channel`` of service ``tag``."""
        check_key(channel, "channel", stored=False)
        check_callable(handler, "handler")
        debounce = check_non_negative(debounce, "debounce")
        pg = self._pg(tag, channel)
        ch = self._channels.get(pg)
        new_channel = ch is None
        if ch is None:
            ch = self._channels[pg] = _Channel(pg, durable)
        subs = ch.subs.setdefault(channel, [])
        for sub in subs:
            if sub.handler == handler:
                # Subscribing the same handler again delivers once; the newer debounce wins.
                sub.debounce = debounce
                return
        sub = Subscription(
            channel, handler, debounce, backlog=self.backlog, durable=durable, host=self
        )
        subs.append(sub)
        if not self._running:
            return
        sub.open()
        try:
            if new_channel:
                await self._rt.listener.listen(pg, self.on_notify)
                if durable:
                    self._snapshots[pg] = await self._snapshot()
        except BaseException:
            # Undo the registration: a live handler without its LISTEN or snapshot would miss
            # messages (catch-up skips a channel with no snapshot) and a retried subscribe()
            # would return early as a duplicate.
            await self._forget(pg, ch, channel, sub)
            raise

    async def _forget(self, pg: str, ch: _Channel, channel: str, sub: Subscription) -> None:
        subs = ch.subs.get(channel, [])
        if sub in subs:
            subs.remove(sub)
        await sub.close()
        if not subs:
            ch.subs.pop(channel, None)
        if not ch.subs and self._channels.get(pg) is ch:
            del self._channels[pg]
            self._snapshots.pop(pg, None)
            if self._running:
                with contextlib.suppress(PgcoordError):
                    await self._rt.listener.unlisten(pg, self.on_notify)

    async def unsubscribe(self, tag: str, channel: str, handler: Handler) -> None:
        """Stop calling ``handler`` for ``channel`` (no error if it was not subscribed)."""
        check_key(channel, "channel", stored=False)
        check_callable(handler, "handler")
        pg = self._pg(tag, channel)
        ch = self._channels.get(pg)
        if ch is None:
            return
        subs = ch.subs.get(channel, [])
        for sub in subs:
            if sub.handler == handler:
                subs.remove(sub)
                await sub.close()
                break
        if not subs:
            ch.subs.pop(channel, None)
        if not ch.subs:
            del self._channels[pg]
            self._snapshots.pop(pg, None)
            if self._running:
                await self._rt.listener.unlisten(pg, self.on_notify)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        tag: str,
        channel: str,
        message: object,
        *,
        skip_self: bool,
        only_self: bool,
        transaction: object,
        durable: bool,
    ) -> None:
        """Send ``message``; see PubSubManager.publish and SyncMessageManager.publish."""
        check_key(channel, "channel", stored=False)
        flags = wire.flags_for(skip_self, only_self)
        if transaction is not None:
            txn.check_transaction(transaction)
        text = wire.encode_message(message, self.max_payload)
        self._rt.check_running()
        envelope = wire.build(
            _channel_json(channel), self._sender_json, next(self._seq), flags, text
        )
        pg = self._pg(tag, channel)
        app = self._rt.app
        if transaction is not None:
            await txn.execute(
                transaction,
                self._q.insert_in_transaction,
                (app, pg, durable, envelope, self._wake),
            )
            return
        what = "sync message publish" if durable else "pub/sub publish"
        # A sync message always travels as a pointer to its row, and so does every pub/sub
        # message under pubsub_via_table: receivers then deliver only what is in the table,
        # which privileges protect, never a payload that anyone with CONNECT can NOTIFY.
        inline = not durable and not self.via_table and wire.fits_notify(envelope)
        if inline:
            await self._send(self._q.notify, (pg, envelope), what)
        else:
            await self._send(self._q.insert_and_notify, (app, pg, durable, envelope), what)

    async def _send(self, query: bytes, params: Sequence[Any], what: str) -> None:
        # Not retried: a connection the server closed while idle is replaced before anything
        # is sent on it (see WorkSource.acquire), so an error here came after the statement
        # may have reached the server, and sending again could deliver twice.
        async with self._rt.connection(what) as conn:
            await conn.execute(query, params)

    def _label(self, what: str) -> str:
        return f"pub/sub {what}"

    # -- receiving -------------------------------------------------------------------------

    def on_notify(self, pg: str, payload: str) -> None:
        """Listener callback: add one notification to the pipeline (never blocks)."""
        if not self._running:
            return
        if self._rt.listener.reconnects != self._reconnects:
            self.on_reconnect()
        # Anyone with CONNECT may NOTIFY any channel (docs/security.md): every payload is
        # checked, and a malformed one is logged and dropped without touching the server.
        if pg == self._wake:
            if not self._channels:
                return
            try:
                xid = wire.wake_xid(payload)
            except ValueError as exc:
                log.warning("pgcoord: dropped a notification on %s: %s", pg, exc)
                return
            self._add(_WAKE, xid, pg, durable=any(c.durable for c in self._channels.values()))
            return
        ch = self._channels.get(pg)
        if ch is None:
            return
        try:
            row_id = wire.pointer_id(payload)
        except ValueError as exc:
            log.warning("pgcoord: dropped a malformed message on %s: %s", pg, exc)
            return
        if row_id is not None:
            self._add(_POINTER, row_id, pg, durable=ch.durable)
            return
        if ch.durable or self.via_table:
            # Real messages of this channel come as pointers: an envelope in the NOTIFY
            # itself was forged (or sent by a pgcoord older than this one), never delivered.
            log.debug("pgcoord: ignored a message carried by a NOTIFY on %s", pg)
            return
        try:
            arrival = Arrival(pg, wire.parse(payload))
        except ValueError as exc:
            log.warning("pgcoord: dropped a malformed message on %s: %s", pg, exc)
            return
        if not self._pipeline:
            self._deliver([arrival])
            return
        self._add(_MESSAGE, arrival, pg, durable=False)

    def on_reconnect(self) -> None:
        """The listener reconnected: queue a catch-up ahead of what the new connection brings."""
        listener = self._rt.listener
        if not self._running or listener.reconnects == self._reconnects:
            return
        self._reconnects = listener.reconnects
        if any(ch.durable for ch in self._channels.values()):
            self._add(_CATCH_UP, None, "", durable=True)

    def _add(self, kind: int, value: Any, pg: str, *, durable: bool) -> None:
        """Put one notification in the collecting batch (a new one if none collects)."""
        batch = self._collecting
        if batch is None:
            batch = self._collecting = _Batch()
            self._pipeline.append(batch)
        key = (kind, value, pg)
        if kind != _MESSAGE and key in batch.keys:
            return
        if kind != _CATCH_UP and len(batch.entries) >= self.pending_max:
            self._overflow(batch, kind, durable)
        else:
            if kind != _MESSAGE:
                batch.keys.add(key)
            batch.entries.append(key)
            self.pending += 1
        self._start_reads()
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="pgcoord-message-pipeline")

    def _overflow(self, batch: _Batch, kind: int, durable: bool) -> None:
        # A flood: nothing of it is kept. What was durable is read back by commit_seq; a
        # wake-up may also have named pub/sub rows, so it counts as dropped as well.
        if durable:
            batch.overflowed = True
        if kind != _POINTER or not durable:
            self.dropped_notifications += 1
        self._warn(
            "overflow",
            1,
            "pgcoord: %d notifications arrived while %d others waited to be read (a flood, "
            "maybe forged); pub/sub ones were dropped (%d in all), sync ones are read back "
            "from the message log",
            self.pending_max,
            self.dropped_notifications,
        )

    def _start_reads(self) -> None:
        batch = self._collecting
        if batch is None or len(self._tasks) >= _READS_IN_FLIGHT:
            return
        self._collecting = None
        task: asyncio.Task[Ready] = self._tasks.spawn(self._read_batch(batch))
        # A finished read lets the collecting batch start at once, whatever the drainer awaits.
        task.add_done_callback(lambda _: self._start_reads() if self._running else None)
        batch.task = task

    async def _drain(self) -> None:
        try:
            while self._pipeline:
                head = self._pipeline[0]
                if head.task is None:
                    # Only the collecting batch can be unread: no read runs ahead of it.
                    self._start_reads()
                assert head.task is not None
                try:
                    ready = await head.task
                except Exception:
                    # A read that failed unexpectedly must not stay at the head: every
                    # later message would queue behind it forever. Its messages are lost
                    # (logged); the rest of the pipeline goes on.
                    log.exception("pgcoord: reading messages failed; dropped them")
                    ready = []
                if not self._pipeline or self._pipeline[0] is not head:
                    return  # stopped meanwhile
                self._pipeline.popleft()
                self.pending -= len(head.entries)
                if self._running:
                    self._deliver(ready)
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None

    def _deliver(self, ready: Ready) -> None:
        now = asyncio.get_running_loop().time()
        me = self._rt.instance_id
        for pg, env, logged, commit_seq in ready:
            if commit_seq is not None and commit_seq > self._last_seq:
                self._last_seq = commit_seq
            ch = self._channels.get(pg)
            if ch is None:
                continue
            subs = ch.subs.get(env.channel)
            if not subs or not env.wanted_by(me):
                continue
            if ch.durable:
                if not logged or not self._seen.add(env.key, now):
                    continue
            elif logged and not self._seen_logged.add(env.key, now):
                continue
            for sub in tuple(subs):
                sub.offer(env.message, commit_seq)

    def _warn(self, kind: str, count: int, message: str, *args: Any) -> None:
        """Log ``message`` at most once every :data:`_WARN_EVERY` seconds per ``kind``: a flood
        must not become a flood of log lines. Its first argument is how many times it happened
        since the last line (``count`` now and those left unlogged before)."""
        # Each one at debug level (cheap when disabled), so none goes unrecorded if wanted.
        log.debug(message, count, *args)
        count += self._unwarned.get(kind, 0)
        now = asyncio.get_running_loop().time()
        if now - self._warned_at.get(kind, -_WARN_EVERY) < _WARN_EVERY:
            self._unwarned[kind] = count
            return
        self._warned_at[kind] = now
        self._unwarned[kind] = 0
        log.warning(message, count, *args)

    # -- backlogs (the Host of each Subscription) --------------------------------------------

    def count_dropped(self, count: int) -> None:
        """A subscription dropped ``count`` pub/sub messages from its full backlog."""
        self.dropped += count

    async def reread(self, sub: Subscription, after: int, limit: int) -> Reread | None:
        """Up to ``limit`` of ``sub``'s sync messages numbered after ``after`` (commit order)."""
        pg = next(
            (pg for pg, ch in self._channels.items() if sub in ch.subs.get(sub.channel, ())),
            None,
        )
        if pg is None:
            return Reread([], None, False)
        rows = await self._read_rows(
            "sync messages a slow handler let go",
            self._q.after_seq,
            (pg, after, limit),
        )
        if rows is None:
            return None
        me = self._rt.instance_id
        messages: list[tuple[int, Any]] = []
        last: int | None = None
        for _, text, seq in rows:
            last = seq
            try:
                env = wire.parse(text)
            except ValueError as exc:
                log.warning("pgcoord: dropped a malformed logged message on %s: %s", pg, exc)
                continue
            if env.channel == sub.channel and env.wanted_by(me):
                messages.append((seq, env.message))
        return Reread(messages, last, len(rows) >= limit)

    # -- reads -----------------------------------------------------------------------------

    async def _read_rows(
        self, what: str, query: bytes, params: Sequence[Any]
    ) -> list[tuple[Any, ...]] | None:
        """The rows of a read, retried while the server is unreachable; None on giving up."""
        backoff = Backoff(0.05, 2.0, budget=_READ_RETRY_SECONDS)
        while True:
            try:
                async with self._rt.connection(self._label(what)) as conn:
                    cur = await conn.execute(query, params)
                    return await cur.fetchall()
            except PgcoordError as exc:
                delay = backoff.next()
                if not self._running or delay is None:
                    log.error("pgcoord: giving up reading %s: %s", what, exc)
                    return None
                log.warning("pgcoord: reading %s failed (%s); retrying", what, exc)
                await asyncio.sleep(delay)

    @staticmethod
    def _parsed(row: Sequence[Any]) -> Arrival | None:
        pg, text, commit_seq = row
        try:
            return Arrival(pg, wire.parse(text), True, commit_seq)
        except ValueError as exc:
            log.warning("pgcoord: dropped a malformed logged message on %s: %s", pg, exc)
            return None

    async def _read_batch(self, batch: _Batch) -> Ready:
        """The messages of ``batch`` in arrival order: at most one read per kind of entry."""
        ids = [value for kind, value, _ in batch.entries if kind == _POINTER]
        xids = [value for kind, value, _ in batch.entries if kind == _WAKE]
        by_id: dict[int, tuple[Any, ...]] = {}
        if ids:
            params: tuple[Any, ...] = (ids, *self._windows, self._start_snapshot)
            for row_id, *row in (
                await self._read_rows("logged messages", self._q.by_id, params) or ()
            ):
                by_id[row_id] = tuple(row)
        by_xid: dict[int, list[Arrival]] = {}
        if xids and self._channels:
            params = (xids, list(self._channels), self._start_snapshot)
            for xid, *row in (
                await self._read_rows("transactions' messages", self._q.by_xid, params) or ()
            ):
                arrival = self._parsed(row)
                if arrival is not None:
                    by_xid.setdefault(xid, []).append(arrival)
        ready: Ready = []
        gone = elsewhere = 0
        for kind, value, pg in batch.entries:
            if kind == _MESSAGE:
                ready.append(value)
            elif kind == _POINTER:
                found = by_id.get(value)
                if found is None:
                    gone += 1
                elif found[0] != pg:
                    # A pointer NOTIFYed on one channel never delivers another channel's row.
                    elsewhere += 1
                else:
                    arrival = self._parsed(found)
                    if arrival is not None:
                        ready.append(arrival)
            elif kind == _WAKE:
                ready.extend(by_xid.get(value, ()))
            else:
                ready.extend(await self._catch_up())
        if batch.overflowed:
            ready.extend(await self._catch_up(after=self._last_seq))
        if gone:
            # Swept already, or pointers someone NOTIFYed that name no recent row.
            self._warn(
                "gone", gone, "pgcoord: %d logged messages were gone before they could be read"
            )
        if elsewhere:
            self._warn(
                "elsewhere", elsewhere, "pgcoord: dropped %d pointers to another channel's message"
            )
        return ready

    async def _catch_up(self, after: int | None = None) -> Ready:
        """The sync messages of this instance's channels it may have missed: since each one's
        LISTEN (after a reconnect), or only after commit_seq ``after`` (after a flood)."""
        pgs = [pg for pg, ch in self._channels.items() if ch.durable and pg in self._snapshots]
        if not pgs:
            return []
        snaps = [self._snapshots[pg] for pg in pgs]
        params: tuple[Any, ...]
        if after is None:
            query, params = self._q.catch_up, (pgs, snaps, self.sync_retention)
        else:
            query, params = self._q.catch_up_after, (pgs, snaps, self.sync_retention, after)
        ready: Ready = []
        for row in await self._read_rows("missed sync messages", query, params) or ():
            arrival = self._parsed(row)
            if arrival is not None:
                ready.append(arrival)
        log.info("pgcoord: caught up on the sync-message log (%d rows read)", len(ready))
        return ready

    async def _snapshot(self) -> str:
        async with self._rt.connection(self._label("catch-up snapshot")) as conn:
            cur = await conn.execute(self._q.snapshot)
            row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    # -- retention -------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        interval = min(30.0, max(0.2, min(self.sync_retention, self.spill_retention) / 4))
        while True:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except PgcoordError as exc:
                log.warning("pgcoord: sweeping the message log failed: %s", exc)

    async def sweep(self) -> int:
        """Delete expired log rows (skipped if another instance is sweeping); returns the count."""
        total = 0
        shortest = min(self.sync_retention, self.spill_retention)
        params = (
            self._sweep_key,
            self._rt.app,
            shortest,
            self.sync_retention,
            self.spill_retention,
            _SWEEP_BATCH,
        )
        while True:
            async with self._rt.connection(self._label("sweep")) as conn:
                cur = await conn.execute(self._q.sweep, params)
            total += max(cur.rowcount, 0)
            if cur.rowcount < _SWEEP_BATCH:
                return total
