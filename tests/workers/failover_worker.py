"""An application instance for the failover tests: its work flows through a crash and a promotion.

python -m tests.workers.failover_worker consume|produce [--sync-commit LEVEL]

Both roles run one Coordinator on ``$PGCOORD_DSN`` (the pair's multi-host DSN) and, like an
application that retries, keep going through errors; every line they print carries ``t``
(``time.time()``, comparable across processes of one machine):

- ``consume``: runs the jobs of queue ``jobs`` ({"ran": id, "attempt": n}) and receives the sync
  messages of channel ``sync`` ({"sync": n}).
- ``produce``: publishes a job ({"published": id} once ``publish`` returned) and a sync message
  inside a transaction ({"sync_acked": n} once that transaction committed), every few ms;
  failures print {"publish_error": ...} / {"sync_error": ...}.
- both: take and give back the lock ``fence`` in a loop ({"token": t} while holding it).

``--sync-commit`` sets ``queue_synchronous_commit``. Prints {"ready": pid} once subscribed, and
starts producing and locking on stdin {"go": true}; {"quit": true} stops it, then it prints
{"stopped": pid}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import pgcoord
from tests.support import emit

#: Pause between two rounds of the producer (a job and a sync message each).
PRODUCE_EVERY = 0.02
#: Pause between two turns of the lock loop; a turn holds the lock this long too.
LOCK_EVERY = 0.02


def say(**fields: Any) -> None:
    """One JSON line stamped with the wall clock."""
    emit(t=time.time(), **fields)


async def produce(coord: pgcoord.Coordinator, stop: asyncio.Event) -> None:
    """Publish a job and a transactional sync message per round, as long as not stopped."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            job_id = await coord.event_queue.publish("jobs", {"n": n})
        except pgcoord.PgcoordError as exc:
            say(publish_error=f"{type(exc).__name__}: {exc}")
        else:
            say(published=job_id)
        try:
            async with coord.pool.connection() as conn, conn.transaction():
                await coord.sync_message_manager.publish("sync", {"n": n}, transaction=conn)
        except Exception as exc:  # psycopg's own errors come from the app's transaction
            say(sync_error=f"{type(exc).__name__}: {exc}")
        else:
            say(sync_acked=n)
        await asyncio.sleep(PRODUCE_EVERY)


async def fence(coord: pgcoord.Coordinator, stop: asyncio.Event) -> None:
    """Take the lock ``fence`` again and again, saying the token each time."""
    while not stop.is_set():
        try:
            async with coord.lock_manager.lock("fence", ttl=5.0) as lock:
                say(token=lock.token)
                await asyncio.sleep(LOCK_EVERY)
        except pgcoord.PgcoordError as exc:
            say(lock_error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(LOCK_EVERY)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["consume", "produce"])
    parser.add_argument("--sync-commit", default=None)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    go, stop = asyncio.Event(), asyncio.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            command = json.loads(line) if line.strip() else {}
            if command.get("go"):
                loop.call_soon_threadsafe(go.set)
            if command.get("quit"):
                break
        loop.call_soon_threadsafe(stop.set)
        loop.call_soon_threadsafe(go.set)  # a quit before the go ends the process too

    threading.Thread(target=read_stdin, daemon=True).start()
    options: dict[str, Any] = {}
    if args.sync_commit is not None:
        options["queue_synchronous_commit"] = args.sync_commit
    coord = pgcoord.Coordinator(**options)

    async def run(message: Any, ctx: pgcoord.JobContext) -> None:
        say(ran=ctx.id, attempt=ctx.attempt)

    def received(message: Any) -> None:
        say(sync=message["n"])

    async with coord:
        tasks: list[asyncio.Task[None]] = []
        if args.role == "consume":
            await coord.event_queue.subscribe("jobs", process=run, concurrency=4)
            await coord.sync_message_manager.subscribe("sync", received)
        say(ready=os.getpid())
        await go.wait()
        tasks.append(asyncio.create_task(fence(coord, stop)))
        if args.role == "produce":
            tasks.append(asyncio.create_task(produce(coord, stop)))
        await stop.wait()
        await asyncio.gather(*tasks)
    say(stopped=os.getpid())


if __name__ == "__main__":
    asyncio.run(main())
