"""One handler subscribed to one channel: its queue, its worker task and its debounce timers.

Each subscription calls its handler from a task of its own, one message at a time, in the order
the messages were handed to it (commit order). A slow handler therefore delays only its own
messages, and a failing one is logged and moves on to the next message.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from pgcoord.pubsub.envelope import debounce_key

log = logging.getLogger("pgcoord.pubsub")

Handler = Callable[[Any], Any]


class Subscription:
    """Delivers messages to one handler; see the module docstring."""

    def __init__(self, channel: str, handler: Handler, debounce: float) -> None:
        self.channel = channel
        self.handler = handler
        self.debounce = debounce
        self._queue: deque[Any] = deque()
        self._task: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._open = False

    def open(self) -> None:
        """Accept messages (the Coordinator is running)."""
        self._open = True

    def offer(self, message: Any) -> None:
        """Hand over one message (called on the event loop, never blocks)."""
        if not self._open:
            return
        if self.debounce > 0:
            # Trailing edge: every identical message restarts the wait; the handler runs once
            # the channel has been quiet about this message for `debounce` seconds.
            key = debounce_key(message)
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self.debounce, self._fire, key, message)
        else:
            self._enqueue(message)

    def _fire(self, key: str, message: Any) -> None:
        self._timers.pop(key, None)
        self._enqueue(message)

    def _enqueue(self, message: Any) -> None:
        if not self._open:
            return
        self._queue.append(message)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"pgcoord-handler:{self.channel}")

    async def _run(self) -> None:
        try:
            while self._queue and self._open:
                message = self._queue.popleft()
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

    async def close(self) -> None:
        """Stop: drop pending and debounced messages; no handler call starts after this."""
        self._open = False
        self._queue.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        task, self._task = self._task, None
        # A handler that unsubscribes itself (or stops the Coordinator) must not cancel itself.
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
