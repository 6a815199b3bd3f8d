"""One handler subscribed to one channel: its bounded backlog, its worker task, its debounce timers.

Each subscription calls its handler from a task of its own, one message at a time, in the order
the messages were handed to it (commit order). A slow handler therefore delays only its own
messages, and a failing one is logged and moves on to the next message.

The backlog (messages handed over, not yet given to the handler) holds at most ``backlog``
messages, so a handler slower than its channel cannot grow memory without bound:

* a pub/sub subscription then drops its *oldest* waiting message (pub/sub promises delivery
  only to instances that keep up; the newest state is usually what a handler wants), counts it
  and logs a warning (at most one every :data:`WARN_EVERY` seconds);
* a sync subscription loses nothing: its messages are in the message log, numbered in commit
  order (``commit_seq``). Once its backlog is full it stops keeping new messages in memory and
  remembers only the highest number it let go; when the handler has worked through the
  backlog, it reads the log back from the last number it kept, a backlog's worth at a time,
  until it has everything it let go. A handler further behind than ``sync_log_retention``
  loses what the sweeper deleted meanwhile (logged as an error).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from pgcoord.pubsub.envelope import debounce_key

log = logging.getLogger("pgcoord.pubsub")

Handler = Callable[[Any], Any]

#: Seconds between two warnings about one subscription dropping messages.
WARN_EVERY = 10.0


class Reread(NamedTuple):
    """A page of a sync channel's log, read back for a subscription that fell behind."""

    #: (commit_seq, message) of the rows meant for the subscription, in commit order.
    messages: list[tuple[int, Any]]
    #: The highest commit_seq the page covered (rows for others included); None if empty.
    last: int | None
    #: Whether the page was full (more rows may follow).
    full: bool


class Host(Protocol):
    """What a subscription needs of the engine that feeds it."""

    def count_dropped(self, count: int) -> None:
        """``count`` pub/sub messages were dropped from a full backlog."""

    async def reread(self, sub: Subscription, after: int, limit: int) -> Reread | None:
        """Up to ``limit`` of ``sub``'s sync messages numbered after ``after``; None if the
        log could not be read."""


class Subscription:
    """Delivers messages to one handler; see the module docstring."""

    def __init__(
        self,
        channel: str,
        handler: Handler,
        debounce: float,
        *,
        backlog: int,
        durable: bool,
        host: Host,
    ) -> None:
        self.channel = channel
        self.handler = handler
        self.debounce = debounce
        self.backlog = backlog
        self.durable = durable
        self._host = host
        # (commit_seq or None, message)
        self._queue: deque[tuple[int | None, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._open = False
        #: Pub/sub messages this subscription dropped from its full backlog, ever.
        self.dropped = 0
        self._unreported = 0
        self._warned_at = -WARN_EVERY
        # Sync messages: the highest commit_seq kept (queued or handled), and while behind
        # (the backlog overflowed) the highest one let go; the worker reads back the gap.
        self._high = 0
        self._behind = False
        self._wanted = 0

    def open(self) -> None:
        """Accept messages (the Coordinator is running)."""
        self._open = True

    @property
    def waiting(self) -> int:
        """Messages in memory waiting for the handler (debounced ones included)."""
        return len(self._queue) + len(self._timers)

    def offer(self, message: Any, commit_seq: int | None = None) -> None:
        """Hand over one message (called on the event loop, never blocks). ``commit_seq``:
        the sync message's number in the log, which lets it be read back instead of kept."""
        if not self._open:
            return
        if self.durable and commit_seq is not None:
            self._offer_logged(message, commit_seq)
        elif self.debounce > 0:
            # Trailing edge: every identical message restarts the wait; the handler runs once
            # the channel has been quiet about this message for `debounce` seconds.
            key = debounce_key(message)
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            elif len(self._timers) >= self.backlog:
                # As many distinct messages waiting as the backlog holds: the oldest goes.
                oldest = next(iter(self._timers))
                self._timers.pop(oldest).cancel()
                self._count_drop()
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self.debounce, self._fire, key, message)
        else:
            self._enqueue(message)

    def _offer_logged(self, message: Any, seq: int) -> None:
        if seq <= self._high:
            # Already read back from the log (it was let go while behind, or the read ran
            # ahead of its live arrival): delivered once.
            return
        if self._behind or len(self._queue) >= self.backlog:
            if not self._behind:
                log.warning(
                    "pgcoord: sync handler %r on channel %r is %d messages behind; keeping the "
                    "rest in the message log and reading it back as the handler catches up",
                    self.handler,
                    self.channel,
                    len(self._queue),
                )
            self._behind = True
            self._wanted = max(self._wanted, seq)
            return
        self._high = seq
        self._push(seq, message)

    def _fire(self, key: str, message: Any) -> None:
        self._timers.pop(key, None)
        self._enqueue(message)

    def _enqueue(self, message: Any) -> None:
        if not self._open:
            return
        if len(self._queue) >= self.backlog:
            # Pub/sub: the oldest waiting message goes (see the module docstring).
            self._queue.popleft()
            self._count_drop()
        self._push(None, message)

    def _push(self, seq: int | None, message: Any) -> None:
        self._queue.append((seq, message))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"pgcoord-handler:{self.channel}")

    def _count_drop(self) -> None:
        self.dropped += 1
        self._unreported += 1
        self._host.count_dropped(1)
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning(
                "pgcoord: handler %r on channel %r is slower than its messages: dropped the "
                "oldest %d waiting (backlog %d, Coordinator option pubsub_backlog; %d dropped "
                "in all)",
                self.handler,
                self.channel,
                self._unreported,
                self.backlog,
                self.dropped,
            )
            self._warned_at = now
            self._unreported = 0

    async def _run(self) -> None:
        try:
            while self._open:
                if not self._queue:
                    if not self._behind:
                        break
                    await self._read_back()
                    continue
                _, message = self._queue.popleft()
                try:
                    result = self.handler(message)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception(
                        "pgcoord: handler %r failed on channel %r", self.handler, self.channel
                    )
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _read_back(self) -> None:
        """The backlog is empty and sync messages were let go: read the next page back."""
        # Live arrivals keep being let go while the read runs (they raise _wanted). The page
        # reflects the log as of its own snapshot: only what was let go *before* it was asked
        # for can be judged lost when the page ends short of it.
        asked = self._wanted
        page = await self._host.reread(self, self._high, self.backlog)
        if not self._open:
            return
        if page is None:
            log.error(
                "pgcoord: could not read back the sync messages handler %r on channel %r fell "
                "behind on (up to number %d); they are lost",
                self.handler,
                self.channel,
                self._wanted,
            )
            self._behind = False
            self._high = max(self._high, self._wanted)
            return
        for seq, message in page.messages:
            self._queue.append((seq, message))
        if page.last is not None:
            self._high = max(self._high, page.last)
        if self._wanted <= self._high:
            self._behind = False  # everything let go is back; newer messages arrive live
        elif not page.full and asked > self._high:
            # The log ends before what was let go when the read began: the sweeper deleted it
            # (the handler fell further behind than sync_log_retention).
            log.error(
                "pgcoord: sync handler %r on channel %r fell further behind than the message "
                "log's retention (sync_log_retention); messages up to number %d are lost",
                self.handler,
                self.channel,
                asked,
            )
            self._high = asked
            # Anything let go during the read is still behind: the next page reads it.
            self._behind = self._wanted > self._high
        # Else more pages follow, or messages were let go while this one was read: they
        # committed after its snapshot, so the next page has them.

    async def close(self) -> None:
        """Stop: drop pending and debounced messages; no handler call starts after this."""
        self._open = False
        self._queue.clear()
        self._behind = False
        self._high = self._wanted = 0
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        task, self._task = self._task, None
        # A handler that unsubscribes itself (or stops the Coordinator) must not cancel itself.
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
