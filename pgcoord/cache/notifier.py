"""Sending invalidations: concurrent writers share one NOTIFY transaction (group commit).

The NOTIFY runs in its own transaction after the write committed, never inside it: a transaction
that both writes and NOTIFYs holds the server-wide notify lock through its WAL flush (measured:
2.4x fewer commits/s with 8 writers), while a NOTIFY-only transaction writes no WAL. While one
NOTIFY is in flight, further writers' ops queue up and go together in the next one, so under load
many writes cost one NOTIFY. Each writer's call returns once its ops were sent.
"""

from __future__ import annotations

import asyncio
import logging

from pgcoord.cache import messages
from pgcoord.cache.queries import Queries
from pgcoord.runtime import Runtime

log = logging.getLogger("pgcoord.cache")


class Notifier:
    """Batches invalidation ops into as few ``pg_notify`` calls as possible."""

    def __init__(self, runtime: Runtime, channel: str, queries: Queries) -> None:
        self._rt = runtime
        self._q = queries
        self._channel = channel
        self._pending: list[messages.Op] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def send(self, ops: list[messages.Op]) -> None:
        """Publish ``ops``; returns when the NOTIFY carrying them committed."""
        self._rt.check_running()
        waiter = asyncio.get_running_loop().create_future()
        self._pending.extend(ops)
        self._waiters.append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush(), name="pgcoord-cache-notify")
        # Shielded: a cancelled writer must not cancel the NOTIFY other writers wait for.
        await asyncio.shield(waiter)

    async def _flush(self) -> None:
        while self._pending:
            ops, waiters = self._pending, self._waiters
            self._pending, self._waiters = [], []
            try:
                payloads = messages.pack(self._rt.instance_id, ops)
                async with self._rt.connection("cache invalidation notify") as conn:
                    await conn.execute(self._q.notify, (self._channel, payloads))
            except Exception as exc:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                        # Retrieved here so an abandoned waiter does not log "never retrieved".
                        waiter.exception()
                continue
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def close(self) -> None:
        """Let an in-flight NOTIFY finish (at stop)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
