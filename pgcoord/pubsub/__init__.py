"""Pub/sub, sync messages and plugins (being built)."""

from __future__ import annotations

from typing import Any

from pgcoord.runtime import Service


class PubSubManager(Service):
    """PubSubManager: see DESIGN.md for its API."""


class SyncMessageManager(Service):
    """SyncMessageManager: see DESIGN.md for its API."""

    def __init__(self, runtime: Any, pubsub: PubSubManager) -> None:
        super().__init__(runtime)
        self._pubsub = pubsub

    async def register_plugin(self, plugin: Plugin) -> None:
        """Route this plugin's sync messages to ``plugin.handle_sync_message``."""
        raise NotImplementedError


class Plugin:
    """Base class for plugins: subclass with a ``name``; wire with ``await coord.add_plugin(p)``."""

    name: str = ""
    coord: Any = None


__all__ = ["Plugin", "PubSubManager", "SyncMessageManager"]
