"""``pgcoord demo``: several app instances, in separate processes, coordinating through Postgres.

The parent starts (or reuses) the server, migrates, then runs N instance processes that each
start a Coordinator and use every service: pub/sub greetings, a sync message, a lock-protected
counter in the cache, and a shared job queue. Each instance reports what it saw; the parent
prints it and exits 0 only when every instance saw what the others did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import pgcoord
from pgcoord.dsn import resolve_or_embedded

_APP = "demo"
_JOBS_PER_INSTANCE = 5


def _say(name: str, text: str) -> None:
    print(f"[{name}] {text}", flush=True)


async def run_instance(name: str, peers: int, dsn: str) -> int:
    """One demo instance (runs in its own process)."""
    heard: dict[str, float] = {}
    synced: list[Any] = []
    jobs_done: list[Any] = []
    all_heard = asyncio.Event()
    started = time.monotonic()

    def on_hello(message: Any) -> None:
        sender = message["from"]
        if sender != name and sender not in heard:
            heard[sender] = time.monotonic() - started
            _say(name, f"pub/sub: heard {message['text']!r} from {sender}")
            if len(heard) == peers - 1:
                all_heard.set()

    def on_sync(message: Any) -> None:
        synced.append(message)
        _say(name, f"sync message: {message}")

    async def process(message: Any, ctx: Any) -> None:
        jobs_done.append(message)
        await coord.cache.incr("jobs-done")
        _say(name, f"queue: ran job {message['n']} from {message['from']} (job id {ctx.id})")

    coord = pgcoord.Coordinator(dsn, app=_APP)
    async with coord:
        _say(name, f"started as {coord.instance_id}")
        await coord.pubsub_manager.subscribe("hello", on_hello)
        await coord.sync_message_manager.subscribe("config", on_sync)
        await coord.event_queue.subscribe("work", process=process, concurrency=4)
        # Greet until every peer was heard (peers start at different moments).
        deadline = time.monotonic() + 30
        while not all_heard.is_set() and time.monotonic() < deadline:
            await coord.pubsub_manager.publish(
                "hello", {"from": name, "text": f"hello from {name}"}
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_heard.wait(), 0.3)
        # Keep greeting a little so late peers hear us too.
        for _ in range(3):
            await coord.pubsub_manager.publish(
                "hello", {"from": name, "text": f"hello from {name}"}
            )
            await asyncio.sleep(0.1)

        async def bump() -> int:
            value = await coord.cache.incr("lock-protected-counter")
            return int(value)

        counted = await coord.lock_manager.run_exclusive("demo-counter", bump, ttl=10.0)
        _say(
            name, f"lock: incremented the shared counter to {counted} while holding 'demo-counter'"
        )
        await coord.sync_message_manager.publish("config", {"set_by": name, "theme": "dark"})
        ids = await coord.event_queue.publish_many(
            "work", [{"from": name, "n": n} for n in range(_JOBS_PER_INSTANCE)]
        )
        _say(name, f"queue: enqueued {len(ids)} jobs")
        # Let the cluster drain the queue and deliver the sync messages.
        total_jobs = peers * _JOBS_PER_INSTANCE
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = int(await coord.cache.get("jobs-done", 0))
            if len(synced) >= peers - 1 and done >= total_jobs:
                break
            await asyncio.sleep(0.2)
        final = await coord.cache.get("lock-protected-counter")
        report = {
            "instance": name,
            "heard": sorted(heard),
            "sync_messages": len(synced),
            "counter": final,
            "jobs_here": len(jobs_done),
            "jobs_done_cluster": await coord.cache.get("jobs-done", 0),
        }
        print("REPORT " + json.dumps(report), flush=True)
        # Stay up briefly so peers still finishing can hear us and drain jobs.
        await asyncio.sleep(1.0)
    return 0


async def run_demo(*, dsn: str | None, instances: int = 2) -> int:
    """Start the server, migrate, run ``instances`` processes, print what happened."""
    if instances < 2:
        print("pgcoord demo needs at least 2 instances", file=sys.stderr)
        return 2
    server = await asyncio.to_thread(resolve_or_embedded, dsn)
    print(f"pgcoord demo: PostgreSQL at {pgcoord._driver.describe_server(server)}", flush=True)
    demo_schema_reset = pgcoord.Coordinator(server, app=_APP, migrate=True)
    async with demo_schema_reset:
        # A fresh start for the demo's own namespace: clear what an earlier run left in its cache.
        await demo_schema_reset.cache.reset()
    print(
        f"pgcoord demo: schema migrated; starting {instances} instances in separate processes",
        flush=True,
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgcoord.cli",
            "demo-instance",
            f"instance-{i + 1}",
            str(instances),
            "--dsn",
            server,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for i in range(instances)
    ]
    reports: list[dict[str, Any]] = []

    async def relay(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode().rstrip()
            if line.startswith("REPORT "):
                reports.append(json.loads(line[len("REPORT ") :]))
            else:
                print(line, flush=True)

    await asyncio.gather(*(relay(p) for p in procs))
    codes = await asyncio.gather(*(p.wait() for p in procs))
    ok = all(code == 0 for code in codes) and len(reports) == instances
    for report in sorted(reports, key=lambda r: r["instance"]):
        peers_ok = len(report["heard"]) == instances - 1
        sync_ok = report["sync_messages"] >= instances - 1
        jobs_ok = report["jobs_done_cluster"] == instances * _JOBS_PER_INSTANCE
        ok = ok and peers_ok and sync_ok and jobs_ok
        print(
            f"pgcoord demo: {report['instance']} heard {len(report['heard'])}/{instances - 1} peers, "
            f"got {report['sync_messages']} sync messages, saw counter={report['counter']}, "
            f"ran {report['jobs_here']} of the cluster's {report['jobs_done_cluster']} jobs",
            flush=True,
        )
    print("pgcoord demo: OK" if ok else "pgcoord demo: FAILED", flush=True)
    return 0 if ok else 1
