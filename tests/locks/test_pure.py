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


async def test_key_gates_exclude_and_queue_in_order() -> None:
    gates = KeyGates()
    order: list[int] = []
    first = gates.enter(7)
    assert await KeyGates.pass_gate(first, None)

    async def waiter(n: int) -> None:
        gate = gates.enter(7)
        assert await KeyGates.pass_gate(gate, None)
        order.append(n)
        gate.lock.release()
        gates.leave(7, gate)

    tasks = [asyncio.create_task(waiter(n)) for n in range(5)]
    await asyncio.sleep(0.01)
    assert order == []  # all queued behind the first holder
    first.lock.release()
    gates.leave(7, first)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert len(gates) == 0  # forgotten once unused


async def test_key_gate_try_and_timeout() -> None:
    gates = KeyGates()
    loop = asyncio.get_running_loop()
    holder = gates.enter(1)
    assert await KeyGates.pass_gate(holder, loop.time())  # free: a try succeeds
    other = gates.enter(1)
    assert not await KeyGates.pass_gate(other, loop.time())  # held: a try fails at once
    assert not await KeyGates.pass_gate(other, loop.time() + 0.05)  # still held after waiting
    gates.leave(1, other)
    unrelated = gates.enter(2)
    assert await KeyGates.pass_gate(unrelated, loop.time())  # other keys are independent
    holder.lock.release()
    gates.leave(1, holder)
    unrelated.lock.release()
    gates.leave(2, unrelated)
    assert len(gates) == 0
