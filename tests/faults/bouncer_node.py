"""One pgcoord instance in its own process, for the PgBouncer tests.

``python -m tests.faults.bouncer_node [--connect-timeout S]`` starts a Coordinator on
``$PGCOORD_DSN`` (``heartbeat=1.0``) subscribed to pub/sub, sync messages and the queue, all on
channel ``smoke``, and prints ``{"ready": pid}``, or ``{"start_error": class name, "message":
text}`` and exits when ``start()`` fails. Commands, one JSON object per stdin line:

- ``{"op": "publish", "message": m}``: publishes ``m`` on pub/sub, as a sync message and as a
  job; prints ``{"published": m}``.
- ``{"op": "report"}`` -> ``{"report": {"pubsub": [...], "sync": [...], "jobs": [...]}}``:
  every message received so far, in order.
- ``{"op": "set", "key": k, "value": v}`` -> ``{"set": k}``; ``{"op": "get", "key": k}`` ->
  ``{"got": v}`` (the default cache).
- ``{"op": "locks", "key": k, "rounds": n, "tasks": t}``: ``t`` tasks each hold lock ``k``
  ``n`` times. Inside, ``incr("inside:" + k)`` must return 1 (anything else: another holder is
  inside too, an overlap), the token is recorded, and 0.06 s pass, so the lock also moves to
  its lease row (after 0.05 s). Prints ``{"locks": {"overlaps": n, "tokens": [...],
  "errors": [...]}}``.
- ``{"op": "quit"}`` (or end of stdin): stops, prints ``{"stopped": pid}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from typing import Any

import pgcoord
from tests.support import emit

CHANNEL = "smoke"


def _read_commands(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[Any]) -> None:
    for line in sys.stdin:
        if line.strip():
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(commands.put_nowait, {"op": "quit"})


async def _locks(coord: pgcoord.Coordinator, key: str, rounds: int, tasks: int) -> None:
    overlaps = 0
    tokens: list[int] = []
    errors: list[str] = []

    async def one() -> None:
        nonlocal overlaps
        for _ in range(rounds):
            try:
                async with coord.lock_manager.lock(key, ttl=10) as lock:
                    if await coord.cache.incr(f"inside:{key}") != 1:
                        overlaps += 1
                    tokens.append(lock.token)
                    await asyncio.sleep(0.06)
                    await coord.cache.incr(f"inside:{key}", -1)
            except pgcoord.PgcoordError as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    await asyncio.gather(*(one() for _ in range(tasks)))
    emit(locks={"overlaps": overlaps, "tokens": tokens, "errors": errors})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    args = parser.parse_args()
    coord = pgcoord.Coordinator(heartbeat=1.0, connect_timeout=args.connect_timeout)

    received: dict[str, list[Any]] = {"pubsub": [], "sync": [], "jobs": []}

    async def job(message: Any, ctx: Any) -> None:
        received["jobs"].append(message)

    await coord.pubsub_manager.subscribe(CHANNEL, received["pubsub"].append)
    await coord.sync_message_manager.subscribe(CHANNEL, received["sync"].append)
    await coord.event_queue.subscribe(CHANNEL, process=job, concurrency=2)
    try:
        await coord.start()
    except pgcoord.PgcoordError as exc:
        emit(start_error=type(exc).__name__, message=str(exc))
        return
    commands: asyncio.Queue[Any] = asyncio.Queue()
    threading.Thread(
        target=_read_commands, args=(asyncio.get_running_loop(), commands), daemon=True
    ).start()
    try:
        emit(ready=os.getpid())
        while True:
            command = await commands.get()
            op = command["op"]
            if op == "quit":
                break
            if op == "publish":
                message = command["message"]
                await coord.pubsub_manager.publish(CHANNEL, message)
                await coord.sync_message_manager.publish(CHANNEL, message)
                await coord.event_queue.publish(CHANNEL, message)
                emit(published=message)
            elif op == "report":
                emit(report=received)
            elif op == "set":
                await coord.cache.set(command["key"], command["value"])
                emit(set=command["key"])
            elif op == "get":
                emit(got=await coord.cache.get(command["key"]))
            elif op == "locks":
                await _locks(coord, command["key"], command["rounds"], command["tasks"])
    finally:
        await coord.stop()
    emit(stopped=os.getpid())


if __name__ == "__main__":
    asyncio.run(main())
