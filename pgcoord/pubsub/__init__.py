"""Pub/sub, sync messages and plugins, over LISTEN/NOTIFY and a message log.

* :class:`PubSubManager` — fire-and-forget messages to every instance of the app (including the
  sender unless ``skip_self``). Delivered to instances listening at the time.
* :class:`SyncMessageManager` — the same, but every message is also logged, so an instance whose
  listener lost its connection catches up on what it missed once it reconnects (delivered once,
  in order). By default the sender does not receive its own sync messages.
* :class:`Plugin` — a named component whose ``send_sync_message`` reaches the plugin of the same
  name on the other instances.

See ``docs/pubsub.md`` for delivery guarantees, limits and costs.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pgcoord.errors import InvalidInputError, InvalidTypeError, NotRunningError
from pgcoord.pubsub.engine import Engine
from pgcoord.pubsub.subscription import Handler
from pgcoord.runtime import Runtime, Service
from pgcoord.validation import check_int, check_positive

# Service tags: they namespace Postgres channel names, so a pub/sub channel, a sync channel and
# a plugin of the same name never meet.
_PUBSUB = "pubsub"
_SYNC = "sync"
_PLUGIN = "plugin"


class PubSubManager(Service):
    """Publish/subscribe across every instance of the app, through LISTEN/NOTIFY.

    Options (``Coordinator(**options)``): ``pubsub_max_payload`` (bytes of message JSON; larger
    messages raise :class:`~pgcoord.PayloadTooLargeError` before anything is sent; default
    16 MiB), ``pubsub_spill_retention`` (seconds a large or transactional pub/sub message stays
    in the message log for receivers to read; default 60).
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "pubsub_max_payload": 16 * 1024 * 1024,
        "pubsub_spill_retention": 60.0,
    }

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        max_payload = check_int(self.option("pubsub_max_payload"), "pubsub_max_payload", minimum=1)
        spill = check_positive(self.option("pubsub_spill_retention"), "pubsub_spill_retention")
        self._engine = Engine(runtime, max_payload=max_payload, spill_retention=spill)

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

    async def sweep(self) -> int:
        """Delete expired rows of the message log now (it also happens in the background)."""
        self._rt.check_running()
        return await self._engine.sweep()

    async def _start(self) -> None:
        await self._engine.start()

    async def _stop(self) -> None:
        await self._engine.stop()

    async def _on_reconnect(self) -> None:
        self._engine.on_reconnect()


class SyncMessageManager(Service):
    """Sync messages: pub/sub whose messages survive a listener disconnect.

    Every message is logged; an instance whose listener reconnects reads back what it missed,
    delivered once and in order. Option ``sync_log_retention`` (seconds, default 120): how long
    the log keeps a message, hence the longest disconnection an instance fully catches up from.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {"sync_log_retention": 120.0}

    def __init__(self, runtime: Runtime, pubsub: PubSubManager) -> None:
        super().__init__(runtime)
        self._pubsub = pubsub
        self._engine = pubsub._engine
        self._engine.sync_retention = check_positive(
            self.option("sync_log_retention"), "sync_log_retention"
        )

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
        name = _plugin_name(plugin)
        await self._engine.subscribe(_PLUGIN, name, plugin.handle_sync_message, 0.0, durable=True)

    async def _send_plugin_message(
        self, plugin: Plugin, message: object, transaction: object
    ) -> None:
        await self._engine.publish(
            _PLUGIN,
            _plugin_name(plugin),
            message,
            skip_self=True,
            only_self=False,
            transaction=transaction,
            durable=True,
        )

    async def _stop(self) -> None:
        # Stops pub/sub deliveries as well; PubSubManager's own stop then has nothing left to do.
        await self._engine.stop()


def _plugin_name(plugin: Plugin) -> str:
    name = getattr(plugin, "name", None)
    if not isinstance(name, str):
        raise InvalidTypeError(f"{type(plugin).__name__}.name must be a str")
    if not name or len(name) > 255:
        raise InvalidInputError(
            f"{type(plugin).__name__}.name must be 1..255 characters; set the class attribute `name`"
        )
    return name


class Plugin:
    """Base class for plugins: subclass with a ``name``; wire with ``await coord.add_plugin(p)``.

    ``handle_sync_message(message)`` receives what the plugin of the same name sent with
    :meth:`send_sync_message` on *other* instances (sync and async overrides both work).
    """

    #: The plugin's name: the same on every instance; it names the plugin's sync channel.
    name: str = ""
    #: The Coordinator, set by ``add_plugin``.
    coord: Any = None

    async def handle_sync_message(self, message: Any) -> None:
        """Override: called with each sync message another instance's plugin sent."""

    async def send_sync_message(self, message: object, transaction: object = None) -> None:
        """Send ``message`` (JSON data) to this plugin on every other instance.

        ``transaction``: delivered if and only if that transaction commits.
        """
        if self.coord is None:
            raise NotRunningError(
                f"plugin {self.name!r} is not added to a Coordinator; await coord.add_plugin(plugin)"
            )
        manager: SyncMessageManager = self.coord.sync_message_manager
        await manager._send_plugin_message(self, message, transaction)


__all__ = ["Plugin", "PubSubManager", "SyncMessageManager"]
