"""Sweeps and wrap locks interrupted at the worst moment leave no lock behind."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pgcoord.cache.cluster_lock import ClusterLocks
from pgcoord.cache.manager import CacheManager
from tests.support import CoordFactory


async def test_a_sweep_cancelled_right_after_its_lock_was_granted_leaves_no_lock(
    make_coord: CoordFactory, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_coord(cache_sweep_interval=3600)
    b = await make_coord(cache_sweep_interval=3600)
    manager: CacheManager = a.cache_manager
    real = manager._locked
    granted = asyncio.Event()

    async def locked_then_stalled(conn: psycopg.AsyncConnection[Any], key: int) -> bool:
        got = await real(conn, key)
        granted.set()
        await asyncio.sleep(3600)  # the cancellation (as at stop) lands here
        return got

    monkeypatch.setattr(manager, "_locked", locked_then_stalled)
    await a.cache.mset({f"k{i}": i for i in range(5)}, ttl=0.1)
    await asyncio.sleep(0.3)
    sweeping = asyncio.create_task(manager.sweep())
    await asyncio.wait_for(granted.wait(), 20)
    sweeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sweeping
    # Another instance can sweep: the interrupted one's lock did not outlive it.
    assert await b.cache_manager.sweep() == 5
    with psycopg.connect(dsn) as conn:
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    assert held == (0,)


async def test_closing_the_idle_wrap_lock_connection_spares_a_lock_being_taken(
    make_coord: CoordFactory, dsn: str
) -> None:
    coord = await make_coord()
    locks = ClusterLocks(coord._rt)
    try:
        assert await locks.try_lock(1)
        await locks.unlock(1)  # nothing held now: the idle close is due in IDLE_CLOSE seconds
        # A wrap starts taking a lock on the connection, and before its statement returns the
        # idle timer fires (its close task runs while the statement is in flight).
        taking = asyncio.create_task(locks.try_lock(2))
        await asyncio.sleep(0)  # the statement is sent on the still-open connection
        locks._close_if_idle()
        assert await taking  # not a spurious connection error
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(2)").fetchone()
        assert row == (False,)  # still held: single flight intact
        await locks.unlock(2)
    finally:
        await locks.close()
