"""A queue worker process for the multi-process tests.

python -m tests.workers.queue_worker CHANNEL --concurrency N --lease S --mode record|hold

record: every job inserts (job_id, pid, 'start') and (job_id, pid, 'done') into the test
table queue_log (the second after ``--sleep`` seconds). hold: every job prints
{"holding": id, "attempt": n} and waits for a stdin line {"finish": id}; it prints
{"ended": id, "reason": ...} when its handler returns or is cancelled.
Prints {"ready": pid} once consuming; exits on stdin {"quit": true}.
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("channel")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--mode", choices=["record", "hold"], default="record")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    pid = os.getpid()
    loop = asyncio.get_running_loop()
    release: dict[int, asyncio.Event] = {}
    quit_event = asyncio.Event()

    def on_line(obj: Any) -> None:
        if obj.get("quit"):
            quit_event.set()
        elif "finish" in obj:
            release.setdefault(int(obj["finish"]), asyncio.Event()).set()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(on_line, json.loads(line))
        loop.call_soon_threadsafe(quit_event.set)

    threading.Thread(target=read_stdin, daemon=True).start()

    coord = pgcoord.Coordinator(heartbeat=1.0, queue_lease=args.lease, queue_grace=args.grace)

    async def record(message: Any, ctx: pgcoord.JobContext) -> None:
        async with coord.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO queue_log (job_id, pid, kind) VALUES (%s, %s, 'start')", (ctx.id, pid)
            )
            if args.sleep:
                await asyncio.sleep(args.sleep)
            await conn.execute(
                "INSERT INTO queue_log (job_id, pid, kind) VALUES (%s, %s, 'done')", (ctx.id, pid)
            )

    async def hold(message: Any, ctx: pgcoord.JobContext) -> None:
        emit(holding=ctx.id, attempt=ctx.attempt)
        try:
            await release.setdefault(ctx.id, asyncio.Event()).wait()
        finally:
            emit(ended=ctx.id, reason=ctx.signal.reason)

    async with coord:
        await coord.event_queue.subscribe(
            args.channel,
            process=record if args.mode == "record" else hold,
            concurrency=args.concurrency,
            interval=0.1,
        )
        emit(ready=pid)
        await quit_event.wait()
    emit(stopped=pid)


if __name__ == "__main__":
    asyncio.run(main())
