"""A sync application using the blocking API, written as a user writes it.

tests/foundation/test_blocking.py type-checks this file with ``mypy --strict`` (it must pass
without a single ignore or cast) and runs :func:`run` against the server.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

import pgcoord
from pgcoord.blocking import BlockingCache, BlockingLock


def count_visit(cache: BlockingCache) -> int:
    """A helper taking the blocking cache by its type."""
    cache.set("greeting", {"hello": "world"}, ttl=60)
    return cache.incr("visits")


async def count_visit_async(coord: pgcoord.Coordinator) -> int:
    """The async twin, through ``Coordinator.cache``."""
    return await coord.cache.incr("visits")


def run(dsn: str) -> dict[str, Any]:
    """Use every blocking manager once; return what a caller would look at."""
    news: list[object] = []
    with pgcoord.BlockingCoordinator(dsn, app="typed") as coord:
        visits: int = count_visit(coord.cache)
        greeting: Any = coord.cache.get("greeting")
        left: float | None = coord.cache.ttl("greeting")
        named = coord.cache_manager.create_cache("named", ttl=30)
        named.mset({"a": 1, "b": 2})
        values: list[Any] = named.mget("a", "b", "c")

        coord.pubsub_manager.subscribe("news", news.append)
        with psycopg.connect(dsn) as conn:
            job: int = coord.event_queue.publish_sync("mail", {"to": "a"}, transaction=conn)
            coord.sync_message_manager.publish("acl", {"role": "admin"}, transaction=conn)
        jobs: list[int] = coord.event_queue.publish_many("mail", [{"to": "b"}, {"to": "c"}])
        queued: dict[str, int] = coord.event_queue.stats("mail")

        with coord.lock_manager.lock("report", ttl=30) as lock:
            first: int = lock.token
        again: BlockingLock = coord.lock_manager.try_acquire("report", timeout=5)
        again.extend(10)
        second = again.token
        again.release()

        coord.pubsub_manager.publish("news", "hello")
        deadline = time.monotonic() + 20
        while not news and time.monotonic() < deadline:
            time.sleep(0.01)
    return {
        "visits": visits,
        "greeting": greeting,
        "ttl_left": left,
        "values": values,
        "jobs": [job, *jobs],
        "ready": queued["ready"],
        "tokens": (first, second),
        "news": news,
    }
