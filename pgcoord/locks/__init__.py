"""The LockManager service: distributed locks on PostgreSQL advisory locks.

Leases the server enforces (``idle_session_timeout`` on a connection dedicated to each held
lock), fencing tokens that keep increasing across crashes, and mutual exclusion between processes
and between tasks of one process. See docs/locks.md.
"""

from __future__ import annotations

from pgcoord.locks.lease import DEFAULT_TTL
from pgcoord.locks.lock import Lock
from pgcoord.locks.manager import LockContext, LockHolder, LockManager

__all__ = ["DEFAULT_TTL", "Lock", "LockContext", "LockHolder", "LockManager"]
