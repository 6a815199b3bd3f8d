"""Dead letters: jobs whose last try failed. List, retry and purge them.

These functions take any autocommit psycopg connection, so the library API (on the
Coordinator's pool) and the ``pgcoord jobs`` command line (on a connection of its own) share
them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pgcoord import codec
from pgcoord._driver import translated
from pgcoord.errors import InvalidTypeError
from pgcoord.queue.queries import Queries
from pgcoord.validation import INT8_MAX, INT8_MIN, check_int, check_key, check_positive


@dataclass(frozen=True)
class FailedJob:
    """A job that failed on its last try, with what went wrong."""

    id: int
    channel: str
    message: Any
    error: str
    traceback: str
    retried: int
    max_retries: int
    priority: int
    timeout: float
    created_at: datetime
    failed_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (times as ISO 8601)."""
        return {
            "id": self.id,
            "channel": self.channel,
            "message": self.message,
            "error": self.error,
            "traceback": self.traceback,
            "retried": self.retried,
            "max_retries": self.max_retries,
            "priority": self.priority,
            "timeout": self.timeout,
            "created_at": self.created_at.isoformat(),
            "failed_at": self.failed_at.isoformat(),
        }


def check_filters(channel: object, ids: object) -> tuple[str | None, list[int] | None]:
    """Validate the ``channel``/``ids`` filters shared by list, retry and purge."""
    ch = None if channel is None else check_key(channel, "channel")
    if ids is None:
        return ch, None
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise InvalidTypeError("ids must be an iterable of int job ids")
    return ch, [check_int(i, "job id", minimum=INT8_MIN, maximum=INT8_MAX) for i in ids]


async def list_failed(
    conn: psycopg.AsyncConnection[Any],
    queries: Queries,
    app: str,
    *,
    channel: str | None = None,
    ids: Iterable[int] | None = None,
    limit: int = 100,
) -> list[FailedJob]:
    """Dead letters of ``app`` (optionally of one channel / some ids), oldest failure first."""
    ch, id_list = check_filters(channel, ids)
    # Job ids and a listing's LIMIT are Postgres bigints.
    check_int(limit, "limit", minimum=1, maximum=INT8_MAX)
    params = {"app": app, "channel": ch, "ids": id_list, "limit": limit}
    with translated():
        cur = await conn.execute(queries.list_failed, params)
        rows = await cur.fetchall()
    return [
        FailedJob(
            id=r[0],
            channel=r[1],
            message=codec.decode(r[2]),
            error=r[3],
            traceback=r[4],
            retried=r[5],
            max_retries=r[6],
            priority=r[7],
            timeout=r[8],
            created_at=r[9],
            failed_at=r[10],
        )
        for r in rows
    ]


async def retry_failed(
    conn: psycopg.AsyncConnection[Any],
    queries: Queries,
    app: str,
    *,
    channel: str | None = None,
    ids: Iterable[int] | None = None,
) -> list[tuple[int, str]]:
    """Put dead letters back in their queues (same id, fresh retry budget); (id, channel) pairs."""
    ch, id_list = check_filters(channel, ids)
    params = {"app": app, "channel": ch, "ids": id_list}
    with translated():
        cur = await conn.execute(queries.retry_failed, params)
        return [(int(r[0]), str(r[1])) for r in await cur.fetchall()]


async def purge_failed(
    conn: psycopg.AsyncConnection[Any],
    queries: Queries,
    app: str,
    *,
    channel: str | None = None,
    ids: Iterable[int] | None = None,
    older_than: float | None = None,
) -> int:
    """Delete dead letters for good; how many were deleted."""
    ch, id_list = check_filters(channel, ids)
    older = None if older_than is None else check_positive(older_than, "older_than", finite=True)
    params = {"app": app, "channel": ch, "ids": id_list, "older": older}
    with translated():
        cur = await conn.execute(queries.purge_failed, params)
        return len(await cur.fetchall())
