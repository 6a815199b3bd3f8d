"""What a plugin is: a named component that hears its namesakes on the other instances."""

from __future__ import annotations

from typing import Any

from pgcoord.errors import InvalidInputError, InvalidTypeError, NotRunningError


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
        await self.coord.sync_message_manager.send_plugin_message(self, message, transaction)


def plugin_name(plugin: Plugin) -> str:
    """The plugin's ``name``, checked: it names the plugin's channel on every instance."""
    name = getattr(plugin, "name", None)
    if not isinstance(name, str):
        raise InvalidTypeError(f"{type(plugin).__name__}.name must be a str")
    if not name or len(name) > 255:
        raise InvalidInputError(
            f"{type(plugin).__name__}.name must be 1..255 characters; set the class attribute `name`"
        )
    return name
