"""Per-key admission inside one process (asyncio only, no I/O).

Mutual exclusion itself is the server's job, also between tasks of one process: every holder
and every waiter uses a session of its own (a dedicated connection holds at most one lock at a
time), and advisory locks only re-enter within *one* session, so two tasks never share a hold.

This gate bounds how many of this process's tasks may be on the server for one key at once:
the holder plus ``depth - 1`` queued waiters; the other tasks queue here, in FIFO order, without
using a connection. A depth of 2 keeps the next local waiter already queued on the server when
the holder releases, so the lock passes on in one round trip (with a depth of 1 every local
handoff would cost an extra round trip while the lock sits free), while 100 tasks waiting for
one hot key still use only 2 connections.

Gates are keyed by the 64-bit advisory key, not the user's string: two keys that hash alike
share a gate and merely wait for each other, exactly as they do on the server.
"""

from __future__ import annotations

import asyncio
import collections


class KeyGate:
    """One key's gate: ``depth`` slots, FIFO waiters, and a count of interested tasks."""

    __slots__ = ("active", "depth", "users", "waiters")

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.active = 0  # slots in use (tasks on the server for this key)
        self.users = 0  # tasks holding or waiting for a slot
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def enter(self, deadline: float | None) -> bool:
        """Take a slot; False when none frees up by ``deadline`` (loop time).

        A deadline already passed means a single try that never waits: it fails when another
        task of this process holds or queues for the key (the key is then taken or contended).
        """
        loop = asyncio.get_running_loop()
        only_try = deadline is not None and deadline <= loop.time()
        if only_try and self.users > 1:
            return False  # another task of this process holds or awaits it: taken
        if self.active < self.depth and not self.waiters:
            self.active += 1
            return True
        if only_try:
            return False
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiters.append(waiter)
        try:
            if deadline is None:
                await waiter
            else:
                async with asyncio.timeout_at(deadline):
                    await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.exit()  # the slot was handed over as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def exit(self) -> None:
        """Give the slot back: to the first waiter in line, else to the pool of free slots."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; ``active`` is unchanged
                return
        self.active -= 1


class KeyGates:
    """The gates of one process (one per key in use)."""

    def __init__(self, depth: int = 2) -> None:
        self._depth = depth
        self._gates: dict[int, KeyGate] = {}

    def __len__(self) -> int:
        return len(self._gates)

    def join(self, key: int) -> KeyGate:
        """Register interest in ``key``'s gate (pair with :meth:`leave`)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = KeyGate(self._depth)
        gate.users += 1
        return gate

    def leave(self, key: int, gate: KeyGate) -> None:
        """Drop interest in ``key``'s gate; forget the gate once nobody uses it."""
        gate.users -= 1
        if gate.users <= 0 and self._gates.get(key) is gate:
            del self._gates[key]
