"""``pgcoord jobs failed|retry|purge``: the dead-letter list from the command line.

The lead ``pgcoord`` command calls :func:`register` with its sub-parsers. Each command opens one
connection (``--dsn``, else ``$PGCOORD_DSN``, else the embedded server) and prints JSON lines
(``failed``) or a one-line summary (``retry``, ``purge``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from pgcoord import _driver
from pgcoord.dsn import DSN_ENV, resolve_or_embedded
from pgcoord.queue import deadletters, queries
from pgcoord.validation import check_identifier, check_schema


def _dsn(args: argparse.Namespace) -> str:
    return resolve_or_embedded(getattr(args, "dsn", None))


def _run(args: argparse.Namespace, action: Callable[..., Awaitable[int]]) -> int:
    schema = check_schema(args.schema)
    app = check_identifier(args.app, "app")
    dsn = _dsn(args)

    async def go() -> int:
        conn = await _driver.connect(dsn, connect_timeout=_driver.DEFAULT_CONNECT_TIMEOUT)
        async with conn:
            return await action(conn, queries.build(schema), app, args)

    return asyncio.run(go())


def _ids(args: argparse.Namespace) -> list[int] | None:
    return list(args.ids) if args.ids else None


async def _failed(
    conn: psycopg.AsyncConnection[Any], q: queries.Queries, app: str, args: argparse.Namespace
) -> int:
    jobs = await deadletters.list_failed(
        conn, q, app, channel=args.channel, ids=_ids(args), limit=args.limit
    )
    for job in jobs:
        record = job.as_dict()
        if not args.traceback:
            record.pop("traceback")
        print(json.dumps(record, ensure_ascii=False))
    if not jobs:
        print("no failed jobs", file=sys.stderr)
    return 0


def _require_selection(args: argparse.Namespace) -> None:
    if not (args.all or args.ids or args.channel):
        raise SystemExit("pgcoord jobs: name job ids, or --channel NAME, or --all")


async def _retry(
    conn: psycopg.AsyncConnection[Any], q: queries.Queries, app: str, args: argparse.Namespace
) -> int:
    _require_selection(args)
    moved = await deadletters.retry_failed(conn, q, app, channel=args.channel, ids=_ids(args))
    from pgcoord import names

    for channel in sorted({c for _, c in moved}):
        await conn.execute(q.notify, (names.pg_channel(args.schema, app, "queue", channel),))
    print(f"requeued {len(moved)} job(s): {' '.join(str(i) for i, _ in sorted(moved))}")
    return 0


async def _purge(
    conn: psycopg.AsyncConnection[Any], q: queries.Queries, app: str, args: argparse.Namespace
) -> int:
    _require_selection(args)
    count = await deadletters.purge_failed(
        conn, q, app, channel=args.channel, ids=_ids(args), older_than=args.older_than
    )
    print(f"purged {count} failed job(s)")
    return 0


def cmd_failed(args: argparse.Namespace) -> int:
    """``pgcoord jobs failed``: list dead letters as JSON lines."""
    return _run(args, _failed)


def cmd_retry(args: argparse.Namespace) -> int:
    """``pgcoord jobs retry``: put dead letters back in their queues."""
    return _run(args, _retry)


def cmd_purge(args: argparse.Namespace) -> int:
    """``pgcoord jobs purge``: delete dead letters for good."""
    return _run(args, _purge)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dsn", default=None, help=f"PostgreSQL DSN (default: ${DSN_ENV}, else embedded)"
    )
    p.add_argument("--schema", default="pgcoord", help="schema of pgcoord's tables")
    p.add_argument("--app", default="main", help="application namespace (default: main)")
    p.add_argument("--channel", default=None, help="only jobs of this queue")


def register(subparsers: Any) -> None:
    """Add ``jobs failed|retry|purge`` to the ``pgcoord`` command's sub-parsers."""
    jobs = subparsers.add_parser("jobs", help="inspect, retry or purge failed jobs (dead letters)")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)

    failed = actions.add_parser("failed", help="list failed jobs as JSON lines")
    _common(failed)
    failed.add_argument("ids", nargs="*", type=int, help="only these job ids")
    failed.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    failed.add_argument("--traceback", action="store_true", help="include tracebacks")
    failed.set_defaults(func=cmd_failed)

    retry = actions.add_parser("retry", help="put failed jobs back in their queues")
    _common(retry)
    retry.add_argument("ids", nargs="*", type=int, help="job ids to retry")
    retry.add_argument("--all", action="store_true", help="every failed job (of --channel)")
    retry.set_defaults(func=cmd_retry)

    purge = actions.add_parser("purge", help="delete failed jobs for good")
    _common(purge)
    purge.add_argument("ids", nargs="*", type=int, help="job ids to delete")
    purge.add_argument("--all", action="store_true", help="every failed job (of --channel)")
    purge.add_argument(
        "--older-than", type=float, default=None, help="only jobs failed more than S seconds ago"
    )
    purge.set_defaults(func=cmd_purge)
