"""Pure lock logic without a database: lease arithmetic, token layout, in-process key gates."""

from __future__ import annotations

import asyncio
import math

import pytest

from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.locks import lease
from pgcoord.locks.keygate import KeyGates


def test_ttl_validation() -> None:
    assert lease.check_ttl(30) == 30.0
    assert lease.check_ttl(None) is None
    assert lease.check_ttl(math.inf) is None  # no lease, like None
    for bad in (0, -1, -0.5):
        with pytest.raises(InvalidInputError):
            lease.check_ttl(bad)
    with pytest.raises(InvalidInputError, match="ttl=None"):
        lease.check_ttl(lease.MAX_TTL + 1)
    for wrong in ("30", True, [1]):
        with pytest.raises(InvalidTypeError):
            lease.check_ttl(wrong)
    with pytest.raises(InvalidInputError):
        lease.check_ttl(math.nan)


def test_timeout_validation() -> None:
    assert lease.check_timeout(0) == 0.0
    assert lease.check_timeout(2.5) == 2.5
    with pytest.raises(InvalidInputError):
        lease.check_timeout(-0.1)
    with pytest.raises(InvalidTypeError):
        lease.check_timeout(None)


def test_server_lease_is_never_shorter_than_the_client_believes() -> None:
    # Rounded up to whole ms: the server may hold a little longer, never shorter.
    assert lease.server_ttl_ms(0.0001) == 1
    assert lease.server_ttl_ms(1.0) == 1000
    assert lease.server_ttl_ms(1.0001) == 1001
    assert lease.server_ttl_ms(None) == 0  # 0 disables idle_session_timeout
    for ttl in (0.3, 0.7, 1.1, 29.9999, 30.0):
        assert lease.server_ttl_ms(ttl) / 1000.0 >= ttl
    assert lease.local_deadline(100.0, 30.0) == 130.0
    assert lease.local_deadline(100.0, None) is None


def test_server_wait() -> None:
    assert lease.server_wait_ms(None) == lease.WAIT_FOREVER
    assert lease.server_wait_ms(0.0) == 0
    assert lease.server_wait_ms(-1.0) == 0
    assert lease.server_wait_ms(0.0005) == 0  # lock_timeout cannot say less than 1 ms: try once
    assert lease.server_wait_ms(0.25) == 250


def test_token_layout_orders_epochs_before_counters() -> None:
    older = (3 << lease.TOKEN_EPOCH_SHIFT) + (2**40 - 1)
    newer = (4 << lease.TOKEN_EPOCH_SHIFT) + 1
    assert newer > older
    assert lease.split_token(newer) == (4, 1)
    assert lease.split_token(older) == (3, 2**40 - 1)


async def test_key_gate_admits_depth_tasks_then_queues_in_order() -> None:
    gates = KeyGates(depth=2)
    order: list[int] = []
    first, second = gates.join(7), gates.join(7)
    assert await first.enter(None)
    assert await second.enter(None)  # holder plus one waiter may be on the server

    async def waiter(n: int) -> None:
        gate = gates.join(7)
        assert await gate.enter(None)
        order.append(n)
        gate.exit()
        gates.leave(7, gate)

    tasks = [asyncio.create_task(waiter(n)) for n in range(5)]
    await asyncio.sleep(0.01)
    assert order == []  # all queued in-process
    first.exit()
    gates.leave(7, first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    second.exit()
    gates.leave(7, second)
    assert len(gates) == 0  # forgotten once unused


async def test_key_gate_try_and_timeout() -> None:
    gates = KeyGates(depth=1)
    loop = asyncio.get_running_loop()
    holder = gates.join(1)
    assert await holder.enter(loop.time())  # free: a try gets in
    other = gates.join(1)
    assert not await other.enter(loop.time())  # taken in this process: a try fails at once
    assert not await other.enter(loop.time() + 0.05)  # still taken after waiting
    gates.leave(1, other)
    unrelated = gates.join(2)
    assert await unrelated.enter(loop.time())  # other keys are independent
    holder.exit()
    gates.leave(1, holder)
    unrelated.exit()
    gates.leave(2, unrelated)
    assert len(gates) == 0


async def test_key_gate_try_fails_while_another_task_waits() -> None:
    gates = KeyGates(depth=2)
    loop = asyncio.get_running_loop()
    holder = gates.join(1)
    assert await holder.enter(None)
    trier = gates.join(1)
    # A slot is free, but a local task holds the key: a try reports it taken, no I/O needed.
    assert not await trier.enter(loop.time())
    gates.leave(1, trier)
    holder.exit()
    gates.leave(1, holder)


async def test_key_gate_cancelled_waiter_passes_its_slot_on() -> None:
    gates = KeyGates(depth=1)
    holder = gates.join(3)
    assert await holder.enter(None)
    quitter, patient = gates.join(3), gates.join(3)
    cancelled = asyncio.create_task(quitter.enter(None))
    waiting = asyncio.create_task(patient.enter(None))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    holder.exit()
    assert await asyncio.wait_for(waiting, 5)
    assert holder.active == 1


def test_lease_clock_moves_forward() -> None:
    first = lease.now()
    second = lease.now()
    assert second >= first
