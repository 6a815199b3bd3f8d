"""A server crash empties the UNLOGGED cache; caches (and near caches) recover on their own."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import pgcoord
from tests.support import CoordFactory, PgServer

pytestmark = [pytest.mark.restart, pytest.mark.slow]


async def _retry(op: Any) -> Any:
    # The first statement on a pooled connection broken by the restart fails once.
    deadline = time.monotonic() + 30
    while True:
        try:
            return await op()
        except pgcoord.ConnectionFailedError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)


async def test_crash_empties_the_cache_and_near_caches_follow(
    pg: PgServer, make_coord: CoordFactory
) -> None:
    writer = await make_coord(app="r")
    reader = await make_coord(app="r")
    plain = writer.cache
    near = reader.cache_manager.create_cache("n", local_ttl=60)
    writer.cache_manager.create_cache("n", local_ttl=60)
    await plain.set("k", "v")
    await near.set("k", "v")
    assert await near.get("k") == "v"  # now held in the reader's near cache
    reconnects = reader.listener.reconnects
    await asyncio.to_thread(pg.restart, "immediate")
    assert await _retry(lambda: plain.get("k")) is None  # UNLOGGED: emptied by the crash
    deadline = time.monotonic() + 30
    while not (reader.listener.connected and reader.listener.reconnects > reconnects):
        assert time.monotonic() < deadline, "the listener never reconnected"
        await asyncio.sleep(0.1)
    # The near cache was flushed on reconnect: it does not serve the lost value.
    assert await _retry(lambda: near.get("k")) is None
    await _retry(lambda: plain.set("k", "again"))
    assert await plain.get("k") == "again"
