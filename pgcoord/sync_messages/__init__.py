"""Sync messages and plugins: pub/sub that an instance catches up on after a disconnect.

* :class:`SyncMessageManager` — like pub/sub, but every message is also logged, so an instance
  whose listener lost its connection catches up on what it missed once it reconnects (delivered
  once, in order). By default the sender does not receive its own sync messages.
* :class:`Plugin` — a named component whose ``send_sync_message`` reaches the plugin of the same
  name on the other instances.

Both run on the pub/sub engine (``pgcoord/pubsub/engine.py``), which the Coordinator builds once
for pub/sub and sync messages together. See ``docs/pubsub.md`` for delivery guarantees and costs.
"""

from __future__ import annotations

from pgcoord.sync_messages.manager import SyncMessageManager
from pgcoord.sync_messages.plugin import Plugin

__all__ = ["Plugin", "SyncMessageManager"]
