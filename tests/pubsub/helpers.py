"""Helpers for the pub/sub tests: a recording handler and a condition wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.support import wait_until

# Generous: the machine is shared and noisy; nothing here asserts speed.
WAIT = 20.0


class Inbox:
    """A handler that records every message it is called with."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, message: Any) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        """Wait until at least ``count`` messages arrived; return them all."""
        await until(lambda: len(self.messages) >= count, timeout)
        return self.messages


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``condition`` until it is true (raises TimeoutError after ``timeout``)."""
    await wait_until(condition, timeout)


async def settle(seconds: float = 0.3) -> None:
    """Give stray deliveries a chance to arrive before asserting that nothing did."""
    await asyncio.sleep(seconds)
