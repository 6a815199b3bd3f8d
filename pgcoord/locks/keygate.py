"""In-process exclusion per advisory key (asyncio only, no I/O).

PostgreSQL advisory locks are re-entrant per session, so they alone cannot keep two tasks of one
process apart. Every acquisition first passes this process's gate for the key: a FIFO
``asyncio.Lock`` held for as long as the task holds the lock. That also means at most one
connection per key per process ever waits on the server, however many tasks queue here.

Gates are keyed by the 64-bit advisory key, not the user's string: two keys that hash alike
share a gate and merely wait for each other, exactly as they do on the server.
"""

from __future__ import annotations

import asyncio


class KeyGate:
    """One key's gate; counts the tasks using it so the registry can forget idle gates."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class KeyGates:
    """The gates of one process (one per key in use)."""

    def __init__(self) -> None:
        self._gates: dict[int, KeyGate] = {}

    def __len__(self) -> int:
        return len(self._gates)

    def enter(self, key: int) -> KeyGate:
        """Register interest in ``key``'s gate (pair with :meth:`leave`)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = KeyGate()
        gate.users += 1
        return gate

    def leave(self, key: int, gate: KeyGate) -> None:
        """Drop interest in ``key``'s gate; forget the gate once nobody uses it."""
        gate.users -= 1
        if gate.users <= 0 and self._gates.get(key) is gate:
            del self._gates[key]

    @staticmethod
    async def pass_gate(gate: KeyGate, deadline: float | None) -> bool:
        """Take ``gate``; False when it stays taken until ``deadline`` (loop time), else True.

        A deadline already passed means a single try that never waits: it fails when another
        task of this process holds the gate or queues for it (``users`` counts them).
        """
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline <= loop.time():
            if gate.lock.locked() or gate.users > 1:
                return False
            await gate.lock.acquire()  # nobody else holds or queues: returns at once
            return True
        if deadline is None:
            await gate.lock.acquire()
            return True
        try:
            async with asyncio.timeout_at(deadline):
                await gate.lock.acquire()
        except TimeoutError:
            return False
        return True
