"""The cache's migration: it creates exactly the declared table, and downgrade removes it."""

from __future__ import annotations

import psycopg

from pgcoord import migrate


def _objects(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT relname, relpersistence FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = 'pgcoord' AND relname LIKE 'cache%'"
            " ORDER BY relname"
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_upgrade_creates_the_unlogged_table_and_downgrade_drops_it(empty_dsn: str) -> None:
    migrate.upgrade(empty_dsn, "pgcoord")
    assert _objects(empty_dsn) == [
        ("cache_entries", "u"),
        ("cache_entries_expires_idx", "u"),
        ("cache_entries_pkey", "u"),
    ]
    migrate.downgrade(empty_dsn, "pgcoord", "0003_queue")
    assert _objects(empty_dsn) == []
    migrate.upgrade(empty_dsn, "pgcoord")
    assert len(_objects(empty_dsn)) == 3
