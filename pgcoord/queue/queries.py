"""The queue's SQL: the statements of ``queries.sql``, rendered once per schema to bytes.

Every statement the queue sends is a named block of ``pgcoord/queue/queries.sql`` (the
idempotent-publish ones, ``key_*``, are rendered by :class:`pgcoord.queue.keys.KeyQueries`).
Tables are composed with ``psycopg.sql`` identifiers, never string formatting, and each
:class:`Queries` attribute is the finished statement as bytes, which psycopg sends as they are.

Every statement that finishes a try (complete, retry, fail, release, renew) names the job by
``(id, attempt)``: ``attempt`` grows by one at every claim, so a worker whose lease ran out and
whose job was claimed again cannot touch it any more (fencing).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from psycopg import sql

from pgcoord import sqlfile
from pgcoord.errors import InvalidInputError, InvalidTypeError
from pgcoord.schema.queue import FAILED, JOBS, WAITERS

#: The ``synchronous_commit`` levels the worker-side writes accept (``queue_synchronous_commit``).
SYNCHRONOUS_COMMIT_LEVELS = ("on", "off", "local", "remote_write", "remote_apply")


@dataclass(frozen=True)
class Queries:
    """Every statement of the queue for one schema (the blocks of ``queries.sql`` by name)."""

    publish: bytes
    publish_notify: bytes
    publish_many: bytes
    publish_many_notify: bytes
    notify: bytes
    claim: bytes
    complete: bytes
    retry: bytes
    fail: bytes
    release: bytes
    renew: bytes
    list_failed: bytes
    retry_failed: bytes
    purge_failed: bytes
    counts: bytes
    waiter_set: bytes
    waiter_refresh: bytes
    waiter_delete: bytes
    waiter_sweep: bytes
    failed_sweep: bytes
    vacuum: bytes


def check_synchronous_commit(value: object, what: str = "queue_synchronous_commit") -> str:
    """Validate a ``synchronous_commit`` level: one of :data:`SYNCHRONOUS_COMMIT_LEVELS`."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str, not {type(value).__name__}")
    if value not in SYNCHRONOUS_COMMIT_LEVELS:
        raise InvalidInputError(
            f"{what} must be one of {', '.join(map(repr, SYNCHRONOUS_COMMIT_LEVELS))} "
            f"(PostgreSQL's synchronous_commit levels); got {value!r}"
        )
    return value


def build(schema: str, *, synchronous_commit: str = "off") -> Queries:
    """The queue's statements for tables in ``schema``; the worker-side writes commit at the
    ``synchronous_commit`` level (validated with :func:`check_synchronous_commit`)."""
    return _render(schema, check_synchronous_commit(synchronous_commit))


@functools.cache
def _render(schema: str, level: str) -> Queries:
    # Cached: a Queries is immutable, and every EventQueue of a schema and level sends the
    # same bytes.
    names = {field.name for field in dataclasses.fields(Queries)}
    statements = {n: s for n, s in sqlfile.load("pgcoord.queue").items() if n in names}
    rendered = sqlfile.render(
        statements,
        jobs=sql.Identifier(schema, JOBS),
        failed=sql.Identifier(schema, FAILED),
        waiters=sql.Identifier(schema, WAITERS),
        # A literal from a closed list, not a parameter: each statement keeps one fixed text.
        sync_commit=sql.Literal(level),
    )
    return Queries(**rendered)
