"""Pub/sub over LISTEN/NOTIFY and a message log, and the engine sync messages share.

* :class:`PubSubManager` — fire-and-forget messages to every instance of the app (including the
  sender unless ``skip_self``). Delivered to instances listening at the time.
* ``engine.py`` — publishing, delivery and catch-up, shared with sync messages and plugins
  (:mod:`pgcoord.sync_messages`: durable pub/sub, over the same engine).

``SyncMessageManager`` and ``Plugin`` live in :mod:`pgcoord.sync_messages`; they are re-exported
here, where they used to be defined, so older imports keep working. See ``docs/pubsub.md`` for
delivery guarantees, limits and costs.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pgcoord.pubsub.engine import Engine
from pgcoord.pubsub.subscription import Handler
from pgcoord.runtime import Runtime, Service
from pgcoord.sync_messages import Plugin, SyncMessageManager

# The service tag: it namespaces Postgres channel names, so a pub/sub channel never meets a
# sync-message or plugin channel of the same name (those have tags of their own).
_PUBSUB = "pubsub"


class PubSubManager(Service):
    """Publish/subscribe across every instance of the app, through LISTEN/NOTIFY.

    Options (``Coordinator(**options)``): ``pubsub_max_payload`` (bytes of message JSON; larger
    messages raise :class:`~pgcoord.PayloadTooLargeError` before anything is sent; default
    16 MiB), ``pubsub_spill_retention`` (seconds a large or transactional pub/sub message stays
    in the message log for receivers to read; default 60), ``pubsub_backlog`` (messages one
    subscription keeps in memory for a handler slower than its channel; when full, pub/sub drops
    the oldest, counted in :attr:`dropped`, and sync messages are read back from the log
    instead; default 10,000), ``pubsub_via_table`` (every pub/sub message travels through the
    message log and its NOTIFY carries only a pointer, so a NOTIFY forged by any role with
    CONNECT delivers nothing; set it on every instance of the app; default False).
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "pubsub_max_payload": 16 * 1024 * 1024,
        "pubsub_spill_retention": 60.0,
        "pubsub_backlog": 10_000,
        "pubsub_via_table": False,
    }

    def __init__(self, runtime: Runtime, engine: Engine) -> None:
        super().__init__(runtime)
        # Shared with SyncMessageManager; built once by the Coordinator (Engine.from_options).
        self._engine = engine

    async def subscribe(self, channel: str, handler: Handler, *, debounce: float = 0.0) -> None:
        """Call ``handler(message)`` (sync or async) for every message published on ``channel``.

        Subscribing the same handler twice delivers once. ``debounce`` (seconds, trailing edge):
        identical messages on the channel within the window collapse into one call, made once
        the window passes without another identical message; different messages are debounced
        separately. Works before ``start()``: the subscription becomes active at start.
        """
        await self._engine.subscribe(_PUBSUB, channel, handler, debounce, durable=False)

    async def unsubscribe(self, channel: str, handler: Handler) -> None:
        """Stop calling ``handler`` for ``channel`` (pending debounced calls are dropped)."""
        await self._engine.unsubscribe(_PUBSUB, channel, handler)

    async def publish(
        self,
        channel: str,
        message: object,
        *,
        skip_self: bool = False,
        only_self: bool = False,
        transaction: object = None,
    ) -> None:
        """Send ``message`` (JSON data) to every instance subscribed to ``channel``.

        ``skip_self``: not to this instance; ``only_self``: only to this instance.
        ``transaction``: a psycopg or SQLAlchemy connection/session in a transaction; the message
        is delivered if and only if that transaction commits.
        """
        await self._engine.publish(
            _PUBSUB,
            channel,
            message,
            skip_self=skip_self,
            only_self=only_self,
            transaction=transaction,
            durable=False,
        )

    @property
    def dropped(self) -> int:
        """Pub/sub messages dropped since construction because a subscription's backlog
        (``pubsub_backlog``) was full: its handler was slower than its channel. Sync messages
        are never dropped this way."""
        return self._engine.dropped

    async def sweep(self) -> int:
        """Delete expired rows of the message log now (it also happens in the background)."""
        self._rt.check_running()
        return await self._engine.sweep()

    async def start(self) -> None:
        await self._engine.start()

    async def stop(self) -> None:
        await self._engine.stop()

    async def on_reconnect(self) -> None:
        self._engine.on_reconnect()


__all__ = ["Plugin", "PubSubManager", "SyncMessageManager"]
