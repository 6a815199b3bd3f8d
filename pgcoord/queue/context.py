"""What ``process(message, ctx)`` receives besides the message."""

from __future__ import annotations

import asyncio
from typing import Any


class Signal:
    """Set when the job should stop: its timeout passed, or the worker is stopping.

    ``is_set()`` for polling; ``await wait()`` to block until set. The running task is also
    cancelled, so most handlers never need to look at it; it is there for handlers that run
    blocking code in a thread (which cannot be cancelled) and poll for a reason to stop.
    """

    __slots__ = ("_event", "_set", "reason")

    def __init__(self) -> None:
        self._set = False
        # Created on first wait(): most jobs never wait, and an Event per job costs time.
        self._event: asyncio.Event | None = None
        #: Why the signal was set: "timeout", "stopping" or "lost" (another worker owns the job).
        self.reason: str | None = None

    def is_set(self) -> bool:
        """True once the job should stop."""
        return self._set

    def set(self, reason: str = "stopping") -> None:
        """Raise the signal (called by the worker; idempotent, keeps the first reason)."""
        if not self._set:
            self._set = True
            self.reason = reason
            if self._event is not None:
                self._event.set()

    async def wait(self) -> None:
        """Return once the signal is set."""
        if self._set:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()


class JobContext:
    """Per-try facts about a job: ``id``, ``retried``, ``signal``, ``options``, ``channel``."""

    __slots__ = ("_options", "attempt", "channel", "id", "retried", "signal")

    def __init__(
        self,
        *,
        job_id: int,
        channel: str,
        retried: int,
        attempt: int,
        signal: Signal,
        options: tuple[float, int, int],
    ) -> None:
        #: The job id ``publish`` returned.
        self.id = job_id
        #: The queue (channel) the job was published to.
        self.channel = channel
        #: How many earlier tries failed (0 on the first try).
        self.retried = retried
        #: How many times the job has been claimed, including this one (the fencing token).
        self.attempt = attempt
        #: Set when the job times out or the worker stops; see :class:`Signal`.
        self.signal = signal
        self._options = options

    @property
    def options(self) -> dict[str, Any]:
        """The job's options: ``timeout``, ``max_retries``, ``priority``."""
        timeout, max_retries, priority = self._options
        return {"timeout": timeout, "max_retries": max_retries, "priority": priority}

    def __repr__(self) -> str:
        return f"<JobContext id={self.id} channel={self.channel!r} retried={self.retried}>"
