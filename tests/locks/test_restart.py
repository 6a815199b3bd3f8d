"""Fencing tokens survive a server crash (``pg_ctl restart -m immediate``)."""

from __future__ import annotations

import asyncio

import pytest

from pgcoord.locks import lease
from tests.locks.test_api import APP, wait_for
from tests.support import CoordFactory, PgServer


@pytest.mark.restart
@pytest.mark.slow
async def test_tokens_keep_increasing_across_an_immediate_restart(
    pg: PgServer, make_coord: CoordFactory
) -> None:
    coord = await make_coord(app=APP)
    locks = coord.lock_manager
    before = []
    for _ in range(50):
        lock = await locks.acquire("k")
        before.append(lock.token)
        await lock.release()
    held = await locks.acquire("held", ttl=300)
    other = await make_coord(app=APP)
    waiter = asyncio.create_task(other.lock_manager.acquire("held"))
    await asyncio.sleep(0.2)
    assert not waiter.done()

    await asyncio.to_thread(pg.restart, "immediate")

    await wait_for(lambda: held.lost)  # its session died with the server
    # The waiter's session died too; it retried on a fresh one and got the now free lock.
    waited = await asyncio.wait_for(waiter, 30)
    assert waited.token > held.token
    await waited.release()
    after = await locks.acquire("k")  # the idle lock connection died too: a fresh one is used
    assert after.token > max(before)
    # The crash reset the UNLOGGED token sequence; the durable epoch moved past it.
    assert lease.split_token(after.token)[0] > lease.split_token(before[-1])[0]
    await after.release()
    again = await locks.acquire("held")  # free again after the crash, for everyone
    assert again.token > after.token
    await again.release()
