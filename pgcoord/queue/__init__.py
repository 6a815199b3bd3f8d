"""The event queue: durable, at-least-once jobs in PostgreSQL (see :class:`EventQueue`)."""

from __future__ import annotations

from pgcoord.queue.context import JobContext, Signal
from pgcoord.queue.deadletters import FailedJob
from pgcoord.queue.service import EventQueue

__all__ = ["EventQueue", "FailedJob", "JobContext", "Signal"]
