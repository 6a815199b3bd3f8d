"""Every error pgcoord raises, under one root: :class:`PgcoordError`.

Input errors also derive from the matching built-in (``ValueError``/``TypeError``/``KeyError``)
so code written against the standard library's conventions keeps working.
"""

from __future__ import annotations


class PgcoordError(Exception):
    """Root of every error raised by pgcoord."""


class InvalidInputError(PgcoordError, ValueError):
    """An argument has the right type but a value pgcoord refuses (empty key, ttl <= 0, ...)."""


class InvalidTypeError(PgcoordError, TypeError):
    """An argument has a type pgcoord refuses (non-str key, non-JSON message, non-callable)."""


class PayloadTooLargeError(InvalidInputError):
    """A message, job payload or cache value is larger than the configured maximum."""


class ConnectionFailedError(PgcoordError, ConnectionError):
    """PostgreSQL could not be reached, or the connection broke in the middle of an operation."""


class CommandTimeoutError(ConnectionFailedError, TimeoutError):
    """A database step did not finish within its bound (``command_timeout``, or the call's own
    ``timeout=``). The connection it ran on was closed: a statement already sent may or may not
    have taken effect (see docs/operations.md, "Bounded calls")."""


class DatabaseError(PgcoordError):
    """PostgreSQL refused an operation; ``sqlstate`` carries the server's error code."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SchemaOutdatedError(PgcoordError):
    """The database schema is missing or older (or newer) than this pgcoord version expects."""


class NotRunningError(PgcoordError):
    """The Coordinator was not started yet, or has been stopped."""


class UnsupportedServerError(PgcoordError):
    """The PostgreSQL server is older than pgcoord supports (15)."""


class TransactionPoolingError(PgcoordError):
    """``start()`` found a connection pooler between pgcoord and PostgreSQL that hands server
    sessions from client to client between transactions (PgBouncer ``pool_mode = transaction``
    or ``statement``): LISTEN, session locks and prepared statements cannot work through it.
    Connect pgcoord directly, or through a pool in session mode."""


class EmbeddedServerError(PgcoordError):
    """The embedded PostgreSQL server could not be started (or its package is missing)."""


class CacheNotFoundError(PgcoordError, KeyError):
    """``CacheManager.get_cache`` was asked for a cache that was never created."""


class LockError(PgcoordError):
    """Base of the lock errors."""


class LockAcquireError(LockError, TimeoutError):
    """A lock was not acquired within the time allowed."""


class LockLostError(LockError):
    """The lock's lease ended (ttl passed, or its connection died) before it was released."""


class JobError(PgcoordError):
    """Base of the event-queue errors."""


class JobNotFoundError(JobError, KeyError):
    """No job has the given id (or it is not in the state the operation needs)."""


__all__ = [
    "CacheNotFoundError",
    "CommandTimeoutError",
    "ConnectionFailedError",
    "DatabaseError",
    "EmbeddedServerError",
    "InvalidInputError",
    "InvalidTypeError",
    "JobError",
    "JobNotFoundError",
    "LockAcquireError",
    "LockError",
    "LockLostError",
    "NotRunningError",
    "PayloadTooLargeError",
    "PgcoordError",
    "SchemaOutdatedError",
    "TransactionPoolingError",
    "UnsupportedServerError",
]
