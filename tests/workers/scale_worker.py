"""One process of the scale scenario: ``python -m tests.workers.scale_worker --coordinators N``.

Builds N Coordinators on ``$PGCOORD_DSN`` (``migrate=True``, ``heartbeat=1.0``; with N = 1 the
app is ``scale0``, else ``scale0`` .. ``scale<N-1>``, so the same app in every process is one
cluster and the apps of one process are the multi-app case), prints ``{"ready": pid, "budget": B}``
once imported, then obeys one JSON command per stdin line:

- ``{"op": "start"}``: start every Coordinator concurrently, subscribe each to pub/sub
  (``scale``), sync messages (``scale-sync``) and one queue (``scale-jobs``, a no-op process);
  prints ``{"started": pid, "failures": [...], "seconds": s}`` (one failure text per Coordinator
  that did not start or subscribe).
- ``{"op": "burst", "at": wall time, "seconds": S, "tasks": T}``: at ``at``, every Coordinator
  runs T tasks for S seconds, each cycle: cache set + get (value checked), pub/sub publish, sync
  message, queue publish, and ``lock(f"k-{instance}-{task}", ttl=5)``. Prints ``{"burst":
  {"cycles": [per Coordinator], "errors": n, "samples": [...], "log_warnings": n, "log_samples":
  [...]}}``; log records are pgcoord's and psycopg's WARNING+ logs during the burst.
- ``{"op": "hold", "count": N, "ttl": T, "prefix": P}``: the first Coordinator acquires
  ``P0`` .. ``P<N-1>`` and keeps them; prints ``{"holding": n, "requested_at": wall time before the
  first request, "seconds": s, "lost": n}``.
- ``{"op": "take", "count": N, "prefix": P, "probe": K, "timeout": S}``: first ``try_acquire`` of
  K of those keys with ``timeout=0`` (they must be held elsewhere), then ``try_acquire`` of every key
  within S seconds; prints ``{"taken": n, "failed": n, "probe_acquired": n, "first_grant": wall
  time, "last_grant": wall time, "samples": [...]}``.
- ``{"op": "wait_lost", "timeout": S}``: waits (S seconds at most) until every held lock says
  ``lost``; prints ``{"lost": n, "of": held}``.
- ``{"op": "quit"}`` (or end of stdin): stop every Coordinator, print ``{"stopped": pid}``, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import sys
import time
from typing import Any

import pgcoord
from tests.support import emit

#: Whose WARNING+ records a burst counts: pgcoord's and its pool's (refused connections show there).
LOGGERS = ("pgcoord", "psycopg")
LOCK_CONCURRENCY = 200  # concurrent acquire calls in hold/take: many waiters, not 10,000 tasks


class _Collect(logging.Handler):
    """Counts WARNING+ records (background failures the burst's callers never see)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(f"{record.name}: {record.getMessage()}"[:300])


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _budget(coord: pgcoord.Coordinator) -> Any:
    """The per-process connection budget, if this version of pgcoord has one."""
    value = getattr(coord, "max_connections", None)
    if value is None:
        param = inspect.signature(pgcoord.Coordinator).parameters.get("max_connections")
        if param is not None and param.default is not inspect.Parameter.empty:
            value = param.default
    return value if isinstance(value, int | float | str) else None


async def _noop(message: Any, ctx: Any) -> None:
    return None


class Worker:
    def __init__(self, coordinators: list[pgcoord.Coordinator], instance_base: int) -> None:
        self.coords = coordinators
        self.base = instance_base
        self.started: list[pgcoord.Coordinator] = []
        self.received = 0
        self.held: list[pgcoord.Lock] = []
        self.taken: list[pgcoord.Lock] = []

    def _on_message(self, message: Any) -> None:
        self.received += 1

    async def _start_one(self, coord: pgcoord.Coordinator) -> None:
        await coord.start()
        await coord.pubsub_manager.subscribe("scale", self._on_message)
        await coord.sync_message_manager.subscribe("scale-sync", self._on_message)
        await coord.event_queue.subscribe("scale-jobs", process=_noop, concurrency=2)

    async def start(self) -> None:
        began = time.monotonic()
        results = await asyncio.gather(
            *(self._start_one(c) for c in self.coords), return_exceptions=True
        )
        failures = []
        for coord, result in zip(self.coords, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(f"pid {os.getpid()} app {coord.app}: {_describe(result)}")
            else:
                self.started.append(coord)
        emit(started=os.getpid(), failures=failures, seconds=time.monotonic() - began)

    async def burst(self, at: float, seconds: float, tasks: int) -> None:
        collect = _Collect()
        for name in LOGGERS:
            logging.getLogger(name).addHandler(collect)
        errors = 0
        samples: list[str] = []
        cycles = [0] * len(self.coords)
        await asyncio.sleep(max(0.0, at - time.time()))
        deadline = time.monotonic() + seconds

        async def loop(index: int, coord: pgcoord.Coordinator, task: int) -> None:
            nonlocal errors
            instance = self.base + index
            key = f"k-{instance}-{task}"
            while time.monotonic() < deadline:
                try:
                    n = cycles[index]
                    await coord.cache.set(key, n)
                    got = await coord.cache.get(key)
                    if got != n:
                        raise AssertionError(f"cache get {key} returned {got!r}, not {n!r}")
                    await coord.pubsub_manager.publish("scale", {"i": instance, "n": n})
                    await coord.sync_message_manager.publish("scale-sync", {"i": instance})
                    await coord.event_queue.publish("scale-jobs", {"i": instance, "n": n})
                    async with coord.lock_manager.lock(key, ttl=5):
                        pass
                    cycles[index] += 1
                except Exception as exc:
                    errors += 1
                    if len(samples) < 5:
                        samples.append(f"{key}: {_describe(exc)}")
                    await asyncio.sleep(0.05)  # a failing step must not spin the CPU others need

        await asyncio.gather(
            *(
                loop(i, c, t)
                for i, c in enumerate(self.coords)
                if c in self.started
                for t in range(tasks)
            )
        )
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(collect)
        emit(
            burst={
                "cycles": [cycles[i] for i, c in enumerate(self.coords) if c in self.started],
                "errors": errors,
                "samples": samples,
                "received": self.received,
                "log_warnings": collect.count,
                "log_samples": collect.samples,
            }
        )

    async def _bounded(self, keys: list[str], one: Any) -> list[Any]:
        gate = asyncio.Semaphore(LOCK_CONCURRENCY)

        async def run(key: str) -> Any:
            async with gate:
                return await one(key)

        return await asyncio.gather(*(run(k) for k in keys), return_exceptions=True)

    async def hold(self, count: int, ttl: float, prefix: str) -> None:
        locks = self.started[0].lock_manager
        # These locks are meant to be lost (the test freezes this process past the ttl): one
        # warning per lock would bury the test's output under 10,000 lines; `lost` is asserted.
        logging.getLogger("pgcoord.locks").setLevel(logging.ERROR)
        requested_at = time.time()
        began = time.monotonic()
        results = await self._bounded(
            [f"{prefix}{i}" for i in range(count)], lambda k: locks.acquire(k, ttl=ttl)
        )
        self.held = [r for r in results if isinstance(r, pgcoord.Lock)]
        errors = [_describe(r) for r in results if isinstance(r, BaseException)]
        emit(
            holding=len(self.held),
            requested_at=requested_at,
            seconds=time.monotonic() - began,
            lost=sum(1 for lock in self.held if lock.lost),
            samples=errors[:5],
        )

    async def take(self, count: int, prefix: str, probe: int, timeout: float) -> None:
        locks = self.started[0].lock_manager
        keys = [f"{prefix}{i}" for i in range(count)]
        probe_acquired = 0
        for key in keys[:: max(1, count // max(1, probe))][:probe]:
            try:
                lock = await locks.try_acquire(key, timeout=0.0)
            except pgcoord.LockAcquireError:
                continue
            probe_acquired += 1  # the holder's lease did not keep this key: report it
            await lock.release()
        probed_at = time.time()  # the probe means something only if it ended before any lease did
        grants: list[float] = []

        async def one(key: str) -> pgcoord.Lock:
            lock = await locks.try_acquire(key, timeout=timeout, ttl=60.0)
            grants.append(time.time())
            return lock

        results = await self._bounded(keys, one)
        self.taken = [r for r in results if isinstance(r, pgcoord.Lock)]
        errors = [_describe(r) for r in results if isinstance(r, BaseException)]
        emit(
            taken=len(self.taken),
            failed=len(errors),
            probe_acquired=probe_acquired,
            probed_at=probed_at,
            first_grant=min(grants, default=None),
            last_grant=max(grants, default=None),
            samples=errors[:5],
        )

    async def wait_lost(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(lock.lost for lock in self.held):
            await asyncio.sleep(0.05)
        emit(lost=sum(1 for lock in self.held if lock.lost), of=len(self.held))

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.coords), return_exceptions=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinators", type=int, default=1)
    parser.add_argument("--instance-base", type=int, default=0)
    parser.add_argument("--max-connections", type=int, default=0, help="0: the default budget")
    args = parser.parse_args()
    dsn = os.environ["PGCOORD_DSN"]
    budget = {"max_connections": args.max_connections} if args.max_connections else {}
    coords = [
        pgcoord.Coordinator(dsn, app=f"scale{i}", migrate=True, heartbeat=1.0, **budget)
        for i in range(args.coordinators)
    ]
    worker = Worker(coords, args.instance_base)
    emit(ready=os.getpid(), budget=_budget(coords[0]))

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd: dict[str, Any] = json.loads(line)
            op = cmd["op"]
            if op == "start":
                await worker.start()
            elif op == "burst":
                await worker.burst(cmd["at"], cmd["seconds"], cmd["tasks"])
            elif op == "hold":
                await worker.hold(cmd["count"], cmd["ttl"], cmd["prefix"])
            elif op == "take":
                await worker.take(cmd["count"], cmd["prefix"], cmd["probe"], cmd["timeout"])
            elif op == "wait_lost":
                await worker.wait_lost(cmd["timeout"])
            elif op == "quit":
                break
    finally:
        await worker.stop()
        emit(stopped=os.getpid())


if __name__ == "__main__":
    asyncio.run(main())
