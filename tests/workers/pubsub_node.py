"""A pgcoord instance in its own process, for the pub/sub tests.

Subscribes to the sync channel ``burst`` and the pub/sub channel ``news`` (and a plugin named
``node``), then prints ``{"ready": instance_id, "listener_pid": pid}``. Commands, one JSON object
per stdin line:

* ``{"cmd": "pid"}`` -> ``{"pid_now": listener backend pid or null, "reconnects": n}``
* ``{"cmd": "report"}`` -> ``{"report": {"burst": [...], "news": [...], "plugin": [...]}}``
* ``{"cmd": "publish", "kind": "sync"|"pubsub"|"plugin", "message": ...}`` -> ``{"published": ...}``
* ``{"cmd": "exit"}``
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

import pgcoord
from tests.support import emit


class NodePlugin(pgcoord.Plugin):
    name = "node"

    def __init__(self, inbox: list[Any]) -> None:
        self.inbox = inbox

    def handle_sync_message(self, message: Any) -> None:  # type: ignore[override]
        self.inbox.append(message)


def read_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[Any]) -> None:
    for line in sys.stdin:
        if line.strip():
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(commands.put_nowait, {"cmd": "exit"})


async def main() -> None:
    received: dict[str, list[Any]] = {"burst": [], "news": [], "plugin": []}
    coord = pgcoord.Coordinator(heartbeat=1.0)
    await coord.sync_message_manager.subscribe("burst", received["burst"].append)

    async def on_news(message: Any) -> None:
        received["news"].append(message)

    await coord.pubsub_manager.subscribe("news", on_news)
    plugin = NodePlugin(received["plugin"])
    commands: asyncio.Queue[Any] = asyncio.Queue()
    threading.Thread(
        target=read_commands, args=(asyncio.get_running_loop(), commands), daemon=True
    ).start()
    async with coord:
        await coord.add_plugin(plugin)
        emit(ready=coord.instance_id, listener_pid=coord.listener.backend_pid)
        while True:
            command = await commands.get()
            cmd = command["cmd"]
            if cmd == "exit":
                break
            if cmd == "pid":
                emit(pid_now=coord.listener.backend_pid, reconnects=coord.listener.reconnects)
            elif cmd == "report":
                emit(report=received)
            elif cmd == "publish":
                kind, message = command["kind"], command["message"]
                if kind == "sync":
                    await coord.sync_message_manager.publish("burst", message)
                elif kind == "pubsub":
                    await coord.pubsub_manager.publish("news", message)
                else:
                    await plugin.send_sync_message(message)
                emit(published=message)


if __name__ == "__main__":
    asyncio.run(main())
