"""What a :class:`~pgcoord.queue.worker.Worker` needs from the queue that owns it.

A port, not a back-reference: the worker sees only these few things, and the queue service
implements them (``EventQueue.worker_port()``), so neither module imports the other both ways.
"""

from __future__ import annotations

from typing import Any, Protocol


class OutcomeSink(Protocol):
    """Where a worker reports how each try of a job ended (written in batches)."""

    def complete(self, job_id: int, attempt: int) -> None:
        """The try succeeded: the job is done."""

    def retry(self, job_id: int, attempt: int, delay: float) -> None:
        """The try failed: run the job again after ``delay`` seconds."""

    def fail(self, job_id: int, attempt: int, error: str, traceback: str) -> None:
        """The job failed for good: dead-letter it (``error`` and ``traceback`` may hold any
        text, NUL and lone surrogates included: the sink makes them storable)."""

    async def drain(self) -> None:
        """Return once every outcome reported so far is written."""


class WorkerHost(Protocol):
    """The queue as its workers see it."""

    @property
    def outcomes(self) -> OutcomeSink:
        """Where outcomes go."""

    @property
    def batch(self) -> int:
        """Most jobs one claim takes (``queue_batch``)."""

    @property
    def idle_poll(self) -> float:
        """Seconds an idle worker may sleep with nothing known to wake it (``queue_idle_poll``)."""

    @property
    def max_interruptions(self) -> int:
        """Claims without an outcome before a job is dead-lettered."""

    def pg_channel(self, channel: str) -> str:
        """The Postgres channel that announces jobs of ``channel``."""

    def listening(self) -> bool:
        """Whether NOTIFYs can reach the workers now (the listener is connected)."""

    async def claim(self, channel: str, n: int) -> tuple[list[tuple[Any, ...]], float | None]:
        """Claim up to ``n`` jobs: their rows, and in how many seconds the next may be due."""

    async def set_waiter(self, channel: str, idle: bool) -> None:
        """Record whether this instance's worker of ``channel`` may be asleep."""
