"""The machinery shared by pub/sub, sync messages and plugins: publish, receive, catch up.

Receiving. The listener calls :meth:`Engine.on_notify` for every notification, in the order
Postgres delivers them, which is commit order. A plain pub/sub notification carries the envelope
itself and is ready at once; others (a sync message, a large payload, every pub/sub message under
``pubsub_via_table``, a transaction's wake-up, the catch-up after a reconnect) need a read from
``message_log``. Any role with CONNECT may NOTIFY any channel, so a payload is checked before it
is used, and on a channel whose real messages are all pointers an envelope carried by the NOTIFY
is ignored: what such channels deliver comes from the table, which privileges protect. Each becomes an item of one FIFO *pipeline*: reads
start at once and run concurrently, but items are handed to the subscriptions strictly in
arrival order, so a handler sees the messages of a channel in commit order whatever path they
took. When the pipeline is empty, a ready message is handed over immediately (the fast path).

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
from collections.abc import Coroutine, Mapping, Sequence
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
Item: TypeAlias = Ready | asyncio.Task[Ready]

# Reads for the pipeline retry for about this long (a restarting server) before giving up.
_READ_RETRY_SECONDS = 30.0
_SWEEP_BATCH = 1000
# Seen ids are kept this much longer than the log keeps rows (clock skew, slow deliveries).
_SEEN_MARGIN = 60.0


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
        self._pipeline: deque[Item] = deque()
        self._drainer: asyncio.Task[None] | None = None
        # Reads feeding the pipeline: the drainer awaits each one and logs its failure.
        self._tasks = TaskSet("pub/sub", log_failures=False)
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
        """Listener callback: turn one notification into a pipeline item (never blocks)."""
        if not self._running:
            return
        if self._rt.listener.reconnects != self._reconnects:
            self.on_reconnect()
        item: Item
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
            item = self._spawn(self._read_transaction(xid))
        else:
            ch = self._channels.get(pg)
            if ch is None:
                return
            try:
                row_id = wire.pointer_id(payload)
            except ValueError as exc:
                log.warning("pgcoord: dropped a malformed message on %s: %s", pg, exc)
                return
            if row_id is not None:
                item = self._spawn(self._on_channel(pg, self._read_spilled(row_id)))
            elif ch.durable or self.via_table:
                # Real messages of this channel come as pointers: an envelope in the NOTIFY
                # itself was forged (or sent by a pgcoord older than this one), never delivered.
                log.debug("pgcoord: ignored a message carried by a NOTIFY on %s", pg)
                return
            else:
                try:
                    item = [Arrival(pg, wire.parse(payload))]
                except ValueError as exc:
                    log.warning("pgcoord: dropped a malformed message on %s: %s", pg, exc)
                    return
                if not self._pipeline:
                    self._deliver(item)
                    return
        self._pipeline.append(item)
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="pgcoord-message-pipeline")

    def on_reconnect(self) -> None:
        """The listener reconnected: queue a catch-up ahead of what the new connection brings."""
        listener = self._rt.listener
        if not self._running or listener.reconnects == self._reconnects:
            return
        self._reconnects = listener.reconnects
        if any(ch.durable for ch in self._channels.values()):
            self._pipeline.append(self._spawn(self._catch_up()))
            if self._drainer is None:
                self._drainer = asyncio.create_task(self._drain(), name="pgcoord-message-pipeline")

    def _spawn(self, coro: Coroutine[Any, Any, Ready]) -> asyncio.Task[Ready]:
        task: asyncio.Task[Ready] = self._tasks.spawn(coro)
        return task

    async def _drain(self) -> None:
        try:
            while self._pipeline:
                head = self._pipeline[0]
                if isinstance(head, list):
                    ready = head
                else:
                    try:
                        ready = await head
                    except Exception:
                        # A read that failed unexpectedly must not stay at the head: every
                        # later message would queue behind it forever. Its messages are lost
                        # (logged); the rest of the pipeline goes on.
                        log.exception("pgcoord: reading messages failed; dropped them")
                        ready = []
                self._pipeline.popleft()
                if self._running:
                    self._deliver(ready)
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None

    def _deliver(self, ready: Ready) -> None:
        now = asyncio.get_running_loop().time()
        me = self._rt.instance_id
        for pg, env, logged, commit_seq in ready:
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
            (pg, after, self.sync_retention, limit),
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

    async def _read(self, what: str, query: bytes, params: Sequence[Any]) -> Ready:
        ready: Ready = []
        for pg, text, commit_seq in await self._read_rows(what, query, params) or ():
            try:
                ready.append(Arrival(pg, wire.parse(text), True, commit_seq))
            except ValueError as exc:
                log.warning("pgcoord: dropped a malformed logged message on %s: %s", pg, exc)
        return ready

    async def _read_transaction(self, xid: int) -> Ready:
        return await self._read(
            "a transaction's messages",
            self._q.by_xid,
            (xid, list(self._channels), *self._windows),
        )

    async def _read_spilled(self, row_id: int) -> Ready:
        ready = await self._read("a logged message", self._q.by_id, (row_id, *self._windows))
        if not ready:
            # Swept already, or a pointer someone NOTIFYed that names no recent row.
            log.warning("pgcoord: logged message %s was gone before it could be read", row_id)
        return ready

    @staticmethod
    async def _on_channel(pg: str, read: Coroutine[Any, Any, Ready]) -> Ready:
        """Only the messages ``read`` returns that were logged on ``pg``: a pointer NOTIFYed on
        one channel never delivers another channel's row."""
        ready = await read
        kept = [arrival for arrival in ready if arrival.pg == pg]
        if len(kept) != len(ready):
            log.warning("pgcoord: dropped a pointer on %s to another channel's message", pg)
        return kept

    async def _catch_up(self) -> Ready:
        pgs = [pg for pg, ch in self._channels.items() if ch.durable and pg in self._snapshots]
        if not pgs:
            return []
        snaps = [self._snapshots[pg] for pg in pgs]
        ready = await self._read(
            "missed sync messages", self._q.catch_up, (pgs, snaps, self.sync_retention)
        )
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
