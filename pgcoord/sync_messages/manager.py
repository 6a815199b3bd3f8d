"""The public face of sync messages: subscribe, publish, and the channels of plugins.

Sync messages are durable pub/sub: they travel through the engine pub/sub uses
(``pgcoord/pubsub/engine.py``), one per Coordinator, with ``durable=True``, so each is also
written to the message log and replayed to an instance whose listener reconnects. This module
names only what it needs of that engine (:class:`MessageEngine`) and imports nothing of pub/sub,
so ``pgcoord.pubsub`` can keep re-exporting these names without an import loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from pgcoord.runtime import Runtime, Service
from pgcoord.sync_messages.plugin import Plugin, plugin_name

#: A message handler: called with each message (sync or async).
Handler = Callable[[Any], Any]

# Service tags: they namespace Postgres channel names, so a sync channel, a plugin and a pub/sub
# channel of the same name never meet.
_SYNC = "sync"
_PLUGIN = "plugin"


class MessageEngine(Protocol):
    """What sync messages use of the pub/sub engine (:class:`pgcoord.pubsub.engine.Engine`).

    ``tag`` namespaces the Postgres channels of one service; ``durable`` messages are logged
    and replayed after a reconnect.
    """

    async def subscribe(
        self, tag: str, channel: str, handler: Handler, debounce: float, *, durable: bool
    ) -> None:
        """Call ``handler`` for every message on ``channel`` of service ``tag``."""

    async def unsubscribe(self, tag: str, channel: str, handler: Handler) -> None:
        """Stop calling ``handler`` for ``channel`` (no error if it was not subscribed)."""

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
        """Send ``message`` on ``channel`` of service ``tag``."""

    async def stop(self) -> None:
        """Stop delivering: no handler is called after this returns (idempotent)."""


class SyncMessageManager(Service):
    """Sync messages: pub/sub whose messages survive a listener disconnect.

    Every message is logged; an instance whose listener reconnects reads back what it missed,
    delivered once and in order. Option ``sync_log_retention`` (seconds, default 120): how long
    the log keeps a message, hence the longest disconnection an instance fully catches up from.
    Live, a sync message's NOTIFY carries only a pointer to its row, so a NOTIFY forged by any
    role with CONNECT never delivers one. A handler slower than its channel keeps at most
    ``pubsub_backlog`` messages in memory; the rest are read back from the log as it catches up.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {"sync_log_retention": 120.0}

    def __init__(self, runtime: Runtime, engine: MessageEngine) -> None:
        super().__init__(runtime)
        # Shared with PubSubManager, which starts it and passes on reconnects; built once by
        # the Coordinator with this service's log retention (Engine.from_options).
        self._engine = engine

    async def subscribe(self, channel: str, handler: Handler) -> None:
        """Call ``handler(message)`` (sync or async) for every sync message on ``channel``."""
        await self._engine.subscribe(_SYNC, channel, handler, 0.0, durable=True)

    async def unsubscribe(self, channel: str, handler: Handler) -> None:
        """Stop calling ``handler`` for ``channel``."""
        await self._engine.unsubscribe(_SYNC, channel, handler)

    async def publish(
        self,
        channel: str,
        message: object,
        *,
        transaction: object = None,
        skip_self: bool = True,
        only_self: bool = False,
    ) -> None:
        """Send a sync message (JSON data) to the other instances subscribed to ``channel``.

        ``skip_self`` defaults to True: the sender already knows. ``transaction``: delivered if
        and only if that transaction commits.
        """
        await self._engine.publish(
            _SYNC,
            channel,
            message,
            skip_self=skip_self and not only_self,
            only_self=only_self,
            transaction=transaction,
            durable=True,
        )

    async def register_plugin(self, plugin: Plugin) -> None:
        """Route this plugin's sync messages to ``plugin.handle_sync_message``."""
        name = plugin_name(plugin)
        await self._engine.subscribe(_PLUGIN, name, plugin.handle_sync_message, 0.0, durable=True)

    async def send_plugin_message(
        self, plugin: Plugin, message: object, transaction: object = None
    ) -> None:
        """Send ``message`` to the plugin of ``plugin``'s name on every other instance: what
        :meth:`Plugin.send_sync_message` does (delivered on COMMIT of ``transaction``, if given)."""
        await self._engine.publish(
            _PLUGIN,
            plugin_name(plugin),
            message,
            skip_self=True,
            only_self=False,
            transaction=transaction,
            durable=True,
        )

    async def stop(self) -> None:
        # Stops pub/sub deliveries as well; PubSubManager's own stop then has nothing left to do.
        await self._engine.stop()
