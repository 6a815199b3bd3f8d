"""Per-key admission inside one process (asyncio only, no I/O).

The session that holds a key re-enters it, so the server cannot keep two tasks of one process
apart: this gate does. It admits ``depth`` tasks per key (1 for locks: the holder or the one
task waiting on the server); the others queue here, in FIFO order, without a connection.

A holder leaving the gate may hand its next task a *baton* (for locks: the session that still
holds the advisory lock, so the lock passes on without being let go). A baton nobody can take
(the next task gave up at that moment and nobody is behind it) goes to ``orphan``, which must
dispose of it.

Gates are keyed by the 64-bit advisory key, not the user's string: two keys that hash alike
share a gate and merely wait for each other, exactly as they do on the server.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


def _no_orphans(_baton: object) -> None:  # pragma: no cover - only gates without batons
    raise AssertionError("a baton was handed through a gate that cannot dispose of one")


class KeyGate:
    """One key's gate: ``depth`` slots, FIFO waiters, and a count of interested tasks."""

    __slots__ = ("active", "baton", "depth", "orphan", "streak", "users", "waiters")

    def __init__(self, depth: int, orphan: Callable[[object], None] = _no_orphans) -> None:
        self.depth = depth
        self.active = 0  # slots in use (tasks on the server for this key)
        self.users = 0  # tasks holding or waiting for a slot
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: What the last exit handed to the task it woke (taken with :meth:`take_baton`).
        self.baton: object | None = None
        #: Hand-overs in a row (the caller's fairness bookkeeping).
        self.streak = 0
        self.orphan = orphan

    def has_waiter(self) -> bool:
        """True when a task is queued here (an exit would wake it)."""
        return any(not waiter.done() for waiter in self.waiters)

    def take_baton(self) -> object | None:
        """The baton handed to the task that was just admitted, if any (cleared)."""
        baton, self.baton = self.baton, None
        return baton

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
                self.exit(self.take_baton())  # handed over as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def exit(self, baton: object | None = None) -> None:
        """Give the slot back: to the first waiter in line (with ``baton``), else to the pool
        of free slots (and a baton to ``orphan``)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.baton = baton
                waiter.set_result(None)  # the slot passes on; ``active`` is unchanged
                return
        self.active -= 1
        self.streak = 0
        if baton is not None:
            self.orphan(baton)


class KeyGates:
    """The gates of one process (one per key in use)."""

    def __init__(self, depth: int = 2, orphan: Callable[[object], None] = _no_orphans) -> None:
        self._depth = depth
        self._orphan = orphan
        self._gates: dict[int, KeyGate] = {}

    def __len__(self) -> int:
        return len(self._gates)

    def join(self, key: int) -> KeyGate:
        """Register interest in ``key``'s gate (pair with :meth:`leave`)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = KeyGate(self._depth, self._orphan)
        gate.users += 1
        return gate

    def leave(self, key: int, gate: KeyGate) -> None:
        """Drop interest in ``key``'s gate; forget the gate once nobody uses it."""
        gate.users -= 1
        if gate.users <= 0 and self._gates.get(key) is gate:
            del self._gates[key]
